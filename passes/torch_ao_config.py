"""torch.ao's ``prepare_qat_fx`` with the graph pass's rule for train-only modules.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout())
    >>> [c.__name__ for c in prepare_custom_config(model).non_traceable_module_classes]
    ['Dropout']
"""

from __future__ import annotations

import torch
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

from .trace import reads_training_flag


def prepare_custom_config(model: torch.nn.Module, config: PrepareCustomConfig | None = None) -> PrepareCustomConfig:
    """torch.ao's ``PrepareCustomConfig`` that keeps ``model``'s train-only modules whole.

    torch.ao's ``prepare_qat_fx`` traces through a module like torchvision's
    ``StochasticDepth`` or timm's ``DropPath`` and bakes the trace-time
    ``self.training`` (True) into the graph: the prepared model stays random in eval, and
    so does what it converts to. Listed as non-traceable, each stays a module that
    ``.eval()`` switches. The rule is the graph pass's own: a module without parameters,
    buffers or children whose ``forward`` reads ``self.training``. ``config``: one to add to.

    Example:
        >>> import torch, statqat_ao as sq
        >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
        >>> class Drop(torch.nn.Module):  # without the config, traced with training=True: random in eval
        ...     def forward(self, x):
        ...         return torch.nn.functional.dropout(x, 0.5, training=self.training)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), Drop()).train()
        >>> x = torch.randn(8, 4)
        >>> qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,), prepare_custom_config=prepare_custom_config(model))
        >>> _ = qat(x)
        >>> bool(torch.equal(qat.eval()(x), qat(x)))
        True
    """
    config = PrepareCustomConfig() if config is None else config
    found = {type(m) for m in model.modules() if reads_training_flag(m)}
    known = list(config.non_traceable_module_classes)
    return config.set_non_traceable_module_classes(known + sorted(found - set(known), key=lambda c: c.__qualname__))
