"""The quantize moved up to the Conv, the ops after it run on codes: one QLinearConv per W8A8 conv.

onnxruntime fuses ``DQ(x), DQ(w), DQ(int32 b) -> Conv -> Q`` into ``QLinearConv`` only when
the Q is the Conv's single consumer. Two shapes of a converted CNN break that, and
:func:`requantize_at_conv` rewrites both, exactly:

* ``Conv -> Relu / Clip / MaxPool / Reshape / Flatten ... -> Q``. The Q moves up to the Conv
  and the ops run on its uint8 / int8 codes. Each commutes with a monotonic per-tensor
  quantize ``Q``: ``Q(relu(v)) = clip(Q(v), Q(0))`` with ``Q(0)`` the zero point,
  ``Q(clip(v, a, b)) = clip(Q(v), Q(a), Q(b))``, and max pooling and reshapes pick or move
  values. A Clip whose codes are the type's own ends (a ReLU before a uint8 Q with zero
  point 0) changes no code, since Q saturates: it is dropped. Where a bound's code is not
  certain (``a / s`` within float32 rounding of a ``.5`` tie, so division and
  multiplication by the reciprocal disagree) the ops stay float after a requantize,
  ``Conv -> Q -> DQ -> op ... -> Q``, equally exact.
* A Conv whose output several quantizers read (a block's output feeds the next conv and
  the residual add, each with its own scale): the Conv is repeated, one copy per
  quantizer, so each copy requantizes its own accumulator. Two int8 GEMMs cost less than
  one float conv plus dequantizing its weights on every call.

The moved quantizer's codes are now written by the chain's last op, under the tensor name
its Q wrote. The file's metadata ``statqat.codes`` maps that tensor to the moved Q (named
``*_requantized``), so :mod:`.onnx_codes` reads each quantizer's codes where they are.

Example:
    >>> edits = Edits()
    >>> requantize_at_conv(conv, consumers, arrays, edits)  # doctest: +SKIP
    >>> apply(model, edits)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

REQUANTIZED = "_requantized"
CODES_METADATA = "statqat.codes"
_COMMUTING = ("Relu", "Clip", "MaxPool", "Reshape", "Flatten")


@dataclass
class Edits:
    """Node insertions, replacements and new initializers, applied by :func:`apply` in one pass."""

    before: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    after: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    replace: dict[int, onnx.NodeProto | None] = field(default_factory=dict)  # None: removed
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    codes: dict[str, str] = field(default_factory=dict)  # codes tensor -> the moved Q's name

    def insert_before(self, node: onnx.NodeProto, *new: onnx.NodeProto) -> None:
        self.before.setdefault(id(node), []).extend(new)

    def insert_after(self, node: onnx.NodeProto, *new: onnx.NodeProto) -> None:
        self.after.setdefault(id(node), []).extend(new)


def apply(model: onnx.ModelProto, edits: Edits) -> None:
    """Apply ``edits`` to ``model`` in place, keeping the nodes' topological order, and drop
    the initializers no node reads any more."""
    graph = model.graph
    nodes = []
    for n in graph.node:
        nodes.extend(edits.before.get(id(n), []))
        if id(n) in edits.replace:
            if edits.replace[id(n)] is not None:
                nodes.append(edits.replace[id(n)])
        else:
            nodes.append(n)
        nodes.extend(edits.after.get(id(n), []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(edits.initializers)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if edits.codes:
        entry = model.metadata_props.add()
        entry.key, entry.value = CODES_METADATA, json.dumps(edits.codes)


def moved_codes(model: onnx.ModelProto) -> dict[str, str]:
    """``{codes tensor: moved Q node name}`` recorded by :func:`apply`."""
    entry = next((p for p in model.metadata_props if p.key == CODES_METADATA), None)
    return {} if entry is None else json.loads(entry.value)


def requantize_at_conv(conv: onnx.NodeProto, consumers: Mapping[str, list[onnx.NodeProto]],
                       arrays: Mapping[str, np.ndarray], edits: Edits) -> int:  # fmt: skip
    """Give every quantizer that reads ``conv``'s output its own ``Conv -> Q`` (see the module
    docstring). Returns how many Convs now end in a Q of their own: 0 when a path from the
    output is not a chain of commuting ops ending in a per-tensor 8-bit Q, or when the
    output fans out and some bound's code is uncertain (the graph is then left as it is)."""
    out = conv.output[0]
    paths = _paths(out, consumers, arrays)
    if not paths:
        return 0
    in_codes = [_ops_on_codes(ops, q, arrays) for ops, q in paths]
    if len(paths) == 1 and paths[0][0] and in_codes[0] is None:  # keep the ops float after a requantize
        edits.insert_after(conv, *_requantize(conv, *paths[0]))
        return 1
    if any(c is None for c in in_codes):
        return 0
    for k, ((ops, q), (new_ops, bounds)) in enumerate(zip(paths, in_codes, strict=True)):
        source = conv
        if k:  # one more copy of the Conv for this quantizer
            source = onnx.NodeProto()
            source.CopyFrom(conv)
            source.name, source.output[0] = f"{conv.name}_copy{k}", f"{out}_copy{k}"
            edits.insert_after(conv, source)
        if not new_ops:  # no ops, or only Clips that change no code: the Q reads the Conv
            q.input[0] = source.output[0]
            edits.replace.update({id(op): None for op in ops})
            continue
        moved = helper.make_node("QuantizeLinear", [source.output[0], *q.input[1:]], [f"{q.name}{REQUANTIZED}.codes"],
                                 name=f"{q.name}{REQUANTIZED}")  # fmt: skip
        new_ops[0].input[0] = moved.output[0]
        new_ops[-1].output[0] = q.output[0]
        edits.insert_after(conv, moved, *new_ops[:-1])
        edits.initializers.extend(bounds)
        edits.replace.update({id(op): None for op in ops})
        edits.replace[id(q)] = new_ops[-1]  # where the quantizer was: its codes keep their place in order
        edits.codes[q.output[0]] = moved.name
    return len(paths)


def _paths(value: str, consumers, arrays, ops: tuple = ()) -> list[tuple[list[onnx.NodeProto], onnx.NodeProto]] | None:
    """Every ``(commuting ops, Q)`` path from ``value`` to a per-tensor 8-bit Q, or None when
    some consumer on the way is anything else."""
    paths = []
    for node in consumers[value]:
        if node.op_type == "QuantizeLinear" and node.input[0] == value and _per_tensor_8bit(node, arrays):
            paths.append((list(ops), node))
        elif node.op_type in _COMMUTING and node.input[0] == value and len(node.output) == 1:
            below = _paths(node.output[0], consumers, arrays, (*ops, node))
            if below is None:
                return None
            paths.extend(below)
        else:
            return None
    return paths


def _per_tensor_8bit(q: onnx.NodeProto, arrays) -> bool:
    if len(q.input) < 3:
        return False
    scale, zero_point = arrays.get(q.input[1]), arrays.get(q.input[2])
    return scale is not None and zero_point is not None and scale.size == 1 and zero_point.dtype in (np.uint8, np.int8)


def _requantize(conv, ops, q) -> list[onnx.NodeProto]:
    """``Conv -> Q -> DQ`` with ``q``'s scale and zero point, the first op reading the DQ."""
    out = conv.output[0]
    codes, value = f"{out}{REQUANTIZED}.codes", f"{out}{REQUANTIZED}.value"
    ops[0].input[0] = value
    return [
        helper.make_node("QuantizeLinear", [out, *q.input[1:]], [codes], name=f"{out}{REQUANTIZED}"),
        helper.make_node("DequantizeLinear", [codes, *q.input[1:]], [value], name=f"{out}{REQUANTIZED}_dq"),
    ]


def _ops_on_codes(ops, q, arrays) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """``ops`` rewritten to run on ``q``'s codes (the first reads its input name, to be set),
    with their bounds' code initializers; None when a bound is computed at run time or its
    code is uncertain."""
    scale, zero_point = arrays[q.input[1]].reshape(()), arrays[q.input[2]].reshape(())
    new_ops, bounds, value = [], [], ""
    for k, op in enumerate(ops):
        name = f"{q.name}{REQUANTIZED}.op{k}"
        if op.op_type in ("Relu", "Clip"):
            limits = [np.float32(0.0), None] if op.op_type == "Relu" else _clip_limits(op, arrays)
            if limits is None:
                return None
            codes = [None if limit is None else _code(limit, scale, zero_point) for limit in limits]
            if any(limit is not None and code is None for limit, code in zip(limits, codes, strict=True)):
                return None
            info = np.iinfo(zero_point.dtype)
            low, high = codes
            if (low is None or int(low) == info.min) and (high is None or int(high) == info.max):
                continue  # the codes are saturated to the type's range already (a ReLU at zero point qmin)
            inputs = [value]
            for side, code in zip(("min", "max"), codes, strict=True):
                inputs.append("" if code is None else f"{name}.{side}")
                if code is not None:
                    bounds.append(numpy_helper.from_array(code, f"{name}.{side}"))
            new = helper.make_node("Clip", inputs, [f"{name}.out"], name=name)
        else:
            new = onnx.NodeProto()
            new.CopyFrom(op)
            new.name, new.input[0], new.output[0] = name, value, f"{name}.out"
        new_ops.append(new)
        value = new.output[0]
    return new_ops, bounds


def _clip_limits(clip: onnx.NodeProto, arrays) -> list[np.float32 | None] | None:
    """``[min, max]`` of a Clip (None where absent), or None when a bound is computed at run
    time or given as an attribute (opset < 11)."""
    if clip.attribute:
        return None
    limits = []
    for name in list(clip.input[1:3]) + [""] * (3 - len(clip.input)):
        if name and name not in arrays:
            return None
        limits.append(np.float32(arrays[name].reshape(())) if name else None)
    return limits


def _code(value: np.float32, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray | None:
    """QuantizeLinear's code for ``value`` (round half to even, saturated), or None when float32
    division and multiplication by the reciprocal round it differently (a near tie)."""
    s = np.float32(scale)
    ratios = {float(np.round(value / s)), float(np.round(value * (np.float32(1.0) / s)))}
    if len(ratios) != 1 or not np.isfinite(next(iter(ratios))):
        return None
    info = np.iinfo(zero_point.dtype)
    return np.array(np.clip(ratios.pop() + int(zero_point), info.min, info.max), dtype=zero_point.dtype)
