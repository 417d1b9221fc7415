"""``QuantizedParams``: what :func:`statqat_ao.convert` stores for each quantized tensor.

The format, the float32 scale, the int32 zero point and, for weights, the codes
(:mod:`statqat_ao.numerics.codes`). Every backend reads these; none re-derives a scale.

Example:
    >>> import torch, statqat_ao as sq
    >>> w = torch.randn(4, 64)
    >>> s, zp = sq.estimate_qparams(w, "int4", granularity=32)
    >>> q = QuantizedParams.from_tensor(w, s, zp, "int4")
    >>> q.codes.dtype, q.granularity, torch.equal(q.dequantize(), sq.fake_quantize(w, s, zp, "int4"))
    (torch.int8, 32, True)
"""

from __future__ import annotations

import torch
from torch import nn

from statqat_ao.numerics.codes import dequantize, quantize
from statqat_ao.numerics.formats import Format, get_format

from .extra_state import pack_state, unpack_state
from .lsq import LSQFakeQuantize


class ConvertError(RuntimeError):
    """The prepared model cannot be converted as it is (the message says why and what to do)."""


def quantizer_qparams(fq: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scale, zero_point)`` a trained quantizer's forward uses (LSQ: ``|s|``).

    Not ``calculate_qparams``: torch.ao's subclasses report torch's zero-point convention there.
    """
    if isinstance(fq, LSQFakeQuantize):
        return fq.calculate_qparams()
    return fq.scale, fq.zero_point


def quantizer_tensor_scale(fq: nn.Module) -> torch.Tensor | None:
    """NVFP4's FP32 per-tensor scale as the quantizer last set it (None for other formats)."""
    return getattr(fq, "tensor_scale", None)


def check_convertible(fq: nn.Module, path: str) -> None:
    """Raise :class:`ConvertError` unless quantizer ``fq`` (called ``path``) holds a usable scale."""
    if not fq.is_initialized:
        raise ConvertError(
            f"quantizer {path!r} never saw data, so it has no scale: run a forward pass "
            "(or prepare with example_inputs) before convert"
        )
    scale, _ = quantizer_qparams(fq)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ConvertError(f"quantizer {path!r} holds a non-finite or non-positive scale; check training for NaN")


def check_finite_weight(weight: torch.Tensor, path: str) -> None:
    """Raise :class:`ConvertError` if the weight quantized by ``path`` holds NaN or Inf."""
    if not bool(torch.isfinite(weight).all()):
        raise ConvertError(
            f"the weight quantized by {path!r} holds {int(torch.isnan(weight).sum())} NaN and "
            f"{int(torch.isinf(weight).sum())} Inf values: its codes would be meaningless. "
            "Training diverged; convert a checkpoint from before it."
        )


class QuantizedParams(nn.Module):
    """Format, scale, zero point and (for weights) codes of one quantized tensor.

    Attributes:
        fmt: the :class:`~statqat_ao.Format`.
        scale, zero_point: buffers shaped as the estimator returned them (``[]`` per
            tensor, ``[C, 1, ...]`` per channel, ``[rows, groups]`` per group).
        codes: the stored codes (weights), or None (activations, quantized at run time).
        tensor_scale: NVFP4's FP32 per-tensor scale (block scales are ``tensor_scale`` times
            E4M3 values, rounded to float32), or None.
    """

    def __init__(
        self,
        fmt: str | Format,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        codes: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        tensor_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        self.fmt = get_format(fmt)
        self.dtype = dtype  # of the dequantized values (the trained tensor's dtype)
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32))
        self.register_buffer("codes", None if codes is None else codes.detach().clone())
        self.register_buffer("tensor_scale", None if tensor_scale is None else tensor_scale.detach().clone().float())

    @classmethod
    def from_tensor(
        cls,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        fmt: str | Format,
        tensor_scale: torch.Tensor | None = None,
    ) -> QuantizedParams:
        """Quantize ``x`` (a weight) with the given scale and keep its codes (and NVFP4's tensor scale)."""
        return cls(fmt, scale, zero_point, quantize(x.detach(), scale, zero_point, fmt), x.dtype, tensor_scale)

    @property
    def granularity(self) -> str | int:
        """``"tensor"``, ``"channel"`` or the group size (from the codes' and scale's shapes)."""
        if self.scale.numel() == 1 or self.codes is None:
            return "tensor"
        broadcasts = self.scale.dim() == self.codes.dim() and all(
            s in (1, c) for s, c in zip(self.scale.shape, self.codes.shape, strict=True)
        )
        return "channel" if broadcasts else self.codes.numel() // self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        """The float values of the stored codes, in the trained tensor's dtype."""
        if self.codes is None:
            raise ValueError("activation parameters have no codes; quantize an input first")
        return dequantize(self.codes, self.scale, self.zero_point, self.fmt, self.dtype)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through this tensor's codes and back (an activation at its frozen scale), in ``x``'s dtype.

        Bit-identical to :func:`statqat_ao.fake_quantize` with the same scale, as a converted graph computes it.
        """
        codes = quantize(x, self.scale, self.zero_point, self.fmt)
        return dequantize(codes, self.scale, self.zero_point, self.fmt).type_as(x)

    def get_extra_state(self) -> torch.Tensor:
        return pack_state({"fmt": self.fmt.name, "dtype": str(self.dtype).removeprefix("torch.")})

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        state = unpack_state(state)
        self.fmt = get_format(state["fmt"])
        self.dtype = getattr(torch, state.get("dtype", "float32"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point", "codes", "tensor_scale"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and (current is None or saved.shape != current.shape or saved.dtype != current.dtype):
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = f"codes={tuple(self.codes.shape)}" if self.codes is not None else "activation"
        return f"fmt={self.fmt.name}, granularity={self.granularity}, {kind}"
