"""Integer convolutions in onnxruntime: the QDQ patterns its QLinearConv fusion takes, exactly.

The converted model's W8A8 conv exports as ``Conv(DQ(x), DQ(w))``, then ``Add`` of the
(folded) bias, ``Relu`` and ``QuantizeLinear``. onnxruntime runs that as a float conv
between dequantize and quantize steps (slower than the float model). It fuses
``DQ(x), DQ(w), DQ(int32 bias) -> Conv -> Q`` into one ``QLinearConv`` (int8 GEMM, int32
accumulator), and does so only when:

* the bias is ``DequantizeLinear`` of int32 codes with scale ``s_x * s_w`` per output channel,
  an input of the Conv (not a separate Add): :func:`integer_convolutions` rewrites the Add
  when the bias values are exactly ``codes * s_x s_w`` in float32, which holds for a model
  trained with int32 biases (:mod:`statqat_ao.passes.bias_quant`); any other bias is left
  as it is, so the rewrite never changes a value;
* the Q is the Conv's single consumer: :mod:`.onnx_code_space` moves the quantize up to the
  Conv (the Relu / Clip / MaxPool / reshapes between them then run on codes) and repeats a
  Conv whose output several quantizers read;
* activation codes are uint8: int8 codes with zero point 0 become uint8 with zero point
  128, the same values (reading intermediate int8 codes broke most fusions; uint8 none).

A Linear (``Gemm``, weights ``[out, in]``) gets its int32 bias the same way, which
onnxruntime fuses into ``QGemm`` whether a Q follows or not (a classifier's float logits).

Example:
    >>> proto = onnx.load("model.onnx")  # doctest: +SKIP
    >>> integer_convolutions(proto)  # doctest: +SKIP
    19
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_code_space import Edits, apply, requantize_at_conv
from .onnx_pointwise import integer_matmul, is_pointwise

INT32_MAX = 2**31 - 1


def integer_convolutions(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place as described above; return how many Convs and Gemms now take an int32 bias."""
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    _unsigned_activations(graph, arrays)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    for o in graph.output:  # a graph output is a consumer no rewrite may take away
        consumers[o.name].append(onnx.NodeProto(op_type="GraphOutput", name=o.name))
    edits = Edits()
    count = 0
    for conv in [n for n in graph.node if n.op_type == "Conv" or (n.op_type == "Gemm" and _plain_linear(n))]:
        # ``conv``: a Conv, or a Gemm that is a Linear (its weights [out, in] scaled per row)
        scale = _bias_scale(conv, producers, arrays)
        if scale is None:
            continue
        bias_name, add = _bias_of(conv, consumers, arrays, scale.size)
        if bias_name is None:
            continue
        codes = _exact_codes(arrays[bias_name].reshape(-1), scale)
        if codes is None:
            continue
        prefix = f"{conv.output[0]}_bias"
        edits.initializers.extend([
            numpy_helper.from_array(codes, f"{prefix}.codes"),
            numpy_helper.from_array(scale, f"{prefix}.scale"),
            numpy_helper.from_array(np.zeros_like(codes), f"{prefix}.zero_point"),
        ])  # fmt: skip
        dq = helper.make_node("DequantizeLinear", [f"{prefix}.codes", f"{prefix}.scale", f"{prefix}.zero_point"],
                              [f"{prefix}.value"], name=f"{prefix}_DequantizeLinear", axis=0)  # fmt: skip
        edits.insert_before(conv, dq)
        inputs = list(conv.input[:2]) + [dq.output[0]]
        del conv.input[:]
        conv.input.extend(inputs)
        if add is not None:  # the Conv takes over the Add's output name
            edits.replace[id(add)] = None
            conv.output[0] = add.output[0]
        count += 1
        if conv.op_type == "Gemm":  # onnxruntime's QGemm, float or quantized output
            continue
        x_dq, w_dq = producers[inputs[0]], producers[inputs[1]]
        weight = arrays[w_dq.input[0]]
        if not requantize_at_conv(conv, consumers, arrays, edits) and is_pointwise(conv, weight):
            edits.before.pop(id(conv))  # the int32 bias: the matmul adds the float one after its scale
            integer_matmul(conv, x_dq, weight, scale, arrays[bias_name], edits)
            for dq in (x_dq, w_dq):
                if len(consumers[dq.output[0]]) == 1:
                    edits.replace[id(dq)] = None
    apply(model, edits)
    return count


def _unsigned_activations(graph: onnx.GraphProto, arrays: dict) -> None:
    """int8 activation zero points (QuantizeLinear's) -> uint8, shifted by 128: the same values."""
    names = {n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    for i, t in enumerate(graph.initializer):
        if t.name in names and t.data_type == TensorProto.INT8:
            shifted = (arrays[t.name].astype(np.int16) + 128).astype(np.uint8)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(shifted, t.name))
            arrays[t.name] = shifted


def _plain_linear(gemm: onnx.NodeProto) -> bool:
    """``x @ w.T + b`` (a Linear): weights ``[out, in]``, scaled per output row."""
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    return attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0


def _bias_scale(conv, producers, arrays) -> np.ndarray | None:
    """``s_x * s_w`` per output channel (float32) for a Conv on dequantized 8-bit x and int8 w, else None."""
    x_dq, w_dq = producers.get(conv.input[0]), producers.get(conv.input[1])
    if not all(p is not None and p.op_type == "DequantizeLinear" for p in (x_dq, w_dq)):
        return None
    if any(len(p.input) < 3 or p.input[1] not in arrays or p.input[2] not in arrays for p in (x_dq, w_dq)):
        return None
    if w_dq.input[0] not in arrays or arrays[w_dq.input[0]].dtype != np.int8 or np.any(arrays[w_dq.input[2]] != 0):
        return None
    s_x, s_w = arrays[x_dq.input[1]], arrays[w_dq.input[1]]
    if s_x.size != 1 or arrays[x_dq.input[2]].dtype not in (np.uint8, np.int8):
        return None
    channels = arrays[w_dq.input[0]].shape[0]
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    if s_w.size not in (1, channels) or (s_w.size > 1 and axis != 0):
        return None
    return np.broadcast_to(s_x.astype(np.float32).reshape(()) * s_w.astype(np.float32).reshape(-1), (channels,)).copy()


def _bias_of(conv, consumers, arrays, channels: int) -> tuple[str | None, onnx.NodeProto | None]:
    """The bias initializer and the Add that applies it (None when the Conv holds it)."""
    if len(conv.input) > 2 and conv.input[2]:
        return (conv.input[2], None) if conv.input[2] in arrays else (None, None)
    users = consumers[conv.output[0]]
    if len(users) != 1 or users[0].op_type != "Add":
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == conv.output[0] else add.input[0]
    if other not in arrays or arrays[other].size != channels or arrays[other].shape[-1] not in (1, channels):
        return None, None
    if arrays[other].ndim > 1 and arrays[other].shape[1] != channels:  # [1, C, 1, 1]
        return None, None
    return other, add


def _exact_codes(bias: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(codes) > INT32_MAX):
        return None
    codes = codes.astype(np.int32)
    exact = np.array_equal((codes.astype(np.float32) * scale).astype(np.float32), bias.astype(np.float32))
    return codes if exact else None
