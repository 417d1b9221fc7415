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


class QuantizedParams(nn.Module):
    """Format, scale, zero point and (for weights) codes of one quantized tensor.

    Attributes:
        fmt: the :class:`~statqat_ao.Format`.
        scale, zero_point: buffers shaped as the estimator returned them (``[]`` per
            tensor, ``[C, 1, ...]`` per channel, ``[rows, groups]`` per group).
        codes: the stored codes (weights), or None (activations, quantized at run time).
    """

    def __init__(
        self,
        fmt: str | Format,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        codes: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.fmt = get_format(fmt)
        self.dtype = dtype  # of the dequantized values (the trained tensor's dtype)
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32))
        self.register_buffer("codes", None if codes is None else codes.detach().clone())

    @classmethod
    def from_tensor(cls, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str | Format) -> QuantizedParams:
        """Quantize ``x`` (a weight) with the given scale and keep its codes."""
        return cls(fmt, scale, zero_point, quantize(x.detach(), scale, zero_point, fmt), x.dtype)

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

    def get_extra_state(self) -> dict:
        return {"fmt": self.fmt.name, "dtype": str(self.dtype).removeprefix("torch.")}

    def set_extra_state(self, state: dict) -> None:
        self.fmt = get_format(state["fmt"])
        self.dtype = getattr(torch, state.get("dtype", "float32"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point", "codes"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and (current is None or saved.shape != current.shape or saved.dtype != current.dtype):
                setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = f"codes={tuple(self.codes.shape)}" if self.codes is not None else "activation"
        return f"fmt={self.fmt.name}, granularity={self.granularity}, {kind}"
