"""``convert``: fake quant -> explicit codes, scales and quantize / dequantize ops.

For every StatQAT quantizer in a prepared graph (ours, torch.ao's ``prepare_qat_fx``
with our qconfig, or torchao's ``prepare_qat_pt2e`` with ``StatQATQuantizer``):

* a weight quantizer becomes a :class:`~statqat_ao.quantizers.quantized.QuantizedParams` holding the
  codes of the (BN-folded) weight, read through ``statqat::dequantize``; the float
  weight is dropped;
* an activation quantizer becomes ``statqat::quantize`` -> ``statqat::dequantize``
  with its frozen scale (a shared one: the same scale for each operand);
* a folded BatchNorm becomes the add of its folded bias.

The converted model's eval output equals the prepared model's eval output bit for bit:
the same codes, the same scales, the same float32 arithmetic.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn

from statqat_ao.frontends.causal_lm import CausalLMGraph
from statqat_ao.frontends.module_swap import convert_swapped, is_swapped
from statqat_ao.numerics.codes import dequantize, quantize
from statqat_ao.quantizers.fake_quantizer import FakeQuantizer
from statqat_ao.quantizers.lsq import LSQFakeQuantize
from statqat_ao.quantizers.quantized import (
    ConvertError,
    QuantizedParams,
    check_convertible,
    check_finite_weight,
    quantizer_qparams,
    quantizer_tensor_scale,
)

from .bias_quant import BiasGrid, quantize_bias
from .constants import constant_value, is_constant
from .fold_bn import FoldedBatchNorm, deployed_fold, fold_scale
from .functionalize import functionalize_weighted_modules
from .trace import drop_string_annotations
from .train_only_dropout import remove_baked_dropout


def _quant_path(path: str) -> str:
    return path[: -len("_fake_quant")] + "_quant" if path.endswith("_fake_quant") else path + "_quant"


def _set_module(gm: nn.Module, path: str, module: nn.Module | None) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if module is None:
        delattr(owner, leaf)
    else:
        setattr(owner, leaf, module)


def convert(prepared: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn a prepared (QAT-trained) model into its quantized form.

    Args:
        prepared: a GraphModule from :func:`statqat_ao.prepare_qat_fx`, torch.ao's
            ``prepare_qat_fx`` with a StatQAT qconfig, or torchao's ``prepare_qat_pt2e``
            with :class:`~statqat_ao.StatQATQuantizer`; or a model swapped by
            :func:`statqat_ao.quantize_` (it comes back as the same class, its QAT
            linears replaced by ``QuantizedLinear``).
        inplace: convert ``prepared`` itself instead of a copy.

    Returns:
        An eval-mode model whose quantized tensors are
        :class:`~statqat_ao.quantizers.quantized.QuantizedParams` modules (``<layer>.weight_quant``,
        ``<layer>.input_quant``, ...).

    Example:
        >>> import torch, statqat_ao as sq
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(4, 16)
        >>> qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
        >>> q = sq.convert(qat)
        >>> q.get_submodule("0").weight_quant.codes.dtype, torch.equal(q(x), qat.eval()(x))
        (torch.int8, True)
    """
    if isinstance(prepared, CausalLMGraph):  # a Hugging Face decoder's graph: convert it, keep the call
        return prepared.rewrap(convert(prepared.graph_module, inplace))
    if not isinstance(prepared, fx.GraphModule):
        if is_swapped(prepared):
            return convert_swapped(prepared, inplace)
        raise ConvertError(
            f"convert takes a model prepared by sq.prepare_qat_fx, torch.ao's prepare_qat_fx, torchao's "
            f"prepare_qat_pt2e or sq.quantize_; this {type(prepared).__name__} holds no StatQAT quantizer"
        )
    gm = prepared if inplace else copy.deepcopy(prepared)
    from_torch_ao = _prepared_by_torch_ao(gm)
    _to_eval(gm)
    _remove_baked_dropout(gm)
    functionalize_weighted_modules(gm)
    graph = gm.graph
    cache: dict = {}
    # Biases first: their int32 grid reads the quantizers' scales, which become codes below.
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FoldedBatchNorm):
            _convert_folded_bn(gm, node, gm.get_submodule(node.target), cache)
        elif node.op == "call_function" and node.target is quantize_bias:
            _store_constant(gm, node, f"{node.name}_int32", cache)
    for node in list(graph.nodes):  # the int32 grids, read above
        if node.op == "call_module" and not node.users and isinstance(gm.get_submodule(node.target), BiasGrid):
            graph.erase_node(node)
    converted: dict[str, str] = {}  # quantizer path -> QuantizedParams path (PT2E reuses modules)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        if node.target in converted:  # another call of a shared quantizer
            _replace_calls(gm, node, converted[node.target])
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (FakeQuantizer, LSQFakeQuantize)):
            if getattr(mod, "fake_quant_enabled", True) is False:
                _bypass(gm, node)
                continue
            target = node.target
            check_convertible(mod, target)
            converted[target] = _convert_quantizer(gm, node, mod, cache)
    graph.eliminate_dead_code()
    _drop_unused_parameters(gm)
    graph.lint()
    drop_string_annotations(gm)
    gm.delete_all_unused_submodules()
    if from_torch_ao:
        _warn_float_weights(gm)
    return gm


def _remove_baked_dropout(gm: fx.GraphModule) -> None:
    # A converted model is an eval artifact: a dropout call whose flag the trace fixed at
    # True would keep it random, so it goes (the prepared model still drops out in eval).
    removed = remove_baked_dropout(gm)
    if removed:
        warnings.warn(
            f"statqat: {len(removed)} dropout call(s) in this graph had training=True baked in by the trace "
            f"({', '.join(removed)}): the prepared model drops out in eval too, so it differs from this converted "
            "model, which does not. For torch.ao's prepare_qat_fx call sq.torch_ao_finish_prepare(qat) before "
            "training; sq.prepare_qat_fx makes such calls modules itself.",
            stacklevel=3,
        )


def _prepared_by_torch_ao(gm: fx.GraphModule) -> bool:
    """Whether torch.ao's ``prepare_qat_fx`` made ``gm`` (its quantizers are ours, its tracer torch's)."""
    from statqat_ao.frontends.torch_ao import StatQATFakeQuantize, StatQATObserver

    return any(type(m) in (StatQATFakeQuantize, StatQATObserver) for m in gm.modules())


def float_weights(model: nn.Module) -> list[str]:
    """The weight matrices ``model`` still holds in float: parameters of 2 or more dimensions
    named ``weight`` or ``*_weight`` (``nn.MultiheadAttention``'s ``in_proj_weight``)."""
    return [
        name
        for name, p in model.named_parameters()
        if p.dim() >= 2 and (name == "weight" or name.endswith((".weight", "_weight")))
    ]


def _warn_float_weights(gm: fx.GraphModule) -> None:
    # sq.prepare_qat_fx names what it cannot quantize at prepare; torch.ao's prepare is
    # torch's, so convert names what its tracer kept away from the qconfig.
    kept = float_weights(gm)
    if kept:
        warnings.warn(
            f"statqat: {len(kept)} weight(s) of this torch.ao-prepared model had no quantizer and stay float: "
            f"{', '.join(kept)}. torch.ao's tracer keeps some ops whole (nn.MultiheadAttention, torchvision's "
            "shifted_window_attention) and quantizes only the modules it swaps; sq.prepare_qat_fx quantizes them.",
            stacklevel=3,
        )


def _convert_quantizer(gm, node, fq, cache) -> str:
    """Replace ``fq`` by its QuantizedParams (codes for a weight) and rewrite this call."""
    path = _quant_path(node.target)
    if len(node.args) == 1 and is_constant(node.args[0]):  # a weight: store its codes
        weight = deployed_weight(node.args[0], gm, cache)
        check_finite_weight(weight, path)
        params = QuantizedParams.from_tensor(weight, *quantizer_qparams(fq), fq.fmt, quantizer_tensor_scale(fq))
    else:
        params = QuantizedParams(fq.fmt, *quantizer_qparams(fq))
    _set_module(gm, node.target, None)
    _set_module(gm, path, params)
    _replace_calls(gm, node, path)
    return path


def deployed_weight(node: fx.Node, gm: fx.GraphModule, cache: dict) -> torch.Tensor:
    """The value of a constant weight node as deployment stores it (a BN fold: zero-gamma channels zeroed)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is fold_scale:
        args = [constant_value(a, gm, cache) if isinstance(a, fx.Node) else a for a in node.args]
        return deployed_fold(*args)
    return constant_value(node, gm, cache)


def _to_eval(gm: fx.GraphModule) -> None:
    try:
        gm.eval()
    except NotImplementedError:  # a torch.export module (PT2E): torchao's own switch
        from statqat_ao.frontends.pt2e import set_qat_mode

        set_qat_mode(gm, False)


def _replace_calls(gm, node, path) -> None:
    """Rewrite one call of a converted quantizer: dequantized codes, or quantize/dequantize."""
    params = gm.get_submodule(path)
    if params.codes is None:
        return _replace_activation_calls(gm, node, path, params.fmt.name)
    with gm.graph.inserting_before(node):
        args = [gm.graph.get_attr(f"{path}.{n}") for n in ("codes", "scale", "zero_point")]
        new = _leaf(gm.graph.call_function(dequantize, (*args, params.fmt.name, params.dtype)))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return None


def _leaf(node: fx.Node) -> fx.Node:
    # Kept as this call (not its op's decomposition) when fx re-traces the code: unpickling.
    node.meta["is_wrapped"] = True
    return node


def _qdq(gm, x, path, fmt_name):
    scale, zp = (gm.graph.get_attr(f"{path}.{n}") for n in ("scale", "zero_point"))
    codes = _leaf(gm.graph.call_function(quantize, (x, scale, zp, fmt_name)))
    values = _leaf(gm.graph.call_function(dequantize, (codes, scale, zp, fmt_name)))
    return gm.graph.call_method("type_as", (values, x))


def _replace_activation_calls(gm, node, path, fmt_name) -> None:
    if len(node.args) == 1:
        with gm.graph.inserting_before(node):
            new = _qdq(gm, node.args[0], path, fmt_name)
        node.replace_all_uses_with(new)
    else:  # shared: users are getitem(node, i)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise ConvertError(f"shared quantizer {node.target!r} is used by {user.name} ({user.op}), not getitem")
            with gm.graph.inserting_before(user):
                new = _qdq(gm, node.args[user.args[1]], path, fmt_name)
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _store_constant(gm, node, name: str, cache) -> None:
    """Replace a constant node by a buffer holding its value (a quantized bias)."""
    gm.register_buffer(name, constant_value(node, gm, cache).detach().clone())
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(name)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _convert_folded_bn(gm, node, bn: FoldedBatchNorm, cache) -> None:
    y = node.args[0]
    conv_bias = constant_value(node.args[1], gm, cache) if len(node.args) > 1 else None
    scale = node.kwargs.get("bias_scale")
    with torch.no_grad():
        bias = bn.deployed_bias(conv_bias, None if scale is None else constant_value(scale, gm, cache))
    path = f"{node.target}_folded_bias"
    parent, _, leaf = path.rpartition(".")
    (gm.get_submodule(parent) if parent else gm).register_buffer(leaf, bias.clone())
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(operator.add, (y, gm.graph.get_attr(path)))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _bypass(gm, node) -> None:
    if len(node.args) == 1:
        node.replace_all_uses_with(node.args[0])
    else:
        for user in list(node.users):
            user.replace_all_uses_with(node.args[user.args[1]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _drop_unused_parameters(gm: fx.GraphModule) -> None:
    """Delete parameters nothing reads any more (float weights replaced by codes, folded biases)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for path, _ in list(gm.named_parameters()):
        if path in read or any(path.startswith(c + ".") for c in called):
            continue
        owner, _, leaf = path.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if leaf == "bias":  # an int32 bias stored elsewhere: nn.Linear / nn.Conv reprs read .bias
            module._parameters[leaf] = None
        else:
            del module._parameters[leaf]
