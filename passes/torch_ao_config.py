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
from .train_only_dropout import dropout_calls_as_modules


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


def exact_zero_batch_norm_weights(model: torch.nn.Module) -> list[str]:
    """Switch torch.ao's fused conv-bn QAT modules with a zero batch-norm weight to torch's
    exact fold; return their names.

    torch.ao's ``ConvBn2d`` / ``ConvBnReLU2d`` (what ``prepare_qat_fx`` makes of Conv + BN)
    compute ``conv(x, fq(W * gamma / std)) / (gamma / std)`` by default: 0/0 in every channel
    whose ``gamma`` is 0 (timm's ``zero_init_last``, torchvision's ``zero_init_residual``), so
    the first training step is NaN. torch.ao's own slow path
    (``_enable_slow_path_for_better_numerical_stability``) runs a second conv for the batch
    statistics and never divides by ``gamma``; this turns it on for the modules that need
    it (the others keep the one-conv path). ``sq.convert`` takes both paths bit for bit.
    Call it on the prepared model, before training.

    Example:
        >>> import torch, statqat_ao as sq
        >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)).train()
        >>> torch.nn.init.zeros_(model[1].weight)  # timm's zero_init_last
        Parameter containing:
        tensor([0., 0., 0., 0.], requires_grad=True)
        >>> x = torch.randn(8, 1, 6, 6)
        >>> qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,))
        >>> sq.torch_ao_exact_zero_batch_norm_weights(qat)
        ['0']
        >>> bool(qat(x).isfinite().all())
        True
    """
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    switched = []
    for name, module in model.named_modules():
        if isinstance(module, _ConvBnNd) and bool((module.bn.weight == 0).any()):
            module._enable_slow_path_for_better_numerical_stability = True
            switched.append(name)
    return switched


def finish_prepare(model: torch.fx.GraphModule) -> dict[str, list[str]]:
    """The graph fixes a model from torch.ao's ``prepare_qat_fx`` needs before training;
    returns the names each one changed.

    * ``"exact_batch_norm_fold"``: fused conv-bn modules with a zero batch-norm weight,
      switched to torch's exact fold (:func:`exact_zero_batch_norm_weights`).
    * ``"dropout_modules"``: functional dropout calls (``F.dropout(x, p, training=self.training)``
      in a forward that also holds layers, as in timm's ghostnet head) whose flag torch's
      tracer baked in as ``True``, now ``nn.Dropout*`` modules that ``.eval()`` switches
      (:mod:`statqat_ao.passes.train_only_dropout`). Without it the prepared model drops
      out in eval, and ``sq.convert`` warns.

    Call it on the prepared model, before training; ``prepare_custom_config=``
    :func:`prepare_custom_config` covers the train-only modules, which must be kept whole
    at trace time.

    Example:
        >>> import torch, statqat_ao as sq
        >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         return self.fc(torch.nn.functional.dropout(x, 0.5, training=self.training))
        >>> x = torch.randn(16, 8)
        >>> qat = prepare_qat_fx(Net().train(), sq.statqat_qconfig, (x,))
        >>> sq.torch_ao_finish_prepare(qat)
        {'exact_batch_norm_fold': [], 'dropout_modules': ['dropout']}
        >>> _ = qat(x)
        >>> bool(torch.equal(qat.eval()(x), qat(x)))
        True
    """
    return {
        "exact_batch_norm_fold": exact_zero_batch_norm_weights(model),
        "dropout_modules": dropout_calls_as_modules(model, traced_training=True),
    }
