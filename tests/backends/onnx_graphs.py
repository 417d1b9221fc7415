"""Small hand-written QDQ ONNX graphs for the backend rewrite tests.

Each test model is ``x -> QuantizeLinear -> DequantizeLinear`` on the input and a per-channel
``DequantizeLinear`` of int8 weights, followed by the ops the test is about.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper


def qdq_input_and_weight(
    s_x: np.float32, z_x: np.integer, w: np.ndarray, s_w: np.ndarray, q_name: str | None = None
) -> tuple[list[onnx.TensorProto], list[NodeProto]]:
    """Initializers ``sx, zx, w, sw, zw`` and the nodes giving ``xd`` (dequantized ``x``) and
    ``wd`` (``w`` dequantized per output channel, zero points 0)."""
    inits = [
        numpy_helper.from_array(s_x, "sx"), numpy_helper.from_array(z_x, "zx"), numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(s_w, "sw"), numpy_helper.from_array(np.zeros(len(s_w), np.int8), "zw"),
    ]  # fmt: skip
    q = helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], **({"name": q_name} if q_name else {}))
    nodes = [
        q, helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
    ]  # fmt: skip
    return inits, nodes


def float_model(
    name: str, nodes: list[NodeProto], inits: list[onnx.TensorProto], x_shape: list[int], outputs: list[tuple[str, list[int] | None]]
) -> onnx.ModelProto:
    """An opset-21 model with the float input ``x`` and the given float outputs."""
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in outputs], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
