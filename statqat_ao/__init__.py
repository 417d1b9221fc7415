"""statqat-ao: quantization-aware training with statistically optimal quantizers.

Example:
    >>> import torch, statqat_ao as sq
    >>> w = torch.randn(256, 512)
    >>> s, zp = sq.estimate_qparams(w, "int4", method="analytic", granularity="channel")
    >>> sq.snr_db(w, sq.fake_quantize(w, s, zp, "int4")) > 18
    True
"""

from . import blocks, distributed, estimators, fsdp, nonfinite
from .compile_numerics import exact_division
from .error_model import c_opt, gaussian_snr_db
from .estimators import LSQFakeQuantize, estimate_qparams
from .fake_quant import fake_quantize
from .fake_quantizer import FakeQuantizer
from .formats import Format, get_format, known_formats
from .metrics import snr_db
from .nonfinite import NonFiniteError, check_finite
from .passes import ConvertError, TraceError, convert, prepare_qat_fx
from .qconfig import QuantSpec, StatQATQConfig, get_statqat_qconfig, statqat_qconfig
from .quantized import QuantizedParams

__version__ = "0.1.0"

__all__ = [
    "ConvertError",
    "exact_division",
    "NonFiniteError",
    "check_finite",
    "nonfinite",
    "StatQATQuantizer",
    "FakeQuantizer",
    "QuantSpec",
    "QuantizedParams",
    "StatQATQConfig",
    "TraceError",
    "convert",
    "get_statqat_qconfig",
    "prepare_qat_fx",
    "statqat_qconfig",
    "blocks",
    "distributed",
    "fsdp",
    "estimators",
    "Format",
    "LSQFakeQuantize",
    "c_opt",
    "estimate_qparams",
    "fake_quantize",
    "gaussian_snr_db",
    "get_format",
    "known_formats",
    "snr_db",
]


def __getattr__(name: str):
    # The PT2E quantizer imports torchao (seconds, and CUDA-library warnings on CPU):
    # loaded on first use only.
    if name == "StatQATQuantizer":
        from .pt2e import StatQATQuantizer

        return StatQATQuantizer
    raise AttributeError(f"module 'statqat_ao' has no attribute {name!r}")
