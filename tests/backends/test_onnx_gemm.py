"""A W8A8 Linear (Gemm) with its bias on the int32 grid: onnxruntime's QGemm, the same values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from statqat_ao.backends.onnx import kernel_ops, ort_session
from statqat_ao.backends.onnx_integer import integer_convolutions

H = helper
K, N = 256, 10


def _linear(bias_offset: float = 0.0) -> onnx.ModelProto:
    """Q/DQ(x) and DQ(w int8 per output row) -> Gemm(transB=1, float bias) -> float logits."""
    rng = np.random.default_rng(0)
    s_x, s_w = np.float32(0.02), rng.uniform(0.005, 0.02, N).astype(np.float32)
    bias = (rng.integers(-3000, 3000, N) * (s_x * s_w)).astype(np.float32) + np.float32(bias_offset)
    inits = [
        numpy_helper.from_array(s_x, "sx"), numpy_helper.from_array(np.int8(0), "zx"),
        numpy_helper.from_array(rng.integers(-127, 128, (N, K)).astype(np.int8), "w"),
        numpy_helper.from_array(s_w, "sw"), numpy_helper.from_array(np.zeros(N, np.int8), "zw"),
        numpy_helper.from_array(bias, "b"),
    ]  # fmt: skip
    nodes = [
        H.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), H.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        H.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0), H.make_node("Gemm", ["xd", "wd", "b"], ["y"], transB=1),
    ]  # fmt: skip
    graph = H.make_graph(nodes, "linear", [H.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                         [H.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])], inits)  # fmt: skip
    return H.make_model(graph, opset_imports=[H.make_opsetid("", 21)])


def test_a_linear_with_an_int32_grid_bias_runs_as_qgemm():
    original, rewritten = _linear(), _linear()
    assert integer_convolutions(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    session = ort_session(rewritten.SerializeToString())
    ops = kernel_ops(rewritten.SerializeToString())
    assert "QGemm" in ops and "Gemm" not in ops and "DequantizeLinear" not in ops
    reference = ReferenceEvaluator(original)
    rng = np.random.default_rng(1)
    for _ in range(8):
        x = rng.normal(0, 1, (1, K)).astype(np.float32)
        (expected,) = reference.run(None, {"x": x})
        (got,) = session.run(None, {"x": x})
        # The integer sum is exact; the float Gemm rounds each of its 256 products and partial
        # sums (relative 2^-24 each): at most (256 + 2) * 2^-24 of the sum of |terms| per output.
        x_deq = np.clip(np.round(x / 0.02), -128, 127) * 0.02
        w_deq = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "w")).astype(np.float64)
        w_deq *= numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "sw"))[:, None]
        bound = (K + 2) * 2.0**-24 * (np.abs(x_deq) @ np.abs(w_deq).T)
        assert np.all(np.abs(got.astype(np.float64) - expected) <= bound + 1e-12)


def test_off_grid_biases_and_other_gemms_are_left_as_they_are():
    off_grid = _linear(bias_offset=1e-3)
    assert integer_convolutions(off_grid) == 0
    transposed = _linear()
    next(n for n in transposed.graph.node if n.op_type == "Gemm").attribute[0].i = 0  # transB=0: w is not [out, in]: w is not [out, in]
    assert integer_convolutions(transposed) == 0
