"""The quantize moved up to the Conv: exact against the file as written, and fused by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_graphs import float_model, qdq_input_and_weight
from statqat_ao.backends.onnx import kernel_ops
from statqat_ao.backends.onnx_code_space import _code, moved_codes
from statqat_ao.backends.onnx_codes import quantize_nodes
from statqat_ao.backends.onnx_integer import integer_convolutions

H = helper


def _block(clip_max: float | None, out_scale: float, fan_out: bool = True, unsigned: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(int8 w, bias on the int32 grid) -> Clip(0, clip_max) -> its Q, and
    with ``fan_out`` a second quantizer of another scale through a MaxPool; outputs as float.
    ``clip_max`` None: a Relu instead of the Clip. ``unsigned``: the output Qs are uint8 with
    zero point 0."""
    rng = np.random.default_rng(0)
    s_x, s_w = np.float32(0.05), (rng.uniform(0.01, 0.02, 8)).astype(np.float32)
    bias = (rng.integers(-300, 300, 8) * (s_x * s_w)).astype(np.float32)
    inits, nodes = qdq_input_and_weight(s_x, np.int8(0), rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), s_w, "q_in")
    inits += [
        numpy_helper.from_array(bias.reshape(1, 8, 1, 1), "b"),
        numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(clip_max or 0), "hi"),
        numpy_helper.from_array(np.float32(out_scale), "s1"), numpy_helper.from_array(np.float32(0.07), "s2"),
        numpy_helper.from_array(np.uint8(0), "zu"),
    ]  # fmt: skip
    zo = "zu" if unsigned else "zx"
    nodes += [
        H.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
        H.make_node("Add", ["c", "b"], ["cb"]),
        H.make_node("Clip", ["cb", "lo", "hi"], ["r"]) if clip_max is not None else H.make_node("Relu", ["cb"], ["r"]),
        H.make_node("QuantizeLinear", ["r", "s1", zo], ["q1"], name="q_one"),
        H.make_node("DequantizeLinear", ["q1", "s1", zo], ["y1"]),
        H.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        H.make_node("QuantizeLinear", ["p", "s2", zo], ["q2"], name="q_two"),
        H.make_node("DequantizeLinear", ["q2", "s2", zo], ["y2"]),
    ][: None if fan_out else -3]  # fmt: skip
    return float_model("block", nodes, inits, [1, 3, 8, 8], [("y1", [1, 8, 8, 8]), ("y2", [1, 8, 4, 4])][: 1 + fan_out])


def _inputs(n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(0, 2, (1, 3, 8, 8)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("clip_max", [6.0, None])
def test_codes_after_the_conv_compute_what_the_file_computed(clip_max):
    original = _block(clip_max, out_scale=0.06)
    rewritten = _block(clip_max, out_scale=0.06)
    assert integer_convolutions(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    # the float semantics of both files (onnx's reference runtime: float convs in both)
    before, after = ReferenceEvaluator(original), ReferenceEvaluator(rewritten)
    for x in _inputs():
        for a, b in zip(before.run(None, {"x": x}), after.run(None, {"x": x}), strict=True):
            np.testing.assert_array_equal(a, b)
    ops = kernel_ops(rewritten.SerializeToString())
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops  # one copy per quantizer
    # the per-layer check still finds both quantizers' codes, in the graph's order
    assert [q.name for _, q in quantize_nodes(rewritten)] == ["q_in", "q_one_requantized", "q_two_requantized"]
    assert set(moved_codes(rewritten)) == {"q1", "q2"}


def test_a_relu_before_uint8_codes_with_zero_point_0_is_dropped():
    # Q saturates at code 0 = the zero point: the ReLU's clip on codes would change nothing.
    original = _block(None, out_scale=0.06, unsigned=True)
    rewritten = _block(None, out_scale=0.06, unsigned=True)
    assert integer_convolutions(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    assert not [n for n in rewritten.graph.node if n.op_type in ("Relu", "Clip")]
    before, after = ReferenceEvaluator(original), ReferenceEvaluator(rewritten)
    for x in _inputs():
        for a, b in zip(before.run(None, {"x": x}), after.run(None, {"x": x}), strict=True):
            np.testing.assert_array_equal(a, b)
    ops = kernel_ops(rewritten.SerializeToString())
    assert ops.count("QLinearConv") == 2 and "Clip" not in ops and "Relu" not in ops
    # q_one now reads the Conv itself; q_two moved above the MaxPool, which runs on codes
    assert [q.name for _, q in quantize_nodes(rewritten)] == ["q_in", "q_one", "q_two_requantized"]
    assert set(moved_codes(rewritten)) == {"q2"}


def _near_tie_scale() -> np.float32:
    """A scale where 6 / s and 6 * (1 / s) round to different integers in float32."""
    for k in range(1, 200_000):
        s = np.float32(6.0) / np.float32(k + 0.5)
        for t in (s, np.nextafter(s, np.float32(0)), np.nextafter(s, np.float32(1))):
            if np.round(np.float32(6.0) / t) != np.round(np.float32(6.0) * (np.float32(1.0) / t)):
                return t
    pytest.fail("no near-tie scale found")


@pytest.mark.parametrize("fan_out", [False, True])
def test_an_uncertain_bound_keeps_the_ops_float(fan_out):
    scale = _near_tie_scale()
    assert _code(np.float32(6.0), np.float32(scale), np.uint8(128)) is None
    original, rewritten = _block(6.0, scale, fan_out), _block(6.0, scale, fan_out)
    assert integer_convolutions(rewritten) == 1  # the int32 bias moves in either way
    requantized = [n.name for n in rewritten.graph.node if n.name.endswith("_requantized_dq")]
    assert not moved_codes(rewritten) and len(requantized) == (0 if fan_out else 1)  # one path: Conv -> Q -> DQ -> Clip -> Q
    before, after = ReferenceEvaluator(original), ReferenceEvaluator(rewritten)
    for x in _inputs():
        for a, b in zip(before.run(None, {"x": x}), after.run(None, {"x": x}), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, zero_point", [(np.uint8, 128), (np.uint8, 0), (np.int8, 0)])
def test_bound_codes_equal_onnxruntime_quantize(dtype, zero_point):
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0, 3, 200), [0.0, 6.0, -6.0, 1e6]]).astype(np.float32)
    scales = rng.uniform(1e-3, 0.2, 20).astype(np.float32)
    graph = H.make_graph([H.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])], "q",
                         [H.make_tensor_value_info("x", TensorProto.FLOAT, [None]), H.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                         [H.make_tensor_value_info("y", TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8, None)],
                         [numpy_helper.from_array(np.array(zero_point, dtype), "z")])  # fmt: skip
    session = ort.InferenceSession(H.make_model(graph, opset_imports=[H.make_opsetid("", 21)]).SerializeToString(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    checked = 0
    for s in scales:
        expected = session.run(None, {"x": values, "s": np.array(s, np.float32)})[0]
        for v, e in zip(values, expected, strict=True):
            code = _code(v, s, np.array(zero_point, dtype))
            if code is not None:
                assert int(code) == int(e), (v, s)
                checked += 1
    assert checked > 0.99 * values.size * scales.size


def test_an_op_whose_output_the_model_returns_stays():
    """A Clip output that is also a graph output: moving the quantize would remove it."""
    original, rewritten = _block(6.0, 0.06, fan_out=False), _block(6.0, 0.06, fan_out=False)
    for model in (original, rewritten):
        model.graph.output.append(H.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8, 8, 8]))
    assert integer_convolutions(rewritten) == 1  # the int32 bias still moves in
    onnx.checker.check_model(rewritten, full_check=True)
    assert not moved_codes(rewritten) and "Clip" in [n.op_type for n in rewritten.graph.node]
    before, after = ReferenceEvaluator(original), ReferenceEvaluator(rewritten)
    for x in _inputs(2):
        for a, b in zip(before.run(None, {"x": x}), after.run(None, {"x": x}), strict=True):
            np.testing.assert_array_equal(a, b)
