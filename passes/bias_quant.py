"""INT32 biases: a layer that integer kernels run trains with the bias they add.

An integer GEMM / conv kernel (onnxruntime's QLinearConv, XNNPACK's qs8 conv) adds the
bias to its int32 accumulator as ``round(b / (s_x s_w))``, codes of the input scale times
each output channel's weight scale. A float bias would be rounded there, half a step of
``s_x s_w`` at most, and the deployed layer would differ from the trained one. So where a
layer's input and weight both have INT quantizers (weights per tensor or per output
channel, zero point 0), :func:`prepare <statqat_ao.passes.prepare.prepare_qat_fx>` passes its
bias (or the bias batch norm folds into it, in eval) through :func:`quantize_bias`:
training sees exactly ``round(b / (s_x s_w)) * (s_x s_w)``, with the bias's gradient
passed straight through, and convert stores that value, which every integer runtime reads
back as the same int32 codes.

Example:
    >>> s = bias_scale(torch.tensor(0.5), torch.tensor([[0.25], [0.125]]))
    >>> s
    tensor([0.1250, 0.0625])
    >>> quantize_bias(torch.tensor([0.3, -0.1]), s)
    tensor([ 0.2500, -0.1250])
"""

from __future__ import annotations

import torch
from torch import nn

from statqat_ao.frontends.qconfig import QuantSpec
from statqat_ao.numerics.formats import get_format


def integer_kernel(activation: QuantSpec | None, weight: QuantSpec | None) -> bool:
    """True when integer kernels run a layer with these quantizers (so its bias is int32):
    INT activations per tensor, INT weights per tensor or per output channel, zero point 0."""
    if activation is None or weight is None:
        return False
    return (
        get_format(activation.fmt).family == "int"
        and activation.granularity == "tensor"
        and get_format(weight.fmt).family == "int"
        and weight.granularity in ("tensor", "channel")
        and weight.axis == 0
        and weight.symmetric
    )


def bias_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``s_x * s_w`` per output channel (float32, as the runtimes compute it)."""
    return (input_scale * weight_scale).reshape(-1)


class BiasGrid(nn.Module):
    """A layer's int32 bias grid, :func:`bias_scale` of its input and weight quantizers'
    current scales, read at every call (the graph calls it as a module: a ``get_attr`` of
    the scales would be frozen into a constant when fx re-traces a pickled model).

    The quantizers are referenced, not held as submodules (no second copy in the state dict).
    """

    def __init__(self, input_quantizer: nn.Module, weight_quantizer: nn.Module):
        super().__init__()
        object.__setattr__(self, "quantizers", (input_quantizer, weight_quantizer))

    def forward(self) -> torch.Tensor | None:
        """The grid, or None while either quantizer's fake quantization is off (a float bias then)."""
        x, w = self.quantizers
        if not (x.fake_quant_enabled and w.fake_quant_enabled):
            return None
        return bias_scale(x.scale, w.scale)


def quantize_bias(bias: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``round(bias / scale) * scale`` with a straight-through gradient (``scale`` per channel or
    one value; None: the bias as it is).

    ``bias`` may be shaped to broadcast over a conv output (``[1, C, 1, 1]``): the scale
    follows its channel dimension.
    """
    if scale is None:
        return bias
    if bias.dim() > 1 and scale.numel() > 1:  # [1, C, 1, 1]: channels on dim 1
        scale = scale.reshape(1, -1, *([1] * (bias.dim() - 2)))
    rounded = torch.round(bias / scale) * scale
    return bias + (rounded - bias).detach()


# Its output is a constant convert stores and the pass must not warn about (patterns.py).
quantize_bias.statqat_weight_transform = True
