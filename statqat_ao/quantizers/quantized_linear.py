"""``QuantizedLinear``: what :func:`statqat_ao.convert` makes of a swapped QAT linear.

It holds the weight's codes and scales (a :class:`~statqat_ao.quantizers.quantized.QuantizedParams`,
the same representation every backend reads), the input's frozen scale when the layer
quantized its input, and the bias. Its forward computes exactly what the QAT linear
computes in eval: the same codes, the same scales, the same float32 arithmetic.

Example:
    >>> import torch
    >>> from statqat_ao.estimators import estimate_qparams
    >>> w = torch.randn(8, 32)
    >>> s, zp = estimate_qparams(w, "int4", granularity="channel")
    >>> layer = QuantizedLinear(QuantizedParams.from_tensor(w, s, zp, "int4"), bias=torch.zeros(8))
    >>> layer(torch.randn(2, 32)).shape, layer.weight_quant.codes.dtype
    (torch.Size([2, 8]), torch.int8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dynamic import DynamicQuantizer
from .quantized import QuantizedParams


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as codes (``y = x W^T + b``).

    Attributes:
        weight_quant: the weight's format, codes and scales (``[out, in]`` codes).
        input_quant: the input's format and frozen scale, a per-token
            :class:`~statqat_ao.quantizers.dynamic.DynamicQuantizer`, or None (weight-only).
        bias: the float bias, or None.
        in_features, out_features: as ``nn.Linear``.
    """

    def __init__(
        self,
        weight_quant: QuantizedParams,
        bias: torch.Tensor | None = None,
        input_quant: QuantizedParams | DynamicQuantizer | None = None,
    ):
        super().__init__()
        if weight_quant.codes is None or weight_quant.codes.dim() != 2:
            raise ValueError("QuantizedLinear needs the 2-D codes of a weight [out_features, in_features]")
        self.out_features, self.in_features = weight_quant.codes.shape
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant.quantize_dequantize(x)
        return F.linear(x, self.weight_quant.dequantize(), self.bias)

    def extra_repr(self) -> str:
        act = "weight-only" if self.input_quant is None else f"input={self.input_quant.fmt.name}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_quant.fmt.name} ({self.weight_quant.granularity}), {act}"
        )
