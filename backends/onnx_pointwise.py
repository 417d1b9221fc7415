"""A W8A8 1x1 Conv that no quantizer reads, as an integer matmul with a float output.

A Conv whose output goes to a float op rather than a quantizer (mobilenet_v2's last 1x1
conv feeds its global average pool) cannot become ``QLinearConv``, whose output is codes.
onnxruntime then dequantizes the conv's int8 weights on every call and runs a float conv.
For a 1x1 conv (stride 1, no padding, one group) :func:`pointwise_integer_matmuls` writes
instead, with only standard ONNX ops:

    Transpose(x codes, NHWC) -> MatMulInteger(., W^T int8) -> Cast(float) -> Mul(s_x s_w)
    -> Add(bias) -> Transpose(NCHW)

onnxruntime runs the MatMulInteger as an int8 GEMM on the codes (no weight dequantization)
and its layout pass drops the transposes between NHWC integer kernels. (Its
``MatMulIntegerToFloat`` fusion does not fire: it looks for a run-time ``Mul`` of the two
scales, which a constant product is not.) The values are the float conv's up to float32 rounding
(the integer sum is exact, the float conv's sum rounds), the same arithmetic as
``QLinearConv``; the per-layer check compares the next quantizer's codes with one-step
ties allowed.

Example:
    >>> proto = onnx.load("model.onnx")  # doctest: +SKIP
    >>> pointwise_integer_matmuls(proto, convs)  # doctest: +SKIP
    1
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_code_space import Edits


def is_pointwise(conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    """A 1x1 2-d conv, stride 1, no padding or dilation, one group."""
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    return (
        weight.ndim == 4
        and weight.shape[2:] == (1, 1)
        and attrs.get("group", 1) == 1
        and all(v == 1 for v in attrs.get("strides", [1, 1]))
        and all(v == 1 for v in attrs.get("dilations", [1, 1]))
        and all(v == 0 for v in attrs.get("pads", [0, 0, 0, 0]))
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
    )


def integer_matmul(conv: onnx.NodeProto, x_dq: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray,
                   bias: np.ndarray, edits: Edits) -> None:  # fmt: skip
    """Replace ``conv`` (reading ``x_dq``; int8 ``weight`` codes, ``scale`` = ``s_x s_w`` per
    output channel, float ``bias`` on that grid) by the integer matmul of the module docstring."""
    prefix = f"{conv.output[0]}_matmul"
    codes, _, zp_x = x_dq.input[:3]
    edits.initializers.extend([
        numpy_helper.from_array(np.ascontiguousarray(weight[:, :, 0, 0].T), f"{prefix}.weight_t"),  # [C_in, C_out]
        numpy_helper.from_array(scale.astype(np.float32), f"{prefix}.scale"),
        numpy_helper.from_array(bias.astype(np.float32).reshape(-1), f"{prefix}.bias"),
    ])  # fmt: skip
    nodes = [
        helper.make_node("Transpose", [codes], [f"{prefix}.nhwc"], perm=[0, 2, 3, 1], name=f"{prefix}_to_nhwc"),
        helper.make_node("MatMulInteger", [f"{prefix}.nhwc", f"{prefix}.weight_t", zp_x], [f"{prefix}.int32"],
                         name=f"{prefix}_MatMulInteger"),
        helper.make_node("Cast", [f"{prefix}.int32"], [f"{prefix}.sum"], to=TensorProto.FLOAT, name=f"{prefix}_Cast"),
        helper.make_node("Mul", [f"{prefix}.sum", f"{prefix}.scale"], [f"{prefix}.scaled"], name=f"{prefix}_Mul"),
        helper.make_node("Add", [f"{prefix}.scaled", f"{prefix}.bias"], [f"{prefix}.out"], name=f"{prefix}_Add"),
        helper.make_node("Transpose", [f"{prefix}.out"], [conv.output[0]], perm=[0, 3, 1, 2], name=f"{prefix}_to_nchw"),
    ]  # fmt: skip
    edits.replace[id(conv)] = nodes[0]
    edits.insert_after(conv, *nodes[1:])
