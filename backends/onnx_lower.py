"""Rewrite the ``statqat.Quantize`` / ``statqat.Dequantize`` marker nodes of a freshly
exported ONNX graph into standard ONNX, storing every weight as its codes.

* Activations: ``QuantizeLinear`` -> ``DequantizeLinear`` per tensor (INT8/UINT8/INT4/
  UINT4 with their zero point, FLOAT8E4M3FN/FLOAT8E5M2, FLOAT4E2M1 in the standard form).
* INT weights: ``DequantizeLinear`` on INT8/UINT8 codes, or INT4/UINT4 (INT2/INT3 codes
  fit an INT4 element exactly); per channel ``axis=0``, per group ``block_size`` along the
  flattened row (opset 21 block quantization), then a Reshape back for conv kernels.
* FP8 weights: ``DequantizeLinear`` on FLOAT8E4M3FN / FLOAT8E5M2 codes (same bits).
* E2M1 weights (FP4, MXFP4, NVFP4): FLOAT4E2M1 + ``DequantizeLinear`` (standard form,
  opset 23), or the onnxruntime form below.
* Other float and lookup formats (and E2M1 in the onnxruntime form): UINT4 (or UINT8)
  codes, ``Gather`` on the format's value table, ``Mul`` by the scale.

Example:
    >>> import numpy as np
    >>> pack_nibbles(np.array([1, 2, 15], dtype=np.uint8))
    b'!\\x0f'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from statqat_ao.numerics.codes import code_table
from statqat_ao.numerics.formats import Format, get_format

DOMAIN = "statqat"
# Activation formats and the ONNX element type QuantizeLinear produces for them.
ACTIVATION_TYPES = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
    "fp8_e4m3": TensorProto.FLOAT8E4M3FN,
    "fp8_e5m2": TensorProto.FLOAT8E5M2,
}
FLOAT8_TYPES = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}
_NIBBLE_TYPES = (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1)


class LoweringError(RuntimeError):
    """The exported graph does not have the shape the rewrite expects."""


def is_e2m1(fmt: Format) -> bool:
    """FP4 E2M1 elements (plain, MXFP4 or NVFP4): ONNX's FLOAT4E2M1."""
    return fmt.family == "float" and (fmt.bits, fmt.ebits, fmt.mbits) == (4, 2, 1)


def weight_code_type(fmt: Format, fp4_form: str) -> int | None:
    """The ONNX element type a DequantizeLinear reads ``fmt``'s codes as; None: Gather form."""
    if fmt.family == "int":
        wide = fmt.bits > 4
        if fmt.signed:
            return TensorProto.INT8 if wide else TensorProto.INT4
        return TensorProto.UINT8 if wide else TensorProto.UINT4
    if fmt.name in FLOAT8_TYPES:
        return FLOAT8_TYPES[fmt.name]
    if is_e2m1(fmt) and fp4_form == "standard":
        return TensorProto.FLOAT4E2M1
    return None


def pack_nibbles(codes: np.ndarray) -> bytes:
    """4-bit codes packed two per byte, the first element in the low nibble (ONNX order)."""
    flat = (codes.astype(np.int16).ravel() & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def code_tensor(name: str, codes: np.ndarray, elem_type: int) -> TensorProto:
    """An initializer holding ``codes`` (their bits, unchanged) as ``elem_type``."""
    if elem_type in _NIBBLE_TYPES:
        raw = pack_nibbles(codes)
    else:
        raw = codes.astype(np.int8 if elem_type == TensorProto.INT8 else np.uint8).tobytes()
    return helper.make_tensor(name, elem_type, list(codes.shape), raw, raw=True)


@dataclass
class _Rewriter:
    fp4_form: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    added: dict[str, TensorProto] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def array(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in self.arrays:
            raise LoweringError(f"node {node.name or node.op_type}: input {name!r} is not a constant initializer")
        return self.arrays[name]

    def add(self, tensor: TensorProto) -> str:
        self.added.setdefault(tensor.name, tensor)
        return tensor.name

    def unique(self, name: str) -> str:
        """``name``, or ``name_<k>`` when taken: onnxruntime's weight rewrites need each
        DequantizeLinear to own its scale and zero point."""
        taken = self.added.keys() | self.arrays.keys()
        k, candidate = 1, name
        while candidate in taken:
            k, candidate = k + 1, f"{name}_{k}"
        return candidate

    def constant(self, name: str, value: np.ndarray) -> str:
        return self.add(numpy_helper.from_array(value, name))

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        base = outputs[0]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{base}_{op_type}", **attrs))


def _fmt_of(node: onnx.NodeProto) -> Format:
    return get_format(helper.get_attribute_value(next(a for a in node.attribute if a.name == "fmt")).decode())


def _typed_zero_point(rw: _Rewriter, name: str, zp: np.ndarray, elem_type: int) -> str:
    """The int32 zero point as an initializer of the codes' type (QDQ requires it)."""
    if elem_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2, TensorProto.FLOAT4E2M1) and np.any(zp != 0):
        raise LoweringError(f"{name}: a float format needs a zero point of 0")
    return rw.add(code_tensor(f"{name}.{TensorProto.DataType.Name(elem_type).lower()}", zp, elem_type))


def _activation_type(fmt: Format, fp4_form: str) -> int:
    if fmt.name in ACTIVATION_TYPES:
        return ACTIVATION_TYPES[fmt.name]
    if fmt.name == "fp4_e2m1" and fp4_form == "standard":
        return TensorProto.FLOAT4E2M1
    raise LoweringError(f"activation format {fmt.name} has no QuantizeLinear type")


def _quantize(rw: _Rewriter, node: onnx.NodeProto) -> None:
    x, scale, zp_name = node.input
    zp = rw.array(zp_name, node)
    typed = _typed_zero_point(rw, zp_name, zp, _activation_type(_fmt_of(node), rw.fp4_form))
    rw.emit("QuantizeLinear", [x, scale, typed], list(node.output))


def _dequantize_activation(rw: _Rewriter, node: onnx.NodeProto) -> None:
    codes, scale, zp_name = node.input
    zp = rw.array(zp_name, node)
    typed = _typed_zero_point(rw, zp_name, zp, _activation_type(_fmt_of(node), rw.fp4_form))
    rw.emit("DequantizeLinear", [codes, scale, typed], list(node.output))


@dataclass(frozen=True)
class WeightLayout:
    """How a weight's scale maps onto its codes (see QuantizedParams.granularity)."""

    kind: str  # "tensor" | "channel" | "group"
    rows: int = 1
    group_size: int = 0


def weight_layout(codes_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> WeightLayout:
    """Per tensor, per output channel (axis 0) or per group along the flattened row."""
    numel = int(np.prod(codes_shape))
    scale_numel = int(np.prod(scale_shape))
    if scale_numel == 1:
        return WeightLayout("tensor")
    if len(scale_shape) == len(codes_shape) and all(s in (1, c) for s, c in zip(scale_shape, codes_shape, strict=True)):
        if scale_shape[0] != codes_shape[0] or scale_numel != codes_shape[0]:
            raise LoweringError(f"scale {scale_shape} for codes {codes_shape}: only axis 0 can be per channel")
        return WeightLayout("channel", rows=codes_shape[0])
    if len(scale_shape) != 2 or scale_shape[0] != codes_shape[0] or numel % scale_numel:
        raise LoweringError(f"scale {scale_shape} neither broadcasts against nor groups codes {codes_shape}")
    return WeightLayout("group", rows=codes_shape[0], group_size=numel // scale_numel)


def _reshape_back(rw: _Rewriter, flat: str, shape: tuple[int, ...], out: str) -> None:
    target = rw.constant(f"{out}.shape", np.array(shape, dtype=np.int64))
    rw.emit("Reshape", [flat, target], [out])


def _dequantize_weight(rw: _Rewriter, node: onnx.NodeProto, transposed_out: str | None = None) -> None:
    """DequantizeLinear on the stored codes. With ``transposed_out``, the weight feeds a
    ``Transpose(perm=[1, 0])`` (a Linear as ``MatMul``): the codes, scales and zero points
    are stored transposed and the DequantizeLinear writes the Transpose's output, the
    ``DQ -> MatMul`` pattern onnxruntime fuses (``MatMulNBits`` for 4-bit groups)."""
    codes_name, scale_name, zp_name = node.input
    codes, scale, zp = (rw.array(n, node) for n in node.input)
    fmt, out = _fmt_of(node), node.output[0]
    layout = weight_layout(codes.shape, scale.shape)
    elem_type = weight_code_type(fmt, rw.fp4_form)
    if elem_type is None:
        _gather_weight(rw, node, fmt, layout)
        if transposed_out is not None:  # the Transpose stays
            rw.emit("Transpose", [out], [transposed_out], perm=[1, 0])
        return None
    rows = codes.reshape(layout.rows, -1) if layout.kind == "group" else codes
    shaped = {"tensor": (), "channel": (layout.rows,), "group": scale.shape}[layout.kind]
    scale, zp = scale.reshape(shaped), zp.reshape(shaped)
    axis = {"channel": 0, "group": 1}.get(layout.kind)
    if transposed_out is not None:
        rows, out, axis = rows.T, transposed_out, None if axis is None else 1 - axis
        if layout.kind == "group":
            scale, zp = scale.T, zp.T
    base = rw.unique(codes_name.removesuffix(".codes"))
    stored = rw.add(code_tensor(f"{base}.codes", np.ascontiguousarray(rows), elem_type))
    inputs = [stored, rw.constant(f"{base}.scale", np.ascontiguousarray(scale).astype(np.float32))]
    if (fmt.family == "int" and fmt.bits == 8) or np.any(zp != 0):
        # INT8: an explicit zero point even when 0: onnxruntime's u8 rewrite of INT8
        # weights (session.x64quantprecision) needs one per channel for a Gemm. Narrower
        # symmetric codes omit it (4 bits per group saved).
        inputs.append(_typed_zero_point(rw, f"{base}.zero_point", np.ascontiguousarray(zp), elem_type))
    attrs = {} if axis is None else {"axis": axis}
    if layout.kind == "group":
        attrs["block_size"] = layout.group_size
    if layout.kind == "group" and codes.ndim != 2:
        rw.emit("DequantizeLinear", inputs, [f"{out}.rows"], **attrs)
        return _reshape_back(rw, f"{out}.rows", codes.shape, out)
    return rw.emit("DequantizeLinear", inputs, [out], **attrs)


def _transposed_weights(graph: onnx.GraphProto, arrays: dict) -> dict[str, onnx.NodeProto]:
    """Weight dequantize outputs whose only consumer is ``Transpose(perm=[1, 0])``."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = {}
    for n in graph.node:
        if n.domain != DOMAIN or n.op_type != "Dequantize" or n.input[0] not in arrays or arrays[n.input[0]].ndim != 2:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "Transpose":
            perm = [list(a.ints) for a in users[0].attribute if a.name == "perm"]
            if perm == [[1, 0]]:
                found[n.output[0]] = users[0]
    return found


def _gather_weight(rw: _Rewriter, node: onnx.NodeProto, fmt: Format, layout: WeightLayout) -> None:
    """``table[codes]``, minus the zero point, times the scale: the float32 arithmetic of
    ``statqat_ao.numerics.codes.dequantize`` step for step (the table values are exact)."""
    codes_name, scale_name, zp_name = node.input
    codes, scale, zp = (rw.array(n, node) for n in node.input)
    out = node.output[0]
    store_type = TensorProto.UINT4 if fmt.bits <= 4 else TensorProto.UINT8
    base = rw.unique(codes_name.removesuffix(".codes"))
    stored = rw.add(code_tensor(f"{base}.codes", codes, store_type))
    table = rw.constant(f"{fmt.name}.value_of_code", np.array(code_table(fmt.name)[0], dtype=np.float32))
    rw.emit("Cast", [stored], [f"{out}.index"], to=TensorProto.INT32)
    rw.emit("Gather", [table, f"{out}.index"], [f"{out}.values"])
    values = f"{out}.values"
    if layout.kind == "group":  # [rows, groups, group_size] against a [rows, groups, 1] scale
        grouped = (layout.rows, scale.shape[1], layout.group_size)
        rw.emit("Reshape", [values, rw.constant(f"{out}.grouped", np.array(grouped, dtype=np.int64))], [f"{out}.g"])
        values, scale, zp = f"{out}.g", scale[..., None], zp[..., None]
    if np.any(zp != 0):
        rw.emit("Sub", [values, rw.constant(f"{base}.zero_point", zp.astype(np.float32))], [f"{out}.centred"])
        values = f"{out}.centred"
    scaled = f"{out}.scaled" if layout.kind == "group" else out
    rw.emit("Mul", [values, rw.constant(f"{base}.scale", scale.astype(np.float32))], [scaled])
    if layout.kind == "group":
        _reshape_back(rw, scaled, codes.shape, out)


def lower_markers(model: onnx.ModelProto, fp4_form: str) -> onnx.ModelProto:
    """Replace every statqat marker node of ``model`` (in place) and drop dead initializers."""
    graph = model.graph
    rw = _Rewriter(fp4_form, {t.name: numpy_helper.to_array(t) for t in graph.initializer})
    quantized = {o for n in graph.node if n.domain == DOMAIN and n.op_type == "Quantize" for o in n.output}
    transposes = _transposed_weights(graph, rw.arrays)
    folded = {id(t) for t in transposes.values()}
    for node in graph.node:
        if id(node) in folded:
            continue
        if node.domain != DOMAIN:
            rw.nodes.append(node)
        elif node.op_type == "Quantize":
            _quantize(rw, node)
        elif node.input[0] in rw.arrays:
            t = transposes.get(node.output[0])
            _dequantize_weight(rw, node, None if t is None else t.output[0])
        elif node.input[0] in quantized:
            _dequantize_activation(rw, node)
        else:
            raise LoweringError(f"{node.name}: dequantizes {node.input[0]!r}, neither a weight nor a quantized activation")
    del graph.node[:]
    graph.node.extend(rw.nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used and t.name not in rw.added]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for name, t in rw.added.items() if name in used])
    del graph.value_info[:]  # stale for the rewritten values; runtimes infer them
    _strip_metadata(graph)
    kept_opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    return model


def _strip_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node and per-value provenance (about a third of a small file)."""
    for item in [*graph.node, *graph.initializer, *graph.input, *graph.output]:
        del item.metadata_props[:]
        item.doc_string = ""
