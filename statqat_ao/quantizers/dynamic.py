"""Per-token dynamic fake quantization: a scale for every row, computed from each input.

LLM deployments (ExecuTorch's 8da4w, torchao's dynamic-activation configs) quantize a
Linear's input per token at run time, with no stored scale. :class:`DynamicQuantizer`
trains with exactly that: on every forward, train or eval, each row along the last
dimension gets its own scale from the registered estimator (``minmax`` by default, as
the runtimes do; any offline method works), then the straight-through fake quant. It
holds no state, so there is nothing to calibrate, save or convert.

Example:
    >>> import torch
    >>> q = DynamicQuantizer("int8")
    >>> x = torch.randn(2, 5, 16)
    >>> s, _ = q.qparams(x)
    >>> s.shape, torch.allclose(s, x.abs().amax(-1, keepdim=True) / 127.5)
    (torch.Size([2, 5, 1]), True)
"""

from __future__ import annotations

import torch
from torch import nn

from statqat_ao.estimators import get_estimator, minmax_qparams
from statqat_ao.estimators.common import with_fallback
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.numerics.scale_formats import cap_scale

from .fake_quant import fake_quantize
from .toggle import FakeQuantToggle


class DynamicQuantizer(FakeQuantToggle, nn.Module):
    """Fake quantization per token (each row of the last dimension), scales from each input.

    Args:
        fmt: a per-tensor format (INT, FP4/FP8, NF4...; not an MX/NV block format).
        method: an offline estimator (``minmax``, ``analytic``, ``iterative``, ``mse``...).
        symmetric: zero point 0.
    """

    def __init__(self, fmt: str | Format = "int8", method: str = "minmax", symmetric: bool = True):
        super().__init__()
        self.fmt = get_format(fmt)
        if self.fmt.is_block_format:
            raise ValueError(f"per-token quantization takes a per-tensor format, not the block format {self.fmt.name}")
        self.estimator = get_estimator(method)
        if not symmetric and self.fmt.family != "int":
            raise ValueError(f"asymmetric quantization needs an INT format, got {self.fmt.name}")
        self.method, self.symmetric = method, symmetric
        self.fake_quant_enabled = True
        self.is_activation = True

    @torch.no_grad()
    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(scale, zero_point)`` of ``x``, shaped ``[..., 1]``."""
        rows = x.detach().float().reshape(-1, x.shape[-1])
        s, zp = self.estimator.estimate(rows, self.fmt, self.symmetric)
        # An all-zero row takes 1.0 (zeros quantize to zeros at any scale).
        s, zp = with_fallback(s, zp, *minmax_qparams(rows, self.fmt, self.symmetric), torch.ones_like(s))
        s = cap_scale(s, x.dtype, self.fmt, self.symmetric)
        shape = (*x.shape[:-1], 1)
        return s.reshape(shape), zp.to(torch.int32).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled or x.numel() == 0:
            return x
        return fake_quantize(x, *self.qparams(x), self.fmt)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """What a converted layer applies to its input: the same per-token fake quant."""
        return self.forward(x)

    @property
    def is_initialized(self) -> bool:
        return True  # nothing to estimate ahead of the input

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, method={self.method}, per token, symmetric={self.symmetric}"
