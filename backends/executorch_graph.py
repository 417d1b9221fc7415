"""Rewrite a converted graph into the quantized ops XNNPACK's partitioner recognises.

The converted model reads weights as ``statqat::dequantize(codes, scale, zero_point)``
and quantizes activations with ``statqat::quantize -> statqat::dequantize``. XNNPACK
lowers the ``quantized_decomposed`` ops a PT2E-converted model holds, so each of ours
becomes its ``quantized_decomposed`` twin, fed with the very codes, scales and zero
points that convert stored (reshaped, never re-estimated):

* static (W8A8): activations ``quantize_per_tensor -> dequantize_per_tensor`` (int8;
  an unsigned grid is shifted by -128, which keeps every value); weights
  ``dequantize_per_channel`` (axis 0) or ``dequantize_per_tensor`` on the int8 codes.
  XNNPACK runs a GEMM in int8 only when its output is requantized (optionally through a
  ReLU); a GEMM whose output the model leaves float runs as an fp32 XNNPACK GEMM on the
  dequantized codes (its input is still quantized exactly as in the converted model).
* dynamic (8da4w): weights ``dequantize_per_channel_group`` / ``dequantize_per_channel``,
  and each quantized Linear's input gets per-token asymmetric int8 quantization
  (``choose_qparams_per_token_asymmetric -> quantize_per_token -> dequantize_per_token``).

Example:
    >>> import torch, statqat_ao as sq
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(4, 16)
    >>> q = sq.convert(sq.prepare_qat_fx(model, sq.get_statqat_qconfig("int8", "int8"), (x,)))
    >>> gm, counts = rewrite_static(q)
    >>> counts
    {'int8_gemms': 1, 'fp32_gemms': 1}
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from torch import fx, nn

from statqat_ao.numerics import codes
from statqat_ao.quantizers.quantized import QuantizedParams

_QD = torch.ops.quantized_decomposed
_QUANTIZE = (codes.quantize, torch.ops.statqat.quantize.default)
_DEQUANTIZE = (codes.dequantize, torch.ops.statqat.dequantize.default)
_LINEAR = (torch._C._nn.linear, nn.functional.linear, torch.ops.aten.linear.default)
_CONV = (torch.conv1d, torch.conv2d, nn.functional.conv1d, nn.functional.conv2d)
_FUSED_ACTS = (torch.relu, nn.functional.relu, nn.functional.relu6, nn.functional.hardtanh)
_ADD = (operator.add, torch.add)
# Ops that commute exactly with a monotonic per-tensor quantize: q(op(y)) == op(q(y)).
_COMMUTING_FUNCTIONS = (nn.functional.max_pool1d, nn.functional.max_pool2d, torch.max_pool2d, torch.flatten, torch.relu, nn.functional.relu)
_COMMUTING_METHODS = ("flatten", "reshape", "view", "relu")
_FUSED_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_COMMUTING_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)


ACTIVATION_INDEX = "statqat_activation_index"  # node meta: which converted quantize call a Q node is


def with_activation_codes(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of a :func:`rewrite_static` graph that also returns every activation quantizer's
    int8 codes (after the model's outputs), and the zero point (shift included) of each."""
    probe = copy.deepcopy(gm)
    nodes = sorted((n for n in probe.graph.nodes if ACTIVATION_INDEX in n.meta), key=lambda n: n.meta[ACTIVATION_INDEX])
    output = next(n for n in probe.graph.nodes if n.op == "output")
    outputs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    output.args = ((*outputs, *nodes),)
    probe.recompile()
    return probe, [int(n.args[2]) for n in nodes]


def rewrite_static(model: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``model`` on ``quantized_decomposed`` ops, and its GEMM counts.

    Example: see the module docstring.
    """
    gm = copy.deepcopy(model)
    activation_index = 0
    for node in list(gm.graph.nodes):
        if _calls(node, _QUANTIZE) or _calls(node, _DEQUANTIZE):
            new = _replace(gm, node, _static_op(gm, node))
            if _calls(node, _QUANTIZE):  # the converted model's k-th activation quantizer
                new.meta[ACTIVATION_INDEX] = activation_index
                activation_index += 1
    _drop_type_as(gm)
    counts = {"int8_gemms": 0, "fp32_gemms": 0}
    for node in list(gm.graph.nodes):
        if _calls(node, _LINEAR + _CONV) and _is_weight_dq(_arg(node, 1)):
            _fold_bias_add(gm, node)
            _requantize_early(gm, node)
            if _requantized(gm, node) and _arg(node, 0) is not None and _is_act_dq(_arg(node, 0)):
                counts["int8_gemms"] += 1
            else:  # XNNPACK has no int8 GEMM with a float output: run it in fp32 on the codes' values
                _use_float_weight(gm, node)
                counts["fp32_gemms"] += 1
    return _finish(gm), counts


def rewrite_dynamic(model: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``model`` with dynamic int8 per-token activations on its quantized Linears.

    Example:
        >>> import torch, statqat_ao as sq
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 8))
        >>> x = torch.randn(4, 64)
        >>> qc = sq.get_statqat_qconfig("int4", None, weight_granularity=32)
        >>> gm, counts = rewrite_dynamic(sq.convert(sq.prepare_qat_fx(model, qc, (x,))))
        >>> counts
        {'dynamic_gemms': 1}
    """
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        if _calls(node, _DEQUANTIZE):
            _replace(gm, node, _weight_dq(gm, node, grouped_ok=True))
    count = 0
    for node in list(gm.graph.nodes):
        if _calls(node, _LINEAR) and _is_weight_dq(_arg(node, 1)):
            _insert_per_token_qdq(gm, node)
            count += 1
    return _finish(gm), {"dynamic_gemms": count}


def params_of(gm: nn.Module, node: fx.Node) -> tuple[str, QuantizedParams]:
    """``(path, QuantizedParams)`` read by a statqat quantize/dequantize node (through its scale)."""
    scale = node.args[1]
    path = scale.target.rpartition(".")[0]
    return path, gm.get_submodule(path)


def int8_range(p: QuantizedParams) -> tuple[int, int, int]:
    """``(shift, qmin, qmax)`` of an 8-bit grid held in int8: unsigned grids move down by 128."""
    shift = 0 if p.fmt.signed else -128
    return shift, int(p.fmt.qmin) + shift, int(p.fmt.qmax) + shift


# ---- node construction ---------------------------------------------------------------


def _static_op(gm, node) -> tuple:
    path, p = params_of(gm, node)
    if p.codes is not None:
        return _weight_dq(gm, node, grouped_ok=False)
    shift, qmin, qmax = int8_range(p)
    scale, zp = float(p.scale), int(p.zero_point) + shift
    op = _QD.quantize_per_tensor.default if _calls(node, _QUANTIZE) else _QD.dequantize_per_tensor.default
    return op, (node.args[0], scale, zp, qmin, qmax, torch.int8)


def _weight_dq(gm, node, grouped_ok: bool) -> tuple:
    path, p = params_of(gm, node)
    codes_node, qmin, qmax = node.args[0], int(p.fmt.qmin), int(p.fmt.qmax)
    if p.codes.dim() > 2:
        # XNNPACK reads a narrower range as packed 4-bit weights (qc4w), which it takes for
        # 2-D (Linear) weights only; declaring int8's range leaves the codes and values as they are.
        qmin, qmax = -128, 127
    g = p.granularity
    if g == "tensor":
        return _QD.dequantize_per_tensor.default, (codes_node, float(p.scale), 0, qmin, qmax, torch.int8)
    if g == "channel":
        scale, zp = _buffers(gm, node, path, p.scale.reshape(-1), p.zero_point.reshape(-1))
        return _QD.dequantize_per_channel.default, (codes_node, scale, zp, 0, qmin, qmax, torch.int8)
    if not grouped_ok:
        raise ValueError(f"{path}: group weights need dynamic activations (activations='dynamic_int8')")
    rows = p.codes.shape[0]
    scale, zp = _buffers(gm, node, path, p.scale.reshape(rows, -1), p.zero_point.reshape(rows, -1))
    args = (codes_node, scale, zp, qmin, qmax, torch.int8, int(g), torch.float32)
    return _QD.dequantize_per_channel_group.default, args


def _buffers(gm, node, path, scale, zero_point) -> tuple[fx.Node, fx.Node]:
    """get_attr nodes of the scale / zero point in the layout the op wants (a view of convert's)."""
    p = gm.get_submodule(path)
    p.register_buffer("xnnpack_scale", scale.contiguous().clone())
    p.register_buffer("xnnpack_zero_point", zero_point.to(torch.int64).contiguous().clone())
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(f"{path}.xnnpack_scale"), gm.graph.get_attr(f"{path}.xnnpack_zero_point")


def _replace(gm, node, op_args: tuple) -> fx.Node:
    op, args = op_args
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _insert_per_token_qdq(gm, linear: fx.Node) -> None:
    x = linear.args[0]
    g = gm.graph
    with g.inserting_before(linear):
        qparams = g.call_function(_QD.choose_qparams_per_token_asymmetric.default, (x, torch.int8))
        scale = g.call_function(operator.getitem, (qparams, 0))
        zp = g.call_function(operator.getitem, (qparams, 1))
        q = g.call_function(_QD.quantize_per_token.default, (x, scale, zp, -128, 127, torch.int8))
        dq = g.call_function(_QD.dequantize_per_token.default, (q, scale, zp, -128, 127, torch.int8, torch.float32))
    linear.replace_input_with(x, dq)


def _fold_bias_add(gm, gemm: fx.Node) -> None:
    """``gemm(x, w) + b`` (a folded BatchNorm's bias) -> ``gemm(x, w, b)``: XNNPACK fuses only the latter."""
    users = list(gemm.users)
    if len(users) != 1 or not _calls(users[0], _ADD) or len(users[0].args) != 2:
        return
    add = users[0]
    other = add.args[1] if add.args[0] is gemm else add.args[0]
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return
    extra = gm.get_buffer(other.target) if _is_buffer(gm, other.target) else None
    channels = _weight_params(gm, gemm)[1].codes.shape[0]
    if extra is None or extra.numel() != channels or extra.shape[-1 if _calls(gemm, _LINEAR) else 1] != channels:
        return
    bias = _arg(gemm, 2)
    total = extra.reshape(-1) + (_value(gm, bias) if bias is not None else 0.0)
    name = f"{other.target.replace('.', '_')}_as_bias"
    gm.register_buffer(name, total.detach().clone())
    with gm.graph.inserting_before(gemm):
        new_bias = gm.graph.get_attr(name)
    args = list(gemm.args) + [None] * (3 - len(gemm.args))
    args[2] = new_bias
    gemm.args = tuple(args)
    add.replace_all_uses_with(gemm)
    gm.graph.erase_node(add)


def _requantize_early(gm, gemm: fx.Node) -> None:
    """Quantize a GEMM's output where the model quantizes it a few layout ops later.

    ``gemm -> relu -> max_pool -> flatten -> quantize`` equals ``gemm -> relu -> quantize ->
    dequantize -> max_pool -> flatten -> quantize`` exactly (those ops commute with a monotonic
    per-tensor quantize), and the latter gives XNNPACK the int8 GEMM it fuses.
    """
    head = _with_fused_act(gm, gemm)
    node, steps = head, 0
    while len(node.users) == 1 and _commutes(gm, next(iter(node.users))):
        node, steps = next(iter(node.users)), steps + 1
    users = list(node.users)
    if steps == 0 or len(users) != 1 or not _calls(users[0], (_QD.quantize_per_tensor.default,)):
        return
    qargs = users[0].args[1:]
    with gm.graph.inserting_after(head):
        q = gm.graph.call_function(_QD.quantize_per_tensor.default, (head, *qargs))
    with gm.graph.inserting_after(q):
        dq = gm.graph.call_function(_QD.dequantize_per_tensor.default, (q, *qargs))
    head.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q)


def _commutes(gm, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _COMMUTING_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _COMMUTING_MODULES)
    return _calls(node, _COMMUTING_FUNCTIONS)


def _with_fused_act(gm, gemm: fx.Node) -> fx.Node:
    """The GEMM's ReLU / Hardtanh when it is the only consumer (XNNPACK fuses it), else the GEMM."""
    if len(gemm.users) != 1:
        return gemm
    user = next(iter(gemm.users))
    is_module_act = user.op == "call_module" and isinstance(gm.get_submodule(user.target), _FUSED_ACT_MODULES)
    return user if is_module_act or _calls(user, _FUSED_ACTS) else gemm


def _use_float_weight(gm, gemm: fx.Node) -> None:
    dq = _arg(gemm, 1)
    path, p = _weight_params(gm, gemm)
    p.register_buffer("xnnpack_float_weight", p.dequantize())  # convert's own (codes - zp) * scale
    with gm.graph.inserting_before(gemm):
        gemm.replace_input_with(dq, gm.graph.get_attr(f"{path}.xnnpack_float_weight"))
    act = _arg(gemm, 0)
    if _is_act_dq(act) and len(act.users) > 1:
        # XNNPACK takes a dequantize shared with an int8 consumer as this GEMM's quantized
        # input, and then refuses the float weight beside it ("Weight and Input should both
        # be quantized", timm's ghostnet): this GEMM reads a dequantize of its own.
        with gm.graph.inserting_before(gemm):
            own = gm.graph.call_function(act.target, act.args, act.kwargs)
        own.meta = dict(act.meta)
        gemm.replace_input_with(act, own)


# ---- graph queries -------------------------------------------------------------------


def _calls(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _arg(node: fx.Node, i: int):
    names = ("input", "weight", "bias")
    return node.args[i] if len(node.args) > i else node.kwargs.get(names[i])


def _is_weight_dq(node) -> bool:
    weight_ops = (_QD.dequantize_per_channel.default, _QD.dequantize_per_channel_group.default)
    if _calls(node, weight_ops):
        return True
    return _calls(node, (_QD.dequantize_per_tensor.default,)) and node.args[0].op == "get_attr"


def _is_act_dq(node) -> bool:
    return _calls(node, (_QD.dequantize_per_tensor.default,)) and node.args[0].op != "get_attr"


def _requantized(gm, gemm: fx.Node) -> bool:
    """Whether the GEMM's only consumer is a quantize (optionally through one fused ReLU)."""
    node = _with_fused_act(gm, gemm)
    users = list(node.users)
    return len(users) == 1 and _calls(users[0], (_QD.quantize_per_tensor.default,))


def _weight_params(gm, gemm: fx.Node) -> tuple[str, QuantizedParams]:
    """The QuantizedParams whose codes a GEMM's weight dequantize reads."""
    path = _arg(gemm, 1).args[0].target.rpartition(".")[0]
    return path, gm.get_submodule(path)


def _is_buffer(gm, target: str) -> bool:
    try:
        gm.get_buffer(target)
        return True
    except AttributeError:
        return False


def _value(gm, node: fx.Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise RuntimeError(f"expected a constant bias, got {node.name} ({node.op})")
    owner, _, leaf = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf).detach().reshape(-1)


def _drop_type_as(gm) -> None:
    # the backend checks beforehand that every quantized tensor is float32, so these are no-ops
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "type_as":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    _drop_unread_state(gm)
    return gm


def _drop_unread_state(gm: fx.GraphModule) -> None:
    """Delete buffers and parameters no node reads (codes replaced by float weights, their
    original scales): torch.export would otherwise carry them into the program."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    state = [*gm.named_buffers(), *gm.named_parameters()]
    for path, _ in state:
        if path in read or any(path.startswith(c + ".") for c in called):
            continue
        owner, _, leaf = path.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._buffers.pop(leaf, None)
        module._parameters.pop(leaf, None)
