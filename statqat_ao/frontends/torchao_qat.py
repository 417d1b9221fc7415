"""torchao's own entry point with StatQAT: ``quantize_(model, QATConfig(StatQATConfig(...), step=...))``.

:class:`StatQATConfig` is a torchao ``AOBaseConfig``. Importing this module registers
two handlers in torchao's config / handler registry:

* ``StatQATConfig`` itself: ``quantize_(model, StatQATConfig(...))`` swaps each
  ``nn.Linear`` for a StatQAT QAT linear (what :func:`statqat_ao.quantize_` does);
* ``QATConfig`` with a ``StatQATConfig`` as its base config: ``step="prepare"`` swaps
  as above, ``step="convert"`` turns each QAT linear into a ``QuantizedLinear`` (codes
  and scales, as :func:`statqat_ao.convert`). Every other ``QATConfig`` goes to
  torchao's own handler, unchanged.

torchao applies a config to the modules its ``filter_fn`` selects (by default every
``nn.Linear``); pass ``filter_fn`` to leave layers such as ``lm_head`` float, or use
:func:`statqat_ao.quantize_` for name globs and the skip list.

Example:
    >>> import torch, statqat_ao as sq
    >>> from torchao.quantization import quantize_
    >>> from torchao.quantization.qat import QATConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    >>> config = sq.StatQATConfig(weight="fp4_e2m1", weight_granularity=32, activation=None)
    >>> quantize_(model, QATConfig(config, step="prepare"))
    >>> type(model[0]).__name__
    'QATLinear'
    >>> quantize_(model, QATConfig(config, step="convert"))
    >>> type(model[0]).__name__, model[0].weight_quant.codes.dtype
    ('QuantizedLinear', torch.uint8)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.qat import QATConfig
from torchao.quantization.qat.api import QATStep
from torchao.quantization.transform_module import (
    _QUANTIZE_CONFIG_HANDLER,
    register_quantize_module_handler,
)

from statqat_ao.numerics.blocks import Granularity

from .module_swap import estimate_weight_scale, to_quantized_linear
from .qat_linear import is_qat_linear, swap_builder
from .qconfig import StatQATQConfig, get_statqat_qconfig


@dataclass
class StatQATConfig(AOBaseConfig):
    """StatQAT fake quantization as a torchao config (fields as :func:`statqat_ao.get_statqat_qconfig`).

    Example:
        >>> StatQATConfig(weight="nvfp4", activation=None).qconfig().weight.fmt
        'nvfp4'
    """

    weight: str | None = "int4"
    activation: str | None = "int8"
    weight_granularity: Granularity = "channel"
    activation_granularity: Granularity = "tensor"
    weight_method: str = "auto"
    activation_method: str = "iterative"
    weight_symmetric: bool = True
    activation_symmetric: bool = True
    weight_error: str = "auto"

    def __post_init__(self):
        self.qconfig()  # bad formats, methods or granularities fail here, not at the first module

    def qconfig(self) -> StatQATQConfig:
        """The equivalent :class:`~statqat_ao.StatQATQConfig`."""
        return get_statqat_qconfig(
            self.weight,
            self.activation,
            self.weight_granularity,
            self.activation_granularity,
            self.weight_method,
            self.activation_method,
            self.weight_symmetric,
            self.activation_symmetric,
            weight_error=self.weight_error,
        )


def _prepare(module: nn.Module, config: StatQATConfig) -> nn.Module:
    builder = swap_builder(module)
    if builder is None:
        raise ValueError(f"StatQATConfig swaps nn.Linear and transformers' Conv1D, not {type(module).__name__}")
    qconfig = config.qconfig()
    layer = builder(module, qconfig.weight, qconfig.activation)
    estimate_weight_scale(layer)
    return layer


def _convert(module: nn.Module) -> nn.Module:
    if not is_qat_linear(module):
        return module  # a layer the prepare step did not swap
    return to_quantized_linear(module, type(module).__name__)


@register_quantize_module_handler(StatQATConfig)
def _statqat_config_transform(module: nn.Module, config: StatQATConfig) -> nn.Module:
    return _prepare(module, config)


_TORCHAO_QAT_HANDLER = _QUANTIZE_CONFIG_HANDLER[QATConfig]


@register_quantize_module_handler(QATConfig)
def _qat_config_transform(module: nn.Module, config: QATConfig) -> nn.Module:
    if not isinstance(config.base_config, StatQATConfig):
        return _TORCHAO_QAT_HANDLER(module, config)
    if config.step == QATStep.PREPARE:
        return _prepare(module, config.base_config)
    return _convert(module)


__all__ = ["StatQATConfig"]
