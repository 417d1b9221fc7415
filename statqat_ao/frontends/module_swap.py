"""The eager front end: QAT that keeps the model object (``sq.quantize_``).

For models that must stay what they are (Hugging Face decoders with ``generate()``,
``save_pretrained``, PEFT adapters, per-layer FSDP2, training loops that call the
model with keywords), :func:`quantize_` swaps, in place, every ``nn.Linear`` (and GPT-2's
``Conv1D``) that the qconfig quantizes for a :class:`~statqat_ao.frontends.qat_linear.QATLinear`.
The qconfig is the graph pass's: name-glob and type overrides and the skip list apply
to module names as ``model.named_modules()`` gives them. :func:`convert_swapped` (what
``sq.convert`` runs on such a model) turns each QAT linear into a
:class:`~statqat_ao.quantizers.quantized_linear.QuantizedLinear` holding codes and scales.

Example:
    >>> import torch, statqat_ao as sq
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> qconfig = sq.get_statqat_qconfig("fp4_e2m1", activation=None, weight_granularity=16, skip=["2"])
    >>> model = sq.quantize_(model, qconfig)
    >>> type(model[0]).__name__, type(model[2]).__name__
    ('QATLinear', 'Linear')
    >>> x = torch.randn(4, 32)
    >>> converted = sq.convert(model)
    >>> torch.equal(converted(x), model.eval()(x))
    True
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from statqat_ao.quantizers.dynamic import DynamicQuantizer
from statqat_ao.quantizers.nonfinite import NonFiniteTracking, name_quantizers
from statqat_ao.quantizers.quantized import (
    ConvertError,
    QuantizedParams,
    check_convertible,
    check_finite_weight,
    quantizer_qparams,
    quantizer_tensor_scale,
)
from statqat_ao.quantizers.quantized_linear import QuantizedLinear

from .qat_linear import is_qat_linear, swap_builder
from .qconfig import StatQATQConfig, statqat_qconfig


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def estimate_weight_scale(layer: nn.Module) -> None:
    """The weight's first scale now, at swap time (an optimizer built next sees its final shape)."""
    fq = layer.weight_fake_quant
    if fq is None:
        return
    fq(layer.weight_out_in())
    if isinstance(fq, NonFiniteTracking):
        fq.restart_update_count()  # updates number the training steps


def quantize_(
    model: nn.Module,
    qconfig: StatQATQConfig = statqat_qconfig,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
) -> nn.Module:
    """Swap, in place, every linear ``qconfig`` quantizes for a StatQAT QAT linear.

    Args:
        model: any ``nn.Module`` (a Hugging Face ``PreTrainedModel`` stays one: its class,
            ``generate()``, ``config`` and parameter names are untouched).
        qconfig: a :class:`~statqat_ao.StatQATQConfig` (``sq.get_statqat_qconfig(...)``);
            ``activation=None`` gives weight-only QAT, the LLM recipe. Typical:
            ``.skip("lm_head")``.
        example_inputs, example_kwargs: a batch to run one forward on (no gradient, no
            training update), so activation scales start from it here rather than at the
            first training step: a compiled training step then sees only the warm update
            (the cold start's least-squares restarts make a larger graph to compile).

    Returns:
        ``model`` itself. Weight scales are estimated here; activation scales here with
        ``example_inputs``, else at the first forward. Weights that stay float
        (embeddings, skipped layers) are named in one warning.

    Raises:
        ValueError: nothing in ``model`` is quantized by ``qconfig``.

    Example:
        >>> import torch, statqat_ao as sq
        >>> model = sq.quantize_(torch.nn.Sequential(torch.nn.Linear(16, 16)), sq.get_statqat_qconfig("int4", None))
        >>> model[0].weight_fake_quant.scale.shape
        torch.Size([16, 1])
    """
    swapped: list[str] = []
    kept_float: list[str] = []
    for name, module in list(model.named_modules()):
        builder = swap_builder(module)
        if builder is None:
            if _has_matrix_weight(module) and not is_qat_linear(module):
                kept_float.append(f"{name or '<root>'} ({type(module).__name__})")
            continue
        specs = qconfig.for_module(name, module)
        if specs is None or (specs.weight is None and specs.activation is None):
            kept_float.append(f"{name} ({type(module).__name__}, skipped by the qconfig)")
            continue
        layer = builder(module, specs.weight, specs.activation)
        if name:
            _set_submodule(model, name, layer)
        else:
            raise ValueError("quantize_ swaps submodules; wrap a bare linear layer in a container (nn.Sequential)")
        estimate_weight_scale(layer)
        swapped.append(name)
    if not swapped:
        raise ValueError(
            f"quantize_ found no linear layer to quantize in {type(model).__name__} with {qconfig!r}: "
            "it swaps nn.Linear and transformers' Conv1D; check the skip list and overrides"
        )
    name_quantizers(model)
    if example_inputs is not None or example_kwargs is not None:
        _initialising_forward(model, tuple(example_inputs or ()), dict(example_kwargs or {}))
    if kept_float:
        warnings.warn(
            f"statqat_ao.quantize_: {len(kept_float)} weight(s) stay float: {', '.join(kept_float)}",
            stacklevel=2,
        )
    return model


@torch.no_grad()
def _initialising_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    was_training = model.training
    model.eval()  # statistics: cold quantizers estimate, warm ones keep their scales
    try:
        model(*args, **kwargs)
    finally:
        model.train(was_training)
    for m in model.modules():
        if isinstance(m, NonFiniteTracking):
            m.restart_update_count()


def _has_matrix_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and "weight" in module._parameters


def is_swapped(model: nn.Module) -> bool:
    """Whether ``model`` holds QAT linears from :func:`quantize_`."""
    return any(is_qat_linear(m) for m in model.modules())


def to_quantized_linear(layer: nn.Module, path: str) -> QuantizedLinear:
    """The :class:`QuantizedLinear` of one trained QAT linear (``path``: its name, for errors)."""
    fq = layer.weight_fake_quant
    if fq is None or not getattr(fq, "fake_quant_enabled", True):
        raise ConvertError(
            f"{path!r} quantizes its input but keeps its weight float: convert stores weight codes. "
            "Give it a weight spec or skip it in the qconfig"
        )
    check_convertible(fq, f"{path}.weight_fake_quant")
    weight = layer.weight_out_in().detach()
    check_finite_weight(weight, f"{path}.weight_fake_quant")
    weight_quant = QuantizedParams.from_tensor(weight, *quantizer_qparams(fq), fq.fmt, quantizer_tensor_scale(fq))
    input_quant = None
    afq = layer.input_fake_quant
    if isinstance(afq, DynamicQuantizer):  # per token: stateless, applied as it trained
        input_quant = afq if afq.fake_quant_enabled else None
    elif afq is not None and getattr(afq, "fake_quant_enabled", True):
        check_convertible(afq, f"{path}.input_fake_quant")
        input_quant = QuantizedParams(afq.fmt, *quantizer_qparams(afq))
    bias = None if layer.bias is None else layer.bias.detach()
    return QuantizedLinear(weight_quant, bias, input_quant).to(weight.device)


def convert_swapped(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every QAT linear of a :func:`quantize_`-d model by its :class:`QuantizedLinear`.

    Returns the model (a copy unless ``inplace``), of the same class, in eval mode: its
    eval output equals the QAT model's eval output bit for bit.
    """
    out = model if inplace else copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if is_qat_linear(module):
            _set_submodule(out, name, to_quantized_linear(module, name))
    return out.eval()


def _read_checkpoint(checkpoint: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        return checkpoint
    folder = Path(checkpoint)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file (save it with model.save_pretrained)")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_qat_state(model: nn.Module, checkpoint: str | os.PathLike | dict[str, torch.Tensor]) -> nn.Module:
    """Load the quantizers' state (scales, estimator state, LSQ scales) saved with a swapped model.

    For ``save_pretrained`` -> ``from_pretrained`` round trips: ``from_pretrained`` builds the
    float model and loads its weights (it skips the quantizer keys as unexpected);
    :func:`quantize_` with the same qconfig swaps the layers again; this loads their state,
    so the model computes (and resumes training) exactly as the saved one.

    Args:
        model: a model after :func:`quantize_`.
        checkpoint: a folder written by ``save_pretrained`` (its ``*.safetensors`` files),
            one safetensors file, or a state dict.

    Raises:
        ValueError: the checkpoint lacks state for some quantizer of ``model`` (saved from a
            model quantized with another qconfig, or before :func:`quantize_`).

    Example:
        >>> import torch, statqat_ao as sq
        >>> qconfig = sq.get_statqat_qconfig("int4", None)
        >>> trained = sq.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), qconfig)
        >>> fresh = sq.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), qconfig)
        >>> fresh = load_qat_state(fresh, trained.state_dict())
        >>> torch.equal(fresh[0].weight_fake_quant.scale, trained[0].weight_fake_quant.scale)
        True
    """
    state = _read_checkpoint(checkpoint)
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, NonFiniteTracking))
    if not prefixes:
        raise ValueError(f"{type(model).__name__} holds no StatQAT quantizer: call sq.quantize_ first")
    expected = {k for k in model.state_dict() if k.startswith(prefixes)}
    missing = sorted(expected - state.keys())
    if missing:
        raise ValueError(
            f"the checkpoint holds no state for {len(missing)} of {len(expected)} quantizer tensors "
            f"(e.g. {', '.join(missing[:3])}): it was saved from a model quantized with another qconfig, "
            "or before sq.quantize_"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    return model


__all__ = ["convert_swapped", "is_swapped", "load_qat_state", "quantize_", "to_quantized_linear"]
