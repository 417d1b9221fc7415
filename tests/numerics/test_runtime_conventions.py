"""Asymmetric INT codes follow the runtimes: ``clamp(round(x / s) + zp)``, checked bit for bit in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import statqat_ao as sq
from statqat_ao.numerics.codes import quantize

DTYPES = {"uint8": (TensorProto.UINT8, np.uint8), "int8": (TensorProto.INT8, np.int8)}


def ort_quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str, axis: int | None) -> np.ndarray:
    onnx_type, np_type = DTYPES[dtype]
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", onnx_type, list(x.shape))],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.ravel().tolist()),
            helper.make_tensor("zp", onnx_type, list(zero_point.shape), zero_point.astype(np_type).ravel().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def data(seed: int, shape, scale: torch.Tensor) -> torch.Tensor:
    """Random values plus values exactly at rounding ties (k + 0.5 code steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    ties = (torch.randint(-140, 140, shape, generator=g).float() + 0.5) * scale
    return torch.where(torch.rand(*shape, generator=g) < 0.3, ties, x)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("seed", range(3))
def test_per_tensor_asymmetric_codes_equal_quantize_linear(dtype, seed):
    scale = torch.tensor(0.0234375)  # a power-of-two multiple: ties stay exact in float32
    zp = torch.tensor(127 if dtype == "uint8" else -3, dtype=torch.int32)  # odd: where round(x/s + zp) differs
    x = data(seed, (64, 96), scale)
    ours = quantize(x, scale, zp, dtype).numpy()
    theirs = ort_quantize_linear(x.numpy(), scale.numpy().reshape(()), zp.numpy().reshape(()), dtype, None)
    np.testing.assert_array_equal(ours.astype(np.int32), theirs.astype(np.int32))


@pytest.mark.parametrize("seed", range(2))
def test_per_channel_estimated_asymmetric_codes_equal_quantize_linear(seed):
    w = data(seed, (32, 64), torch.tensor(0.02)) + torch.linspace(-1, 2, 32)[:, None]
    scale, zp = sq.estimate_qparams(w, "uint8", "minmax", "channel", symmetric=False)
    ours = quantize(w, scale, zp, "uint8").numpy()
    theirs = ort_quantize_linear(w.numpy(), scale.reshape(-1).numpy(), zp.reshape(-1).numpy(), "uint8", 0)
    np.testing.assert_array_equal(ours.astype(np.int32), theirs.astype(np.int32))


def test_fake_quantize_uses_the_same_codes():
    scale, zp = torch.tensor(0.5), torch.tensor(3, dtype=torch.int32)
    x = torch.tensor([0.25, 0.75, 1.25, -0.25])  # x / s = 0.5, 1.5, 2.5, -0.5: ties
    want = (torch.round(x / scale) + zp).clamp(0, 255)  # 3, 5, 5, 3 (round half to even, then + zp)
    assert torch.equal(quantize(x, scale, zp, "uint8").float(), want)
    assert torch.equal(sq.fake_quantize(x, scale, zp, "uint8"), (want - zp) * scale)
