"""ONNX backend: a QDQ graph of a converted model, weights stored as their codes.

:func:`export` traces the model with ``torch.onnx.export(dynamo=True)``, the
``statqat::quantize`` / ``statqat::dequantize`` ops becoming marker nodes that
:mod:`statqat_ao.backends.onnx_lower` rewrites into QuantizeLinear / DequantizeLinear
(or a Gather on the format's value table). It then runs the file (onnxruntime, or
onnx.reference for the standard FP4 form that onnxruntime's CPU build cannot run) on the
example inputs and checks parity with the converted model.

Example:
    >>> import torch, statqat_ao as sq
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> x = torch.randn(6, 16)
    >>> q = sq.convert(sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,)))
    >>> report = export(q, (x,), "model.onnx")  # doctest: +SKIP
    >>> run_artifact("model.onnx", (x,))[0].shape  # doctest: +SKIP
    (6, 4)
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from statqat_ao.backends import code_parity
from statqat_ao.backends.causal_lm import deployable
from statqat_ao.backends.onnx_codes import runtime_codes
from statqat_ao.backends.onnx_integer import integer_convolutions
from statqat_ao.backends.onnx_lower import (
    ACTIVATION_TYPES,
    LoweringError,
    lower_markers,
    weight_layout,
)
from statqat_ao.backends.parity import (
    ExportReport,
    UnsupportedModelError,
    as_tuple,
    check_formats,
    check_parity,
    flat_tensors,
    quantized_tensors,
)
from torch import fx

from statqat_ao.quantizers.dynamic import DynamicQuantizer
from statqat_ao.quantizers.quantized import QuantizedParams

BACKEND = "onnx"
DEFAULT_OPSET = 21  # block-quantized (per group) DequantizeLinear and INT4/UINT4
STANDARD_FP4_OPSET = 23  # FLOAT4E2M1
SUPPORTED = (
    "weights in any INT format (INT8/UINT8 codes, INT2-4/UINT2-4 as INT4/UINT4), FP8 E4M3/E5M2, "
    "FP4 E2M1 with MXFP4/NVFP4 (FLOAT4E2M1 in the standard form, Gather on UINT4 codes in the "
    "onnxruntime form), other float and NF4/SF4 lookup formats (Gather on UINT4/UINT8 codes); "
    "per tensor, per output channel or per group along the row. Activations per tensor in "
    f"{', '.join(ACTIVATION_TYPES)} (and fp4_e2m1 with fp4_form='standard')"
)
Fp4Form = Literal["ort", "standard"]


def default_tolerance(model: fx.GraphModule) -> float:
    """Parity tolerance (relative to the output's peak) for a converted model.

    The artifact computes the converted model's float32 values in another summation order,
    so a value that lands within rounding of a code boundary may quantize one code away.
    Such a flip moves the output by about one step of that activation grid, so the
    tolerance is one step of the coarsest activation format relative to its span
    (INT8: 1/255); 1e-4 for weight-only models (measured errors: 1e-7 to 1e-6, and 7e-4
    for one flipped INT8 code).

    Example:
        >>> import torch, statqat_ao as sq
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> q = sq.convert(sq.prepare_qat_fx(m, sq.statqat_qconfig, (torch.randn(2, 4),)))
        >>> round(default_tolerance(q), 5)
        0.00392
    """
    steps = [1.0 / (p.fmt.levels - 1) for _, p in quantized_tensors(model) if p.codes is None]
    return max([1e-4, *steps])


def supports(path: str, params: QuantizedParams, fp4_form: Fp4Form = "ort") -> str | None:
    """Why the ONNX backend cannot express ``params`` (None when it can).

    Example:
        >>> import torch
        >>> w = QuantizedParams("int4", torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int8))
        >>> supports("fc.weight_quant", w) is None
        True
        >>> supports("fc.input_quant", QuantizedParams("int3", torch.tensor(0.1), torch.tensor(0)))
        'activation format int3 has no QuantizeLinear type'
    """
    fmt = params.fmt
    if params.codes is None:
        if params.scale.numel() != 1:
            return "activations are quantized per tensor only"
        if fmt.name not in ACTIVATION_TYPES and not (fmt.name == "fp4_e2m1" and fp4_form == "standard"):
            hint = " (use fp4_form='standard')" if fmt.name == "fp4_e2m1" else ""
            return f"activation format {fmt.name} has no QuantizeLinear type{hint}"
    elif params.codes.dim() == 0:
        return "a scalar weight"
    else:
        try:
            weight_layout(tuple(params.codes.shape), tuple(params.scale.shape))
        except LoweringError as e:
            return str(e)
    if fmt.family != "int" and bool((params.zero_point != 0).any()):
        return "a float format with a non-zero zero point"
    return None


def export(
    model: fx.GraphModule,
    example_inputs: Sequence | torch.Tensor,
    path: str | Path,
    *,
    fp4_form: Fp4Form = "ort",
    dynamic_batch: bool = True,
    tolerance: float | None = None,
    opset: int | None = None,
) -> ExportReport:
    """Write ``model`` (from ``statqat_ao.convert``) as a QDQ ONNX file and check parity.

    Args:
        model: the converted model: a GraphModule, or a model swapped by
            :func:`statqat_ao.quantize_` (a Hugging Face causal LM is exported as
            ``(input_ids[, attention_mask]) -> logits`` without its KV cache).
        example_inputs: inputs to trace with and to check parity on.
        path: the ``.onnx`` file to write.
        fp4_form: ``"ort"``: E2M1 weights as UINT4 codes, Gather on the E2M1 table, Mul by
            the scale (runs in onnxruntime); ``"standard"``: FLOAT4E2M1 initializers and
            DequantizeLinear (opset 23; checked with onnx.checker and run with onnx.reference).
        dynamic_batch: make dim 0 of every input symbolic.
        tolerance: max relative error (see :mod:`statqat_ao.backends.parity`); default
            :func:`default_tolerance`.
        opset: default and minimum 21 (block quantization, INT4), 23 for the standard
            FP4 form (FLOAT4E2M1).

    Raises:
        UnsupportedModelError: before any work, for a format the backend cannot express.
        ParityError: the written file's outputs differ from the converted model's (the
            file stays, for inspection).

    Example:
        >>> import torch, statqat_ao as sq
        >>> m = torch.nn.Sequential(torch.nn.Linear(16, 8))
        >>> x = torch.randn(4, 16)
        >>> q = sq.convert(sq.prepare_qat_fx(m, sq.statqat_qconfig, (x,)))
        >>> print(export(q, x, "linear.onnx").max_error < 1e-3)  # doctest: +SKIP
        True
    """
    if fp4_form not in ("ort", "standard"):
        raise ValueError(f"fp4_form must be 'ort' or 'standard', got {fp4_form!r}")
    model = deployable(model)  # a Hugging Face causal LM: (input_ids[, attention_mask]) -> logits
    dynamic = [name for name, m in model.named_modules() if isinstance(m, DynamicQuantizer)]
    if dynamic:
        raise UnsupportedModelError(
            f"the onnx backend does not write per-token (dynamic) activation quantization yet ({dynamic[0]}, ...): "
            "lower the model with statqat_ao.backends.torchao, or train with per-tensor activations"
        )
    check_formats(model, BACKEND, lambda p, q: supports(p, q, fp4_form), SUPPORTED)
    inputs = as_tuple(example_inputs)
    needed = STANDARD_FP4_OPSET if fp4_form == "standard" else DEFAULT_OPSET
    if opset is not None and opset < needed:
        raise ValueError(f"opset {opset} is too old: fp4_form={fp4_form!r} needs opset {needed} or newer")
    opset = opset or needed
    proto = lower_markers(_torch_export(model, inputs, opset, dynamic_batch), fp4_form)
    integer_convolutions(proto)  # int32 biases of W8A8 convs: onnxruntime's QLinearConv
    if _has_float4(proto):
        proto.ir_version = max(proto.ir_version, 11)  # FLOAT4E2M1 needs IR 11
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    onnx.save_model(proto, path)
    error, layers = _verify(path, model, inputs, tolerance)
    return ExportReport(BACKEND, path, path.stat().st_size, error, tuple(layers))


def verify(path: str | Path, model: fx.GraphModule, example_inputs: Sequence | torch.Tensor, *, tolerance: float | None = None) -> float:
    """Run the ONNX file on the inputs, compare with ``model``; return the max relative error.

    A model with integer activation codes is checked layer by layer (each quantizer's codes
    against onnxruntime's, on onnxruntime's own inputs: :mod:`statqat_ao.backends.code_parity`),
    unless ``tolerance`` is given; then, or where the codes cannot be read, end to end
    against ``tolerance`` (default :func:`default_tolerance`).

    Raises:
        ParityError: a layer's codes differ beyond rounding ties, or the outputs differ.

    Example:
        >>> verify("model.onnx", q, x)  # doctest: +SKIP
        2.1e-07
    """
    return _verify(path, deployable(model), as_tuple(example_inputs), tolerance)[0]


def _verify(path, model, inputs: tuple, tolerance: float | None) -> tuple[float, list]:
    backend = f"{BACKEND} ({Path(path).name})"
    by_layer = tolerance is None and isinstance(model, fx.GraphModule) and code_parity.checkable(model)
    recorder = code_parity.CodeRecorder(model) if by_layer else None  # the reference run records the codes' shapes
    with torch.no_grad():
        reference = flat_tensors(recorder.run(*inputs) if by_layer else model(*inputs))
    raw = run_artifact(path, inputs)
    lowered = [torch.from_numpy(np.asarray(o)) for o in raw]
    codes = runtime_codes(path, inputs, raw) if by_layer else None
    if codes is not None and [tuple(c.shape) for c in codes] != [tuple(v.shape) for v, _, _ in recorder.records]:
        codes = None  # the file's quantizers do not line up with the model's: check end to end
    if codes is None:
        tolerance = default_tolerance(model) if tolerance is None else tolerance
        return check_parity(reference, lowered, backend=backend, tolerance=tolerance), []
    layers, fed = code_parity.check_layer_codes(model, inputs, codes)
    return code_parity.accept_layers(backend, layers, fed, lowered, reference, default_tolerance(model)), layers



def ort_session(path: str | Path | bytes, *, optimization_level: str = "all", threads: int | None = None,
                optimized_model_path: str | Path | None = None):  # fmt: skip
    """An onnxruntime CPU session with the options the parity check assumes.

    QDQ MatMul fused into MatMulNBits keeps float activations
    (``session.qdq_matmulnbits_accuracy_level=0``); ``optimization_level`` is one of
    ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``; ``optimized_model_path``: where
    onnxruntime writes the graph it runs (see :func:`kernel_ops`).

    Example:
        >>> session = ort_session("model.onnx")  # doctest: +SKIP
        >>> [i.name for i in session.get_inputs()]  # doctest: +SKIP
        ['x']
    """
    import onnxruntime as ort

    model = path if isinstance(path, bytes) else str(path)
    if optimization_level in ("extended", "all") and _quantizes_activations_to_4_bits(model):
        # onnxruntime's extended QDQ fusions compute INT4/UINT4 activations wrongly (0.6 of
        # the output's peak measured on a W4A4 CNN; exact with "basic" and onnx.reference).
        optimization_level = "basic"
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    # x86 CPUs without VNNI multiply u8 x s8 with a saturating 16-bit pairwise add
    # (pmaddubsw): INT8 weights that use their full range overflow it (measured 40% error
    # on a test transformer). This setting makes onnxruntime use exact u8 x u8 kernels,
    # at half the speed; VNNI's dot product (vpdpbusd) does not saturate, so it is set
    # only where the CPU lacks VNNI.
    if not _cpu_has_vnni():
        options.add_session_config_entry("session.x64quantprecision", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(
        model, options, providers=["CPUExecutionProvider"], disabled_optimizers=_disabled_rewrites(model)
    )


def kernel_ops(path: str | Path | bytes) -> list[str]:
    """The ops onnxruntime runs for an ONNX file after its graph optimizations, in an
    :func:`ort_session` (e.g. how many convs became ``QLinearConv``).

    Example:
        >>> kernel_ops("model.onnx").count("QLinearConv")  # doctest: +SKIP
        21
    """
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        ort_session(path, optimized_model_path=optimized)
        return [n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node]


@functools.cache
def _cpu_has_vnni() -> bool:
    """True on an x86 CPU with AVX-512 VNNI or AVX-VNNI (Linux's /proc/cpuinfo; False where unreadable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _load_graph(model: str | bytes) -> onnx.ModelProto:
    return onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)


def _quantizes_activations_to_4_bits(model: str | bytes) -> bool:
    proto = _load_graph(model)
    four_bit = {t.name for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    return any(n.op_type == "QuantizeLinear" and n.input[2:3] and n.input[2] in four_bit for n in proto.graph.node)


def _disabled_rewrites(model: str | bytes) -> list[str]:
    """onnxruntime rewrites to switch off: they change the converted model's values or
    break the graph.

    * WeightBiasQuantization rounds a float bias to int32 codes of ``s_in * s_w``: up to
      half such a step, enough to flip downstream activation codes (1e-3 relative
      measured on a test CNN); the layers it targets here stay float anyway.
    * ReluQuantRewrite drops a Relu before a QuantizeLinear with a zero point of 0: right
      for UINT8, wrong for FLOAT8 codes, which keep negative values (0.79 measured).
    * MatMulAddFusion wraps a 3-D MatMul + Add into Reshape-Gemm-Reshape and copies the
      QuantizeLinear with an INT8 ``output_dtype`` next to the UINT8 zero point that the
      S8->U8 rewrite gives it: the session fails to load (static-shape transformer).
    """
    proto = _load_graph(model)
    float8 = {t.name for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2)}
    quantizes_to_float8 = any(n.op_type == "QuantizeLinear" and n.input[2:3] and n.input[2] in float8 for n in proto.graph.node)
    return ["WeightBiasQuantization", "MatMulAddFusion"] + (["ReluQuantRewrite"] if quantizes_to_float8 else [])


def run_artifact(path: str | Path, inputs: Sequence | torch.Tensor) -> list[np.ndarray]:
    """Outputs of the ONNX file on ``inputs``: onnxruntime, or onnx.reference when the
    file holds FLOAT4E2M1 tensors (no onnxruntime CPU kernel reads them).

    Example:
        >>> run_artifact("model.onnx", torch.randn(2, 16))  # doctest: +SKIP
        [array(...)]
    """
    if _has_float4(onnx.load(str(path), load_external_data=False)):
        return run_reference(path, inputs)
    session = ort_session(path)
    return session.run(None, _feeds([i.name for i in session.get_inputs()], inputs))


def run_reference(path: str | Path | onnx.ModelProto, inputs: Sequence | torch.Tensor) -> list[np.ndarray]:
    """Outputs of the ONNX file computed by ``onnx.reference`` (slow, but every op of
    opset 23, FLOAT4E2M1 included).

    Example:
        >>> run_reference("fp4.onnx", torch.randn(2, 16))  # doctest: +SKIP
        [array(...)]
    """
    from onnx.reference import ReferenceEvaluator

    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    evaluator = ReferenceEvaluator(model)
    return evaluator.run(None, _feeds(list(evaluator.input_names), inputs))


def _feeds(names: list[str], inputs: Sequence | torch.Tensor) -> dict[str, np.ndarray]:
    tensors = [t for t in as_tuple(inputs) if isinstance(t, torch.Tensor)]
    if len(tensors) != len(names):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), got {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def _has_float4(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT4E2M1 for t in model.graph.initializer)


# ---------------------------------------------------------------- torch.onnx export


def _register_marker_schemas() -> None:
    """ONNX schemas for the marker ops, so onnxscript can build them (registered once)."""
    from onnx import defs

    if defs.has("Quantize", "statqat"):
        return
    param = defs.OpSchema.FormalParameter
    tensors = ["tensor(float)", "tensor(int8)", "tensor(uint8)"]
    for name in ("Quantize", "Dequantize"):
        defs.register_schema(
            defs.OpSchema(
                name,
                "statqat",
                1,
                inputs=[param("x", "T"), param("scale", "S"), param("zero_point", "Z")],
                outputs=[param("y", "U")],
                type_constraints=[("T", tensors, ""), ("S", ["tensor(float)"], ""), ("Z", ["tensor(int32)"], ""), ("U", tensors, "")],
                attributes=[defs.OpSchema.Attribute("fmt", defs.OpSchema.AttrType.STRING, "format name")],
            )
        )


def _translation_table() -> dict:
    from onnx_ir import DataType
    from onnxscript import opset21 as op
    from onnxscript.values import Opset

    from statqat_ao.numerics.codes import code_dtype
    from statqat_ao.numerics.formats import get_format

    _register_marker_schemas()
    markers = Opset("statqat", 1)
    float_types = {torch.float32: DataType.FLOAT, torch.float16: DataType.FLOAT16, torch.bfloat16: DataType.BFLOAT16}

    def quantize(x, scale, zero_point, fmt: str):
        y = markers.Quantize(x, scale, zero_point, fmt=fmt)
        y.dtype = DataType.INT8 if code_dtype(get_format(fmt)) == torch.int8 else DataType.UINT8
        y.shape = x.shape
        return y

    def dequantize(codes, scale, zero_point, fmt: str, out_dtype: torch.dtype = torch.float32):
        y = markers.Dequantize(codes, scale, zero_point, fmt=fmt)
        y.dtype, y.shape = DataType.FLOAT, codes.shape
        if out_dtype not in (torch.float32, None, 6):
            y = op.Cast(y, to=float_types[out_dtype])
        return y

    return {torch.ops.statqat.quantize.default: quantize, torch.ops.statqat.dequantize.default: dequantize}


def _torch_export(model: fx.GraphModule, inputs: tuple, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    dynamic = None
    if dynamic_batch:
        auto = torch.export.Dim.AUTO
        dynamic = tuple({0: auto} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir.serde", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # the marker outputs' types are settled by the rewrite
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model.eval(),
                inputs,
                dynamo=True,
                opset_version=opset,
                custom_translation_table=_translation_table(),
                dynamic_shapes=dynamic,
                verbose=False,
                optimize=True,
            )
            return program.model_proto  # serialized here, while the loggers are quiet
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
