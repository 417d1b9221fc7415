"""Which graph nodes are which ops, for fx (torch functions, modules) and torch.export (aten) graphs.

Example:
    >>> import torch
    >>> from statqat_ao.passes.patterns import op_kind
    >>> gm = torch.fx.symbolic_trace(lambda a, b: torch.matmul(a, b) + a)
    >>> [op_kind(n, gm) for n in gm.graph.nodes if n.op == "call_function"]
    ['matmul', 'add']
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import opaque_functions

aten = torch.ops.aten

_FUNCTION_KINDS: dict[object, str] = {
    F.linear: "linear",
    aten.linear.default: "linear",
    F.conv1d: "conv1d",
    aten.conv1d.default: "conv1d",
    F.conv2d: "conv2d",
    aten.conv2d.default: "conv2d",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    aten.matmul.default: "matmul",
    aten.bmm.default: "matmul",
    operator.add: "add",
    torch.add: "add",
    aten.add.Tensor: "add",
    torch.cat: "cat",
    torch.concat: "cat",
    aten.cat.default: "cat",
}

# Weighted ops the pass cannot quantize: kept float and listed in one warning.
_UNSUPPORTED_FUNCTIONS = {
    F.embedding: "embedding",
    aten.embedding.default: "embedding",
    F.conv3d: "conv3d",
    aten.conv3d.default: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    aten.conv_transpose1d.default: "conv_transpose1d",
    aten.conv_transpose2d.input: "conv_transpose2d",
}

WEIGHTED_KINDS = ("linear", "conv1d", "conv2d")
# Modules with parameters that need no quantizer of their own (normalisation).
_FLOAT_BY_DESIGN = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.PReLU,
)


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """``linear``, ``conv1d``, ``conv2d``, ``matmul``, ``add``, ``cat`` or None."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method" and node.target in ("add", "matmul"):
        return node.target
    # Linear / Conv modules the pass can quantize were made functional (functionalize.py);
    # one still called as a module (e.g. a non-zero padding mode) is unsupported.
    return None


def is_float_by_design(mod: nn.Module) -> bool:
    from statqat_ao.quantizers.fake_quantizer import FakeQuantizer
    from statqat_ao.quantizers.lsq import LSQFakeQuantize

    from .fold_bn import FoldedBatchNorm

    return isinstance(mod, (*_FLOAT_BY_DESIGN, FoldedBatchNorm, FakeQuantizer, LSQFakeQuantize))


def unsupported_weighted_op(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """A description of a weighted op the pass leaves float, or None."""
    if node.op == "call_function" and node.target in _UNSUPPORTED_FUNCTIONS:
        weight = node.args[0] if node.target is aten.embedding.default else node.args[1]
        owner = weight_owner(weight)
        kind = _UNSUPPORTED_FUNCTIONS[node.target]
        return f"{owner or node.name} ({kind})"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        has_params = any(True for _ in mod.parameters(recurse=True))
        if has_params and op_kind(node, gm) is None and not is_float_by_design(mod):
            return f"{node.target} ({type(mod).__name__})"
    if (
        node.op == "call_function"
        and op_kind(node, gm) is None
        and not getattr(node.target, "statqat_weight_transform", False)
        and not opaque_functions.is_float_by_design(node.target)
    ):
        # A function the trace kept whole (torch.fx.wrap, e.g. torchvision's
        # shifted_window_attention) that reads weight matrices the pass could not give a
        # quantizer (opaque_functions.py registers those it can): they stay float.
        weights = [a.target for a in node.all_input_nodes if a.op == "get_attr" and _is_weight_matrix(gm, a.target)]
        if weights:
            name = getattr(node.target, "__name__", str(node.target))
            return f"{', '.join(weights)} (read inside {name}, which the trace keeps whole)"
    return None


def _is_weight_matrix(gm: fx.GraphModule, target: str) -> bool:
    try:
        value = gm.get_parameter(target)
    except AttributeError:
        return False
    return value.dim() >= 2


_BATCH_NORM_OPS = {
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.default,
    F.batch_norm,
}


def unfolded_batch_norm(node: fx.Node) -> str | None:
    """A batch-norm *function* after a conv: the pass folds ``nn.BatchNorm`` modules only."""
    if node.op == "call_function" and node.target in _BATCH_NORM_OPS:
        producer = node.args[0]
        if isinstance(producer, fx.Node) and producer.target in (F.conv1d, F.conv2d, aten.conv1d.default, aten.conv2d.default):
            owner = weight_owner(node.args[1]) if len(node.args) > 1 else None
            where = (
                "the torch.export path inlines batch norm modules"
                if node.target is not F.batch_norm
                else "a module calls F.batch_norm itself (e.g. timm's BatchNormAct2d); only nn.BatchNorm modules are folded"
            )
            return f"{owner or node.name} (BatchNorm after a conv, not folded: {where})"
    return None


def weight_owner(node) -> str | None:
    """For a ``get_attr`` node of a parameter ``a.b.weight``: the owner path ``a.b``."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target.rpartition(".")[0]
    return None


def is_float_activation(node, allow_inputs: bool = True) -> bool:
    """A floating-point tensor computed in the graph (or a graph input, if allowed).

    Constants, integer tensors (masks, indices) and tensors with a dimension of size 0
    (Phi-3's rotary embedding cats an empty pass-through slice) are not activations.
    """
    if not isinstance(node, fx.Node) or node.op == "get_attr":
        return False
    if node.op == "placeholder" and not allow_inputs:
        return False
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if val is None:  # torch.fx records no values: judge by what the node computes
        return not is_shape_value(node)
    if not hasattr(val, "dtype"):  # a SymInt or a Python number (torch.export's shape arithmetic)
        return False
    if hasattr(val, "shape") and any(isinstance(d, int) and d == 0 for d in val.shape):
        return False
    return val.dtype.is_floating_point


_SHAPE_METHODS = ("size", "dim", "numel")
_SHAPE_ATTRIBUTES = ("shape", "ndim")
_SCALAR_OPS = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
               operator.mod, operator.neg, math.ceil, math.floor, int, len)  # fmt: skip


def is_shape_value(node: fx.Node) -> bool:
    """Whether an fx node holds a shape or a number computed from shapes (``x.shape[-1] + 1``,
    ``x.size(2) // 7``), not a tensor."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES
    if node.op == "call_function" and node.target in _SCALAR_OPS:
        operands = node.all_input_nodes
        return bool(operands) and all(is_shape_value(a) for a in operands)
    return False


def enclosing_module(node: fx.Node) -> tuple[str, type | str | None]:
    """The qualified name and type of the innermost module that produced ``node`` ("" if none).

    torch.export records the type as its qualified class name (a string).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", None
    path, module_type = list(stack.values())[-1]
    # torch.export writes paths like "L['self'].encoder.layer[0]"; fx writes "encoder.layer.0".
    return _clean_path(path), module_type


def _clean_path(path: str) -> str:
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "")
