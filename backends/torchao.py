"""Lower a converted model's Linear weights to torchao tensor subclasses.

Each Linear whose weight convert stored as codes gets a torchao tensor built from those
codes and scales (see :mod:`statqat_ao.backends.torchao_tensors` for which type each
format becomes); ``F.linear`` then dispatches to torchao's kernels. Convolution weights
and the activation quantize / dequantize ops stay as convert wrote them.

Checks, in order:

1. before any work, every Linear weight's format must be one torchao can hold;
2. each torchao weight must dequantize to exactly the converted weight (torchao's own
   ``dequantize``; for the packed INT4 kernel, the kernel applied to an identity);
   a packed INT4 layer that is not exact is stored unpacked instead, other mismatches raise;
3. with ``example_inputs``, the lowered model's output must match the converted model's
   up to float accumulation order.

Example:
    >>> import torch, statqat_ao as sq
    >>> from statqat_ao.backends.torchao import lower
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    >>> x = torch.randn(4, 64)
    >>> qc = sq.get_statqat_qconfig("int4", "int8", weight_granularity=32)
    >>> q = sq.convert(sq.prepare_qat_fx(model, qc, (x,)))
    >>> lowered = lower(q, (x,))
    >>> [(w.path, w.tensor_type) for w in lowered.lowered_weights]
    [('0.weight', 'Int4OpaqueTensor'), ('2.weight', 'Int4OpaqueTensor')]
    >>> torch.allclose(lowered(x), q(x), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from statqat_ao.passes.constants import get_attr
from torch import fx, nn

from statqat_ao.frontends.causal_lm import CausalLMGraph
from statqat_ao.quantizers.dynamic import DynamicQuantizer
from statqat_ao.quantizers.quantized import QuantizedParams
from statqat_ao.quantizers.quantized_linear import QuantizedLinear

from . import torchao_tensors as tt
from .layer_parity import check_layers
from .parity import (
    ParityError,
    UnsupportedModelError,
    as_tuple,
    check_formats,
    check_parity,
    linear_weight_reads,
    quantized_tensors,
)

SUPPORTED = (
    "Linear weights in int2-int8 (signed or unsigned, per tensor, per channel or per group), "
    "nvfp4 and mxfp4; convolution weights and activations in any format stay as convert wrote them"
)


@dataclass(frozen=True)
class LoweredWeight:
    """One Linear weight after lowering: where it lives, what holds it and its size."""

    path: str
    fmt: str
    tensor_type: str
    float_bytes: int  # the trained weight in its float dtype
    stored_bytes: int  # codes + scales + zero points in the torchao tensor


class TorchaoLinear(nn.Module):
    """A converted linear whose weight is a torchao tensor (``F.linear`` dispatches to torchao).

    The input's quantize / dequantize (a W*A* model) runs as convert wrote it.
    """

    def __init__(self, layer: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = layer.bias
        self.input_quant = layer.input_quant
        self.dtype = layer.weight_quant.dtype
        # MXTensor is emulated: torchao has no weight-only MX linear, so it is dequantized first.
        self.dequantize_weight = type(weight).__name__ == "MXTensor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant.quantize_dequantize(x)
        w = self.weight.dequantize(self.dtype) if self.dequantize_weight else self.weight
        return nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={type(self.weight).__name__}"


def lower(
    model: nn.Module,
    example_inputs: Sequence | torch.Tensor | None = None,
    *,
    pack_int4: bool = True,
    tolerance: float = 1e-3,
    inplace: bool = False,
) -> fx.GraphModule:
    """Give a converted model's Linear weights torchao tensor types (codes and scales kept).

    Args:
        model: what :func:`statqat_ao.convert` returned: a GraphModule, or a model
            swapped by :func:`statqat_ao.quantize_` (its ``QuantizedLinear`` layers become
            :class:`TorchaoLinear`; a Hugging Face model stays one, ``generate()`` included).
        example_inputs: inputs to check the lowered model's output against ``model``'s.
            Without them, only the weights are checked (exactly).
        pack_int4: INT4 weights with groups of 32, 64 or 128 (or per channel with rows
            they divide) and a multiple of 16 output features use the packed CPU
            kernel (``Int4OpaqueTensor``); other INT weights ``IntxUnpackedToInt8Tensor``
            (symmetric INT8 per channel: ``Int8Tensor``).
        tolerance: largest output error relative to the output's magnitude, for models
            whose activations stay float. With quantized activations the check is per layer
            (:mod:`statqat_ao.backends.layer_parity`): each lowered linear, fed the converted
            model's own inputs, must match the converted layer within the float rounding of
            its dot products; end to end an activation code may flip at a rounding tie, and a
            larger output difference is reported in a warning, not raised.
        inplace: lower ``model`` itself instead of a copy.

    Returns:
        The lowered model; ``.lowered_weights`` lists each :class:`LoweredWeight`.

    Raises:
        UnsupportedModelError: a Linear weight's format torchao cannot hold (before any work).
        ParityError: a torchao weight, a lowered layer or the output differs from the converted model.
    """
    if not isinstance(model, (fx.GraphModule, CausalLMGraph)):
        return _lower_modules(model, example_inputs, pack_int4, tolerance, inplace)
    # A decoder's graph (CausalLMGraph) is lowered inside its calling convention.
    graph, wrap = (model.graph_module, model.rewrap) if isinstance(model, CausalLMGraph) else (model, lambda g: g)
    recorded = None if example_inputs is None else _graph_linear_inputs(graph, wrap, as_tuple(example_inputs))
    reference = None if example_inputs is None else _reference(model, example_inputs)
    gm = _lower_graph(graph, pack_int4, inplace)
    out = wrap(gm)
    out.lowered_weights = gm.lowered_weights
    if example_inputs is not None:
        checks = [
            (w.path, recorded[read], _as_weight(get_attr(gm, w.path), p), p.dequantize())
            for w, (read, p) in zip(gm.lowered_weights, gm.lowered_params, strict=True)
            if read in recorded
        ]
        check_layers(checks, "torchao")
        _check_output(model, out, example_inputs, tolerance, reference)
    return out


def _lower_graph(model: fx.GraphModule, pack_int4: bool, inplace: bool) -> fx.GraphModule:
    reads = linear_weight_reads(model)
    linear_paths = {path for _, _, path in reads}
    check_formats(model, "torchao", lambda path, p: _unsupported(p) if path in linear_paths else None, SUPPORTED)
    if not reads:
        raise UnsupportedModelError(
            "no Linear reads its weight from codes (statqat_ao.numerics.codes.dequantize on a QuantizedParams): "
            "nothing to lower. Quantize the Linear weights in the qconfig; a converted model reloaded with "
            "torch.load(whole module) has its weights folded to floats, save it with "
            "statqat_ao.tools.saved_model.save_converted instead"
        )
    gm = model if inplace else copy.deepcopy(model)
    params = [(path, gm.get_submodule(path)) for _, _, path in linear_weight_reads(gm)]
    lowered = []
    for linear, deq_node, path in linear_weight_reads(gm):
        # torch.export graphs call aten.linear, which decomposes below torchao's tensors
        # (aten.t); F.linear is the call torchao implements.
        linear.target = nn.functional.linear
        lowered.append(_lower_one(gm, deq_node, path, pack_int4))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.lowered_weights = lowered
    gm.lowered_params = params  # (QuantizedParams path, QuantizedParams) of each, in lowering order
    return gm


_RECORDED: dict[str, torch.Tensor] = {}


def _recording_linear(key: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    _RECORDED.setdefault(key, x.detach().clone())
    return nn.functional.linear(x, weight, bias)


@torch.no_grad()
def _graph_linear_inputs(graph: fx.GraphModule, wrap, args: tuple) -> dict[str, torch.Tensor]:
    """The input each codes-reading linear of ``graph`` sees on ``args`` (its QuantizedParams path -> x)."""
    probe = copy.deepcopy(graph)
    for linear, _, path in linear_weight_reads(probe):
        linear.target = _recording_linear
        linear.args = (path, *linear.args)
    probe.recompile()
    _RECORDED.clear()
    try:
        wrap(probe)(*args)
        return dict(_RECORDED)
    finally:
        _RECORDED.clear()


@torch.no_grad()
def _reference(model: nn.Module, example_inputs):
    return _main_output(model(*as_tuple(example_inputs)))


def _as_weight(t: torch.Tensor, p: QuantizedParams) -> torch.Tensor:
    # MXTensor is emulated (dequantized in the graph); every other torchao tensor goes to F.linear.
    return t.dequantize(p.dtype) if type(t).__name__ == "MXTensor" else t


def _lower_modules(model: nn.Module, example_inputs, pack_int4: bool, tolerance: float, inplace: bool) -> nn.Module:
    """:func:`lower` for a converted eager model: each ``QuantizedLinear`` becomes a :class:`TorchaoLinear`."""
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    weight_paths = {f"{path}.weight_quant" for path, _ in layers}
    check_formats(model, "torchao", lambda path, p: _unsupported(p) if path in weight_paths else None, SUPPORTED)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} holds no QuantizedLinear: convert a model swapped by statqat_ao.quantize_ first"
        )
    recorded, reference = {}, None
    if example_inputs is not None:  # the converted model's own layer inputs, and its output
        hooks = [
            m.register_forward_pre_hook(lambda mod, a, path=path: recorded.setdefault(path, a[0].detach().clone()))
            for path, m in layers
        ]
        try:
            reference = _reference(model, example_inputs)
        finally:
            for h in hooks:
                h.remove()
    out = model if inplace else copy.deepcopy(model)
    lowered, checks = [], []
    for path, _ in layers:
        layer = out.get_submodule(path)
        p = layer.weight_quant
        weight = _build_exact(p, f"{path}.weight", pack_int4)
        parent, _, leaf = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, TorchaoLinear(layer, weight))
        float_bytes = p.codes.numel() * torch.empty((), dtype=p.dtype).element_size()
        lowered.append(LoweredWeight(f"{path}.weight", p.fmt.name, type(weight).__name__, float_bytes, tt.stored_bytes(weight)))
        if path in recorded:
            checks.append((f"{path}.weight", recorded[path], _as_weight(weight, p), p.dequantize()))
    out.lowered_weights = lowered
    if example_inputs is not None:
        check_layers(checks, "torchao")
        _check_output(model, out, example_inputs, tolerance, reference)
    return out


def _check_output(model: nn.Module, lowered: nn.Module, example_inputs, tolerance: float, reference) -> None:
    """End to end: raise beyond ``tolerance`` where activations stay float; else warn (see :func:`lower`)."""
    args = as_tuple(example_inputs)
    with torch.no_grad():
        got = _main_output(lowered(*args))
    dynamic = any(isinstance(m, DynamicQuantizer) for m in model.modules())
    if not dynamic and not any(p.codes is None for _, p in quantized_tensors(model)):
        check_parity(reference, got, backend="torchao", tolerance=tolerance)
        return
    try:
        check_parity(reference, got, backend="torchao", tolerance=tolerance)
    except ParityError as err:
        warnings.warn(
            f"{err}. Every lowered linear matched its converted layer on the converted model's own inputs "
            "within float rounding; with quantized activations, an activation code can flip where a layer's "
            "output lies within rounding of a code boundary, and the difference travels to the output",
            stacklevel=3,
        )


def _main_output(out):
    # A Hugging Face model returns a ModelOutput with its cache: compare the logits.
    return out.logits if hasattr(out, "logits") else out


def _unsupported(p: QuantizedParams) -> str | None:
    f = p.fmt
    if p.codes is None or p.codes.dim() != 2:
        return "not a 2-D weight with codes"
    if f.family == "int" or f.name in ("nvfp4", "mxfp4"):
        return None
    return "torchao has no tensor type for these codes with our scales"


def _builders(p: QuantizedParams, pack_int4: bool):
    f, g = p.fmt, p.granularity
    if f.name == "nvfp4":
        return [tt.nvfp4_tensor]
    if f.name == "mxfp4":
        return [tt.mxfp4_tensor]
    if pack_int4 and tt.int4_packed_group(p) is not None:
        return [tt.int4_packed_tensor, tt.intx_tensor]  # packed where exact, else unpacked
    if f.bits == 8 and f.signed and g in ("channel", "tensor") and not bool(p.zero_point.any()):
        return [tt.int8_tensor]
    return [tt.intx_tensor]


def _dequantized(t: torch.Tensor, p: QuantizedParams) -> torch.Tensor:
    if type(t).__name__ == "Int4OpaqueTensor":  # no dequantize op: run the kernel on an identity
        k = p.codes.shape[1]
        return nn.functional.linear(torch.eye(k, dtype=p.dtype), t).t()
    return t.dequantize(p.dtype) if type(t).__name__ in ("NVFP4Tensor", "MXTensor") else t.dequantize()


def _build_exact(p: QuantizedParams, path: str, pack_int4: bool) -> torch.Tensor:
    expected = p.dequantize()
    for i, build in enumerate(candidates := _builders(p, pack_int4)):
        try:
            t = build(p)
            got = _dequantized(t, p)
        except (RuntimeError, ValueError, AssertionError) as err:
            reason = f"{type(err).__name__}: {err}"
        else:
            if torch.equal(got, expected):
                return t
            reason = f"max |difference| {float((got.float() - expected.float()).abs().max()):.3g}"
        if i + 1 < len(candidates):
            warnings.warn(f"{path}: {build.__name__} failed or is inexact ({reason}); using {candidates[i + 1].__name__}", stacklevel=3)
    raise ParityError(f"torchao weight for {path} ({p.fmt.name}) does not dequantize to the converted weight: {reason}")


def _lower_one(gm: fx.GraphModule, deq_node: fx.Node, path: str, pack_int4: bool) -> LoweredWeight:
    p: QuantizedParams = gm.get_submodule(path)
    weight = _build_exact(p, path, pack_int4)
    owner_path, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name = leaf.removesuffix("_quant")
    while hasattr(owner, name):
        name += "_torchao"
    owner.register_parameter(name, nn.Parameter(weight, requires_grad=False))
    target = f"{owner_path}.{name}" if owner_path else name
    with gm.graph.inserting_before(deq_node):
        new = gm.graph.get_attr(target)
        if type(weight).__name__ == "MXTensor":  # emulated: torchao has no weight-only MX linear
            new = gm.graph.call_method("dequantize", (new, p.dtype))
    deq_node.replace_all_uses_with(new)
    gm.graph.erase_node(deq_node)
    float_bytes = p.codes.numel() * torch.empty((), dtype=p.dtype).element_size()
    return LoweredWeight(target, p.fmt.name, type(weight).__name__, float_bytes, tt.stored_bytes(weight))


def weight_bytes(lowered: fx.GraphModule) -> tuple[int, int]:
    """``(float bytes, stored bytes)`` summed over the lowered Linear weights.

    Example:
        >>> weight_bytes(type("M", (), {"lowered_weights": [LoweredWeight("fc.weight", "int4", "T", 4096, 640)]})())
        (4096, 640)
    """
    return sum(w.float_bytes for w in lowered.lowered_weights), sum(w.stored_bytes for w in lowered.lowered_weights)


__all__ = ["LoweredWeight", "QuantizedParams", "TorchaoLinear", "lower", "weight_bytes"]
