"""LSQ (Esser et al., 2020): fake quantization with a learned step size, the gradient baseline.

The scale starts at :func:`~statqat_ao.estimators.lsq.lsq_qparams`'s estimate and is
learned by gradient descent, its gradient scaled by ``1 / sqrt(block_len * g_K)`` as in
the paper.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from statqat_ao.estimators import estimate_qparams
from statqat_ao.estimators.common import error_model_gmax
from statqat_ao.numerics.blocks import block_layout
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.parallel import distributed

from .extra_state import pack_state, unpack_state
from .fake_quant import fake_quantize
from .nonfinite import NonFiniteTracking
from .toggle import FakeQuantToggle


def _scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    # Forward value t exactly (t + (a - a) is t; (t - a) + a is not, in float32);
    # backward gradient multiplied by factor.
    scaled = t * factor
    return t.detach() + (scaled - scaled.detach())


class LSQFakeQuantize(FakeQuantToggle, NonFiniteTracking, nn.Module):
    """Fake quantization with a learned scale (LSQ).

    The scale is initialised from the first batch it sees (or by :meth:`initialize`).

    Example:
        >>> fq = LSQFakeQuantize("int4", granularity="channel")
        >>> w = torch.randn(8, 16, requires_grad=True)
        >>> fq(w).sum().backward()
        >>> fq.scale.grad.shape
        torch.Size([8, 1])
    """

    def __init__(
        self,
        fmt: str | Format,
        granularity: str | int = "tensor",
        axis: int = 0,
        nonfinite: str = "raise",
        is_activation: bool | None = None,
    ):
        super().__init__()
        self.is_activation = is_activation  # None: a Parameter input is a weight
        self._init_nonfinite(nonfinite)
        self.fmt = get_format(fmt)
        self.granularity = granularity
        self.axis = axis
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.initialized = False
        self.fake_quant_enabled = True

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, group: Any = None) -> None:
        """Set the scale from ``x``; with a process ``group``, from every rank's ``x`` together."""
        with distributed.reduce_statistics(group) if group is not None else contextlib.nullcontext():
            s, zp = estimate_qparams(x, self.fmt, "lsq", self.granularity, self.axis)
        # In place: an optimizer built before the first forward keeps training this Parameter.
        self.scale.data = s.to(self.scale.device)
        self.zero_point = zp
        layout = block_layout(x.shape, self.granularity, self.axis, self.fmt)
        self._grad_factor = 1.0 / math.sqrt(layout.block_len * error_model_gmax(self.fmt, True))
        self.initialized = True

    def forward(self, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Fake-quantize ``x``; with more inputs, all of them with the one learned scale."""
        if shared and self.granularity != "tensor":
            raise ValueError(f"shared quantization is per tensor; this quantizer is per {self.granularity}")
        xs = (x, *shared)
        nonempty = any(t.numel() for t in xs)  # an empty operand of a shared quantizer adds nothing
        if self.training and nonempty:
            # A NaN batch gives the learned scale a NaN gradient: "raise" stops here, naming
            # this module; under "skip" the training loop must skip the optimizer step.
            self._record_update(xs)
        if not self.initialized and nonempty:
            joint = torch.cat([t.detach().reshape(-1) for t in xs if t.numel()]) if shared else x.detach()
            # Activations start from the global batch in a multi-process run, like every
            # other estimator's statistics; weights are whole on every rank already.
            self.initialize(joint, distributed.statistics_group(self, x))
        if not self.fake_quant_enabled or not self.initialized:  # (not initialized: only empty batches so far)
            return (x, *shared) if shared else x
        scale = self._positive(_scale_gradient(self.scale, self._grad_factor))
        out = tuple(fake_quantize(t, scale, self.zero_point, self.fmt, learn_scale=True) for t in xs)
        return out if shared else out[0]

    @staticmethod
    def _positive(scale: torch.Tensor) -> torch.Tensor:
        # A gradient step can take a learned scale through zero; quantize with |s|.
        return scale.abs().clamp(min=torch.finfo(torch.float32).tiny)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point the forward quantizes with."""
        return self._positive(self.scale.detach()), self.zero_point

    @property
    def is_initialized(self) -> bool:
        return self.initialized

    def get_extra_state(self) -> torch.Tensor:
        # Restored on load, so a resumed run keeps its learned scale instead of re-initialising.
        return pack_state({
            "initialized": self.initialized,
            "grad_factor": getattr(self, "_grad_factor", None),
            **self._nonfinite_state(),
        })

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        state = unpack_state(state)
        self.initialized = bool(state.get("initialized", False))
        if state.get("grad_factor") is not None:
            self._grad_factor = float(state["grad_factor"])
        self._load_nonfinite_state(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):  # shaped by the first estimate
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                current.data = torch.empty_like(saved, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
