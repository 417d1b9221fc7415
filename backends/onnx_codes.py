"""onnxruntime's activation codes: every QuantizeLinear output of an ONNX file, read in one run.

The file's activation QuantizeLinear nodes are appended to its outputs (in a copy held in
memory). The check in :mod:`statqat_ao.backends.code_parity` is only sound if that copy
computes what the file computes: its original outputs must be bit-identical to the
file's, or :func:`runtime_codes` returns None (onnxruntime may then have fused the
graph otherwise) and the caller falls back to the end-to-end check.

Example:
    >>> codes = runtime_codes("model.onnx", (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
    >>> [c.dtype for c in codes][:1]  # doctest: +SKIP
    [torch.int64]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .onnx_code_space import REQUANTIZED, moved_codes


def quantize_nodes(proto: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto]]:
    """``(codes tensor, QuantizeLinear)`` of each of the model's quantizers, in the order the
    graph computes the codes: a quantizer :mod:`.onnx_code_space` moved up to its Conv has
    its codes where its Q was (its ``*_requantized`` Q is then the one named in the file's
    metadata); the other ``*_requantized`` copies are skipped."""
    moved = moved_codes(proto)
    by_name = {n.name: n for n in proto.graph.node}
    found = []
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and not n.name.endswith(REQUANTIZED):
            found.append((n.output[0], n))
        found.extend((o, by_name[moved[o]]) for o in n.output if o in moved)
    return found


def _zero_point(initializers: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> tuple[int, int]:
    """``(zero point, element type)`` of a per-tensor QuantizeLinear."""
    if len(node.input) > 2 and node.input[2]:
        init = initializers[node.input[2]]
        return int(numpy_helper.to_array(init).reshape(-1)[0]), init.data_type
    to = next((a.i for a in node.attribute if a.name == "output_dtype"), onnx.TensorProto.UINT8)
    return 0, to


def runtime_codes(path: str | Path, inputs: tuple, outputs: list[np.ndarray] | None = None) -> list[torch.Tensor] | None:
    """Code values (zero point removed) of every QuantizeLinear, from onnxruntime, or None
    when reading them changes the file's outputs (see the module docstring), when the file
    is run by onnx.reference (FLOAT4E2M1), or when the codes are not 8-bit.

    ``outputs``: the file's own outputs on ``inputs``, if already computed.
    """
    from .onnx import _feeds, ort_session, run_artifact

    proto = onnx.load(str(path))
    nodes = quantize_nodes(proto)
    if not nodes:
        return []
    if any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in proto.graph.initializer):
        return None  # run by onnx.reference, not onnxruntime
    zero_points = []
    original = len(proto.graph.output)
    initializers = {t.name: t for t in proto.graph.initializer}
    for codes, node in nodes:
        zp, elem_type = _zero_point(initializers, node)
        if elem_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            return None  # onnxruntime hands 4-bit outputs back packed, unreadable by numpy
        zero_points.append(zp)
        proto.graph.output.append(helper.make_tensor_value_info(codes, elem_type, None))
    session = ort_session(proto.SerializeToString())
    results = session.run(None, _feeds([i.name for i in session.get_inputs()], inputs))
    plain = run_artifact(path, inputs) if outputs is None else outputs
    if any(not np.array_equal(a, b) for a, b in zip(plain, results[:original], strict=True)):
        return None
    return [torch.from_numpy(r.astype(np.int64)) - zp for r, zp in zip(results[original:], zero_points, strict=True)]
