"""A fake-quantize module whose scale comes from a StatQAT estimator.

Statistics update once per training forward (``analytic``: one reduction pass;
``iterative``: one least-squares step warm-started from the previous scale; ``minmax``
for reference) and are frozen in eval. A training forward quantizes with the scale the
module holds and then updates it from the batch (the very first forward estimates
first): the fake quant and the statistics do not wait on each other, so a compiled graph
reads the tensor in one fused pass, and for ``iterative`` the least-squares step uses
exactly the codes the forward produced. The scale a batch is quantized with is therefore
one step behind its statistics, as with a learned (LSQ) scale. Everything on the training path is branch-free
on tensor values and the flags are Python bools, so ``torch.compile(fullgraph=True)``
traces it whole.

Example:
    >>> import torch
    >>> fq = FakeQuantizer("int4", method="analytic", granularity="channel")
    >>> w = torch.randn(32, 64, requires_grad=True)
    >>> fq(w).shape, fq.scale.shape
    (torch.Size([32, 64]), torch.Size([32, 1]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from statqat_ao.estimators import (
    error_weighted_methods,
    get_estimator,
    minmax_qparams,
    online_methods,
)
from statqat_ao.estimators.common import with_fallback
from statqat_ao.estimators.registry import OnlineStep
from statqat_ao.numerics.block_stats import tensor_abs_max
from statqat_ao.numerics.blocks import BlockLayout, Granularity, block_layout
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.numerics.scale_formats import cap_scale, nvfp4_tensor_scale, round_scale
from statqat_ao.parallel import distributed

from .extra_state import pack_state, unpack_state
from .fake_quant import fake_quantize
from .input_moments import MOMENT_WINDOW, InputMomentsTracking
from .nonfinite import NonFiniteTracking, quantizer_name


def _joint(xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """All of ``xs`` as one tensor for joint per-tensor statistics."""
    if all(t.shape == xs[0].shape for t in xs):
        return torch.stack([t.detach() for t in xs])  # keeps each operand's layout
    return torch.cat([t.detach().reshape(-1) for t in xs])


class FakeQuantizer(InputMomentsTracking, NonFiniteTracking, nn.Module):
    """Fake quantization of one tensor with an online StatQAT scale.

    Args:
        fmt: format name or :class:`Format`.
        method: a registered online method (:func:`statqat_ao.estimators.online_methods`):
            ``"analytic"``, ``"iterative"``, ``"minmax"`` or ``"octav"`` (a peer method: its
            full fixed-point iteration runs on every training batch).
        granularity: ``"tensor"``, ``"channel"`` or an int group size.
        axis: channel axis.
        symmetric: zero point 0 (asymmetric needs an INT format).
        process_group: where a multi-process run combines the statistics (see
            :mod:`statqat_ao.parallel.distributed`): ``"default"`` follows
            :func:`statqat_ao.parallel.distributed.set_process_group` for activations and keeps
            weights local; ``"off"``/``None`` never reduces; a process group always does.
        nonfinite: ``"raise"`` or ``"skip"``: what a training batch holding NaN or Inf
            does (see :mod:`statqat_ao.quantizers.nonfinite`). Either way the scale keeps its value.
        error: what a weight quantizer's scale minimises: ``"weight"`` (the weight's own
            squared error), ``"output"`` (weighted by the layer input's second moments,
            which the front end passes as ``layer_input``; see
            :mod:`statqat_ao.quantizers.input_moments`) or ``"auto"`` (output-aware where
            the layer input arrives, silently the weight's error elsewhere). Methods that
            minimise no error (``minmax``, ``octav``) take ``"weight"``.

    Attributes:
        fake_quant_enabled, observer_enabled: Python bools (not tensors, so a compiled
            graph specialises on them instead of breaking).
    """

    def __init__(
        self,
        fmt: str | Format = "int8",
        method: str = "analytic",
        granularity: Granularity = "tensor",
        axis: int = 0,
        symmetric: bool = True,
        process_group: Any = distributed.DEFAULT,
        nonfinite: str = "raise",
        error: str = "weight",
    ):
        # nn.Module's init, not the next class's: the torch.ao / torchao bases that
        # subclasses add only set flag buffers and dtype attributes, which they replace.
        nn.Module.__init__(self)
        if method not in online_methods():
            hint = " (LSQ learns its scale: use sq.prepare_qat_fx, which builds an LSQFakeQuantize)" if method == "lsq" else ""
            raise ValueError(f"online method must be one of {online_methods()}, got {method!r}{hint}")
        self.fmt = get_format(fmt)
        if not symmetric and self.fmt.family != "int":
            raise ValueError(f"asymmetric quantization needs an INT format, got {self.fmt.name}")
        if not symmetric and get_estimator(method).symmetric_only:
            raise ValueError(f"{method} estimates symmetric quantizers only; pass symmetric=True")
        if error == "output" and not get_estimator(method).error_weighted:
            raise ValueError(
                f"error='output' needs a method that minimises an error: one of {error_weighted_methods()}, not {method!r}"
            )
        if error == "auto" and not get_estimator(method).error_weighted:
            error = "weight"
        self.method, self.granularity, self.axis, self.symmetric = method, granularity, axis, symmetric
        self.process_group = distributed.as_setting(process_group)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        if self.fmt.scale_format == "fp8_e4m3":  # NVFP4: block scales are this FP32 scale x E4M3 values
            self.register_buffer("tensor_scale", torch.ones(()))
        self.fake_quant_enabled = True
        self.observer_enabled = True
        self._scale_shape: tuple[int, ...] | None = None
        self.calibrating = False  # set by statqat_ao.calibrate
        self._calibration_tensor: torch.Tensor | None = None
        self._init_nonfinite(nonfinite)
        self._init_input_moments(error)

    @torch.no_grad()
    def _estimate(self, x: torch.Tensor, *more: torch.Tensor) -> None:
        """Update the scale from ``x`` (and, jointly, the shared operands ``more``)."""
        # A Python-level decision: None in a single process, so nothing else is traced.
        group = distributed.statistics_group(self, x, getattr(self, "process_group", distributed.DEFAULT))
        nonempty = [t for t in (x, *more) if t.numel()]
        if 0 < len(nonempty) < 1 + len(more):  # some operands of a shared quantizer are empty:
            x, *rest = nonempty  # the scale comes from the others (an empty one has nothing to add)
            more = tuple(rest)
        if not nonempty:
            if group is not None:
                raise ValueError(
                    f"{quantizer_name(self)} got an empty batch (shape {tuple(x.shape)}) in a multi-process "
                    "run: every rank must contribute to the shared statistics. Drop empty batches on "
                    "every rank alike (e.g. DistributedSampler(drop_last=True))."
                )
            return None  # nothing to learn from: the scale stays as it is
        finite = self._record_update((x, *more))
        warm_shared = get_estimator(self.method).sums_shared_operands and self._scale_shape == ()
        if more and not warm_shared:
            x, more = _joint((x, *more)), ()
        layout = block_layout(x.shape, self.granularity, self.axis, self.fmt)
        self._check_scale_shape(layout.scale_shape, x.shape)
        if group is None:
            return self._update(layout, x, more, finite)
        with distributed.statistics_reduced(group, layout):
            return self._update(layout, x, more, finite)

    def _check_scale_shape(self, scale_shape: tuple[int, ...], x_shape: torch.Size) -> None:
        if self._scale_shape is not None and scale_shape != self._scale_shape:
            raise ValueError(
                f"{quantizer_name(self)} holds {self.granularity}-granularity scales of shape "
                f"{tuple(self.scale.shape)} (blocks {self._scale_shape}), which do not fit an input of "
                f"shape {tuple(x_shape)}: the quantized dimension changed between steps. Give each "
                "tensor shape its own quantizer, or quantize it per tensor."
            )

    def _update(
        self, layout: BlockLayout, x: torch.Tensor, more: tuple[torch.Tensor, ...], finite: torch.Tensor
    ) -> None:
        estimator = get_estimator(self.method)
        blocks = layout.block_view(x.detach().float())
        warm = self._scale_shape == layout.scale_shape
        last = (self.scale.reshape(-1), self.zero_point.reshape(-1).float()) if warm else (None, None)
        weights = self.error_weights(x, warn=warm) if not more else None
        weights = None if weights is None else layout.block_view(weights)
        ts = nvfp4_tensor_scale(tensor_abs_max(x)) if self.fmt.scale_format == "fp8_e4m3" else None
        step = OnlineStep(blocks, more, self.fmt, self.symmetric, *last, weights=weights, tensor_scale=ts)
        s, zp = estimator.online(step)
        # A block without a usable estimate takes MinMax's scale, else keeps its previous
        # one (1.0 before the first); a batch holding NaN or Inf changes no scale at all.
        s_mm, zp_mm = (s, zp) if estimator.name == "minmax" else minmax_qparams(blocks, self.fmt, self.symmetric)
        previous = self.scale.reshape(-1).to(s.dtype) if warm else torch.ones_like(s)
        s, zp = with_fallback(s, zp, s_mm, zp_mm, previous, finite)
        if self.fmt.is_block_format and not estimator.representable_scales:
            s = round_scale(blocks, s, self.fmt, estimator.standard_scale_rounding, ts, weights)
        if ts is not None:
            self.tensor_scale.copy_(ts)
        s = cap_scale(s, x.dtype, self.fmt, self.symmetric)
        if not warm:
            self.scale = layout.from_blocks(s).clone()
            self.zero_point = layout.from_blocks(zp.to(torch.int32)).clone()
            self._scale_shape = layout.scale_shape
        else:
            self.scale.copy_(layout.from_blocks(s))
            # Least squares refines the scale for a fixed zero point; a symmetric one is 0 always.
            if not estimator.keeps_zero_point and not self.symmetric:
                self.zero_point.copy_(layout.from_blocks(zp.to(torch.int32)))

    def forward(
        self, x: torch.Tensor, *shared: torch.Tensor, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Fake-quantize ``x``; with more inputs, quantize them all with one shared scale.

        Shared inputs (the operands of a residual add or a cat, which an integer graph
        needs on one scale) are estimated jointly, per tensor, and returned as a tuple.
        ``layer_input``: for a weight quantizer, the input of the layer ``x`` is the
        weight of (output-aware error: its second moments update with the statistics).
        """
        xs = (x, *shared)
        if not isinstance(x, torch.Tensor) or (shared and not all(isinstance(t, torch.Tensor) for t in shared)):
            raise TypeError(
                f"{quantizer_name(self)} was called on a {', '.join(type(t).__name__ for t in xs)}, not a tensor: "
                "the graph that inserted it quantizes a non-tensor value (a shape, an int). Give that op no qconfig."
            )
        if shared and self.granularity != "tensor":
            raise ValueError(f"shared quantization is per tensor; this quantizer is per {self.granularity}")
        cold = self._scale_shape is None
        if not shared and self._scale_shape not in (None, ()):
            self._check_scale_shape(block_layout(x.shape, self.granularity, self.axis, self.fmt).scale_shape, x.shape)
        calibrating_weight = self.calibrating and not self._is_activation_input(x)
        if layer_input is not None and self.output_aware and self.observer_enabled and (self.training or self.calibrating):
            self.observe_input(layer_input, float("inf") if self.calibrating else MOMENT_WINDOW)
        if calibrating_weight:
            self._calibration_tensor = x  # re-estimated from all calibration inputs at the end
        if self.observer_enabled and cold:
            self._estimate(*xs)  # the first scale comes from this batch
        out = tuple(fake_quantize(t, self.scale, self.zero_point, self.fmt) for t in xs) if self.fake_quant_enabled else xs
        updating = self.training or (self.calibrating and not calibrating_weight)
        if self.observer_enabled and updating and not cold:
            self._estimate(*xs)  # after the fake quant: no dependency, one fused pass
        return out if shared else out[0]

    def _is_activation_input(self, x: torch.Tensor) -> bool:
        role = getattr(self, "is_activation", None)
        return not isinstance(x, nn.Parameter) if role is None else bool(role)

    def start_calibration(self) -> None:
        """Calibration mode (:func:`statqat_ao.calibrate`): statistics update in eval too.

        Activation scales update on every batch as in training; a weight quantizer
        collects its layer's input moments and keeps its scale until
        :meth:`finish_calibration`.
        """
        self.calibrating = True
        self._calibration_tensor = None
        if self.output_aware and self.input_moments.numel():
            self.input_count.zero_()  # the calibration mean replaces what training collected

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Leave calibration: an output-aware weight quantizer re-estimates from scratch (a
        cold start, the full estimator) with the moments of every calibration input."""
        self.calibrating = False
        tensor, self._calibration_tensor = self._calibration_tensor, None
        if tensor is not None and self.has_input_moments and self.observer_enabled:
            self._scale_shape = None
            self._estimate(tensor)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled = enabled

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled = enabled

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(scale, zero_point)``."""
        return self.scale, self.zero_point

    def get_extra_state(self) -> torch.Tensor:
        # Whether (and with which block shape) a scale was estimated: restored on load,
        # so a resumed model warm-starts exactly where the saved one stopped.
        return pack_state({
            "scale_shape": None if self._scale_shape is None else list(self._scale_shape),
            **self._nonfinite_state(),
        })

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        state = unpack_state(state)
        shape = state.get("scale_shape")
        self._scale_shape = None if shape is None else tuple(shape)
        self._load_nonfinite_state(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Scales are shaped by the first estimate; take the saved shape before copying.
        for name in ("scale", "zero_point", "input_moments"):
            saved = state_dict.get(prefix + name)
            if saved is not None and hasattr(self, name) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def is_initialized(self) -> bool:
        """Whether a scale has been estimated (loaded state counts)."""
        return self._scale_shape is not None

    def extra_repr(self) -> str:
        error = f", error={self.error}" if self.error != "weight" else ""
        return (
            f"fmt={self.fmt.name}, method={self.method}, granularity={self.granularity}, "
            f"axis={self.axis}, symmetric={self.symmetric}{error}"
        )
