"""Graph transforms over torch.fx GraphModules and torch.export programs.

``prepare_qat_fx`` (trace, fold BatchNorm, insert fake quant) and ``convert`` (fake
quant -> explicit codes, scales and quantize/dequantize ops).
"""

from .convert import ConvertError, convert
from .prepare import prepare_qat_fx
from .trace import TraceError, trace

__all__ = ["ConvertError", "TraceError", "convert", "prepare_qat_fx", "trace"]
