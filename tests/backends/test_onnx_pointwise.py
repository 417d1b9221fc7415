"""A W8A8 1x1 conv that feeds a float op: an int8 matmul on the codes, the same values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_graphs import float_model, qdq_input_and_weight
from statqat_ao.backends.onnx import kernel_ops, ort_session
from statqat_ao.backends.onnx_integer import integer_convolutions

H = helper
C_IN, C_OUT = 32, 48


def _head() -> onnx.ModelProto:
    """x -> Q/DQ -> 1x1 Conv (int8 w per channel, bias on the int32 grid) -> Clip -> ReduceMean."""
    rng = np.random.default_rng(0)
    s_x, s_w = np.float32(0.02), rng.uniform(0.005, 0.02, C_OUT).astype(np.float32)
    bias = (rng.integers(-2000, 2000, C_OUT) * (s_x * s_w)).astype(np.float32)
    inits, nodes = qdq_input_and_weight(s_x, np.int8(0), rng.integers(-127, 128, (C_OUT, C_IN, 1, 1)).astype(np.int8), s_w)
    inits += [
        numpy_helper.from_array(bias.reshape(1, C_OUT, 1, 1), "b"),
        numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]  # fmt: skip
    nodes += [
        H.make_node("Conv", ["xd", "wd"], ["c"]), H.make_node("Add", ["c", "b"], ["cb"]),
        H.make_node("Clip", ["cb", "lo", "hi"], ["r"]), H.make_node("ReduceMean", ["r", "axes"], ["y"], keepdims=0),
    ]  # fmt: skip
    return float_model("head", nodes, inits, [1, C_IN, 3, 3], [("y", [1, C_OUT])])


def test_a_pointwise_conv_without_a_quantizer_runs_as_an_integer_matmul():
    original, rewritten = _head(), _head()
    assert integer_convolutions(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    assert "Conv" not in [n.op_type for n in rewritten.graph.node]
    session = ort_session(rewritten.SerializeToString())
    ops = kernel_ops(rewritten.SerializeToString())
    assert "MatMulInteger" in ops and "Conv" not in ops and "DequantizeLinear" not in ops  # int8 GEMM on the codes
    reference = ReferenceEvaluator(original)
    rng = np.random.default_rng(1)
    for _ in range(8):
        x = rng.normal(0, 1, (1, C_IN, 3, 3)).astype(np.float32)
        (expected,) = reference.run(None, {"x": x})
        (got,) = session.run(None, {"x": x})
        # The matmul's integer sum is exact; the float conv rounds each of its 32 products and
        # partial sums (relative 2^-24 each), then the scale and bias round once more: well
        # under 1e-5 of the largest term sum, which is at most 127 * 127 * 32 steps.
        bound = 1e-5 * float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=bound)
        assert not np.array_equal(got, np.zeros_like(got))
