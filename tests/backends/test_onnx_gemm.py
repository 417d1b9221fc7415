"""A W8A8 Linear (Gemm) with its bias on the int32 grid: onnxruntime's QGemm, the same values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_graphs import float_model, qdq_input_and_weight
from statqat_ao.backends.onnx import kernel_ops, ort_session
from statqat_ao.backends.onnx_integer import integer_convolutions

H = helper
K, N = 256, 10


def _linear(bias_offset: float = 0.0) -> onnx.ModelProto:
    """Q/DQ(x) and DQ(w int8 per output row) -> Gemm(transB=1, float bias) -> float logits."""
    rng = np.random.default_rng(0)
    s_x, s_w = np.float32(0.02), rng.uniform(0.005, 0.02, N).astype(np.float32)
    bias = (rng.integers(-3000, 3000, N) * (s_x * s_w)).astype(np.float32) + np.float32(bias_offset)
    inits, nodes = qdq_input_and_weight(s_x, np.int8(0), rng.integers(-127, 128, (N, K)).astype(np.int8), s_w)
    inits.append(numpy_helper.from_array(bias, "b"))
    nodes.append(H.make_node("Gemm", ["xd", "wd", "b"], ["y"], transB=1))
    return float_model("linear", nodes, inits, [1, K], [("y", [1, N])])


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
