"""statqat-ao: quantization-aware training with statistically optimal quantizers.

Example:
    >>> import torch, statqat_ao as sq
    >>> w = torch.randn(256, 512)
    >>> s, zp = sq.estimate_qparams(w, "int4", method="analytic", granularity="channel")
    >>> sq.snr_db(w, sq.fake_quantize(w, s, zp, "int4")) > 18
    True
"""

from statqat_ao import estimators  # the package of estimators, as sq.estimators
from statqat_ao.estimators import estimate_qparams
from statqat_ao.frontends.calibrate import calibrate
from statqat_ao.frontends.module_swap import load_qat_state, quantize_
from statqat_ao.frontends.qconfig import (
    QuantSpec,
    StatQATQConfig,
    get_statqat_qconfig,
    statqat_qconfig,
)
from statqat_ao.numerics import blocks
from statqat_ao.numerics.error_model import c_opt, gaussian_snr_db
from statqat_ao.numerics.formats import Format, get_format, known_formats
from statqat_ao.numerics.metrics import snr_db
from statqat_ao.parallel import distributed, fsdp
from statqat_ao.passes import ConvertError, TraceError, convert, prepare_qat_fx
from statqat_ao.quantizers import nonfinite
from statqat_ao.quantizers.exact_division import exact_division
from statqat_ao.quantizers.fake_quant import fake_quantize
from statqat_ao.quantizers.fake_quantizer import FakeQuantizer
from statqat_ao.quantizers.lsq import LSQFakeQuantize
from statqat_ao.quantizers.nonfinite import NonFiniteError, check_finite
from statqat_ao.quantizers.quantized import QuantizedParams

__version__ = "0.1.0"

__all__ = [
    "quantize_",
    "calibrate",
    "load_qat_state",
    "StatQATConfig",
    "ConvertError",
    "exact_division",
    "NonFiniteError",
    "check_finite",
    "nonfinite",
    "StatQATQuantizer",
    "set_qat_mode",
    "torch_ao_prepare_custom_config",
    "torch_ao_exact_zero_batch_norm_weights",
    "torch_ao_finish_prepare",
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
        from statqat_ao.frontends.pt2e import StatQATQuantizer

        return StatQATQuantizer
    if name == "set_qat_mode":  # a PT2E-prepared model's train / eval switch, quantizers included
        from statqat_ao.frontends.pt2e import set_qat_mode

        return set_qat_mode
    if name == "torch_ao_prepare_custom_config":  # torch.ao's prepare_qat_fx: train-only modules kept whole
        from statqat_ao.passes.torch_ao_config import prepare_custom_config

        return prepare_custom_config
    if name == "torch_ao_exact_zero_batch_norm_weights":  # torch.ao's ConvBn2d: torch's exact fold where gamma is 0
        from statqat_ao.passes.torch_ao_config import exact_zero_batch_norm_weights

        return exact_zero_batch_norm_weights
    if name == "torch_ao_finish_prepare":  # torch.ao's prepared model: the exact fold and dropout as modules
        from statqat_ao.passes.torch_ao_config import finish_prepare

        return finish_prepare
    if name == "StatQATConfig":  # torchao's quantize_ / QATConfig: imports torchao, registers our handlers
        from statqat_ao.frontends.torchao_qat import StatQATConfig

        return StatQATConfig
    raise AttributeError(f"module 'statqat_ao' has no attribute {name!r}")
