"""ExecuTorch export through XNNPACK: static INT8 (W8A8) and 8da4w.

``export(model, example_inputs, path)`` lowers the model :func:`statqat_ao.convert`
returned to an ExecuTorch program (``.pte``) whose quantized GEMMs run in XNNPACK, runs
it with ``executorch.runtime`` on the example inputs and checks it against the converted
model. Two deployments:

* ``activations=None`` (static W8A8): the model's own per-tensor INT8/UINT8 activation
  scales and its per-channel (or per-tensor) INT weight codes. A GEMM whose output the
  model requantizes runs in XNNPACK's int8 kernels; one whose output it leaves float runs
  as an fp32 XNNPACK GEMM on the dequantized codes (the report counts both).
* ``activations="dynamic_int8"`` (8da4w): a weight-only model's INT4 group (or INT4/INT8
  per-channel) Linear weights with per-token asymmetric INT8 activations chosen at run
  time, XNNPACK's ``qd8-f32-qb4w`` / ``qc8w`` kernels.

INT4 weight-only (float activations) is refused: with the pinned versions XNNPACK returns
silently wrong outputs for it. Programs have static shapes: the example inputs' shapes are
the program's shapes.

Parity: the program's outputs against the converted model's, within :data:`STATIC_TOLERANCE`
(:data:`DYNAMIC_TOLERANCE`). A static program of a deep network can miss that with every
layer right (an activation code that XNNPACK's integer arithmetic rounds the other way at
a tie travels on); then a second program that also returns every activation quantizer's
codes is built and each layer is checked on its own (:mod:`statqat_ao.backends.code_parity`),
and the end-to-end figure becomes a warning.

Example:
    >>> import torch, statqat_ao as sq
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(4, 16)
    >>> q = sq.convert(sq.prepare_qat_fx(model, sq.get_statqat_qconfig("int8", "int8"), (x,)))
    >>> report = export(q, (x,), "model.pte")  # doctest: +SKIP
    >>> run("model.pte", (x,))[0].shape  # doctest: +SKIP
    torch.Size([4, 2])
"""

from __future__ import annotations

import operator
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from statqat_ao.frontends.causal_lm import CausalLMGraph
from statqat_ao.quantizers.quantized import QuantizedParams

from . import code_parity
from .causal_lm import CausalLMLogits, deployable
from .parity import (
    ExportReport,
    ParityError,
    UnsupportedModelError,
    as_tuple,
    check_formats,
    check_parity,
    flat_tensors,
    linear_weight_reads,
)

BACKEND = "executorch"
# Static: XNNPACK requantizes each int8 GEMM output in fixed point and quantize_per_tensor
# multiplies by 1/scale where convert divides, so a value at a rounding boundary can land one
# code away: one step is 1/127 of an int8 tensor's peak (0.8%), and it propagates. Measured on
# the test models: 0.26-0.40% (about half a step); 0.02 allows ~2.5 steps.
STATIC_TOLERANCE = 0.02
# 8da4w: the converted (weight-only) model has float activations; per-token asymmetric int8
# rounds each to 1/255 of its token's range (uniform error, std range/(255*sqrt(12))), summed
# over K inputs and compounded over layers; XNNPACK also stores group scales as bfloat16 (up
# to 2^-9 relative). Measured: 0.21% (one Linear) to 0.54% (5 Linears); 0.05 is ~10x margin.
DYNAMIC_TOLERANCE = 0.05
SUPPORTED = (
    "static W8A8 (activations=None): per-tensor int8/uint8 activations, signed INT (up to 8 bits) "
    "weights per channel or per tensor with zero point 0; "
    "8da4w (activations='dynamic_int8', weight-only models): Linear weights in signed INT4 per group "
    "or signed INT4/INT8 per channel, zero point 0, float32 models"
)
_ACTIVATIONS = (None, "dynamic_int8")


@dataclass(frozen=True)
class ExecuTorchReport(ExportReport):
    """An :class:`ExportReport` plus what XNNPACK took: delegated nodes and GEMM kinds."""

    delegated_nodes: int = 0
    gemms: dict[str, int] = field(default_factory=dict)  # int8_gemms / fp32_gemms / dynamic_gemms
    outside_delegate: dict[str, int] = field(default_factory=dict)  # op -> count run by portable kernels

    def __str__(self) -> str:
        kinds = ", ".join(f"{v} {k.removesuffix('s').replace('_', ' ')}s" for k, v in self.gemms.items())
        return f"{super().__str__()}; XNNPACK: {self.delegated_nodes} nodes ({kinds})"


class DelegationError(RuntimeError):
    """A quantized GEMM was not taken by XNNPACK (it would run on the slow portable path)."""


def export(
    model: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    activations: str | None = None,
    tolerance: float | None = None,
) -> ExecuTorchReport:
    """Lower a converted model to an XNNPACK ExecuTorch program at ``path`` and check parity.

    Args:
        model: the GraphModule :func:`statqat_ao.convert` returned.
        example_inputs: inputs to export with; their shapes are the program's (static) shapes.
        path: the ``.pte`` file to write.
        activations: ``None`` uses the model's own (static) activation quantizers;
            ``"dynamic_int8"`` adds per-token INT8 activations to a weight-only model (8da4w).
        tolerance: the largest parity error allowed, ``max|pte - converted| / max|converted|``
            (default :data:`STATIC_TOLERANCE` or :data:`DYNAMIC_TOLERANCE`).

    Raises:
        UnsupportedModelError: before any work, for a format or layout XNNPACK cannot run.
        DelegationError: a quantized GEMM stayed outside XNNPACK.
        ParityError: the program's outputs differ from the converted model's beyond tolerance
            (the file is removed).

    Example:
        >>> import torch, statqat_ao as sq
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 8))
        >>> x = torch.randn(4, 64)
        >>> qc = sq.get_statqat_qconfig("int4", None, weight_granularity=32)
        >>> q = sq.convert(sq.prepare_qat_fx(model, qc, (x,)))
        >>> export(q, (x,), "w4.pte", activations="dynamic_int8").gemms  # doctest: +SKIP
        {'dynamic_gemms': 1}
    """
    inputs = as_tuple(example_inputs)
    # A Hugging Face decoder's graph (sq.prepare_qat_fx on a causal LM): rewrite the graph
    # inside its calling convention, export (input_ids[, attention_mask]) -> logits.
    graph, wrap = (model.graph_module, model.rewrap) if isinstance(model, CausalLMGraph) else (model, None)
    if not isinstance(graph, fx.GraphModule):
        raise UnsupportedModelError(
            f"the executorch backend rewrites the graph statqat_ao.convert makes of a graph-mode model; "
            f"{type(model).__name__} is not one. For a Hugging Face decoder, prepare it with "
            "sq.prepare_qat_fx(model, qconfig, (input_ids,)) instead of sq.quantize_, or export it with "
            "statqat_ao.backends.onnx"
        )
    dynamic = _check_model(graph, activations)
    from . import executorch_graph as rewrite

    gm, gemms = rewrite.rewrite_dynamic(graph) if dynamic else rewrite.rewrite_static(graph)
    if not dynamic and gemms["fp32_gemms"] and not gemms["int8_gemms"]:
        warnings.warn(
            f"statqat: none of this model's {gemms['fp32_gemms']} GEMMs runs on XNNPACK's int8 kernels: an int8 "
            "GEMM needs its output quantized, and here each GEMM's output feeds an op the quantizers (on layer "
            "inputs) leave float (SiLU, GELU, LayerNorm, the model output). The program computes the converted "
            "model in fp32 on the dequantized weights, which it stores as float.",
            stacklevel=2,
        )
    edge = _lower(gm if wrap is None else CausalLMLogits(wrap(gm)), inputs)
    delegated, outside = _delegation(edge.exported_program().graph_module)
    _check_delegated(outside, gemms)
    path = Path(path)
    path.write_bytes(edge.to_executorch().buffer)
    with torch.no_grad():
        reference = flat_tensors(deployable(model)(*inputs))
    tol = tolerance if tolerance is not None else (DYNAMIC_TOLERANCE if dynamic else STATIC_TOLERANCE)
    outputs = run(path, inputs)
    layers: list = []
    try:
        try:
            error = check_parity(reference, outputs, backend=BACKEND, tolerance=tol)
        except ParityError as end_to_end:
            # Static codes flipped at rounding ties travel through a deep network: check layer
            # by layer (code_parity) where the program's codes can be read; else refuse.
            if dynamic or wrap is not None or tolerance is not None or not code_parity.checkable(graph):
                raise
            error, layers = _check_layers(graph, gm, inputs, outputs, reference, end_to_end)
    except ParityError:
        path.unlink()  # leave no program that disagrees with the model behind
        raise
    return ExecuTorchReport(BACKEND, path, path.stat().st_size, error, tuple(layers), delegated_nodes=delegated,
                            gemms=gemms, outside_delegate=dict(outside))  # fmt: skip


def _check_layers(model: fx.GraphModule, gm: fx.GraphModule, inputs: tuple, outputs: list, reference: list,
                  end_to_end: ParityError) -> tuple[float, list]:  # fmt: skip
    """Per-layer parity of a static program: a second program that also returns every
    activation quantizer's codes (its outputs must equal the program's bit for bit)."""
    from . import executorch_graph as rewrite

    probe, zero_points = rewrite.with_activation_codes(gm)
    with tempfile.TemporaryDirectory() as folder:
        probe_path = Path(folder) / "codes.pte"
        probe_path.write_bytes(_lower(probe, inputs).to_executorch().buffer)
        probed = run(probe_path, inputs)
    if len(probed) != len(outputs) + len(zero_points) or any(
        not torch.equal(a, b) for a, b in zip(outputs, probed, strict=False)
    ):
        raise ParityError(f"{end_to_end} (its activation codes could not be read to check it layer by layer)")
    codes = [c.to(torch.int64) - zp for c, zp in zip(probed[len(outputs) :], zero_points, strict=True)]
    if len(codes) != len(code_parity.activation_quantizers(model)):
        raise ParityError(f"{end_to_end} (the program's quantizers do not line up with the model's)")
    layers, fed = code_parity.check_layer_codes(model, inputs, codes, window=code_parity.INTEGER_TIE_WINDOW)
    return code_parity.accept_layers(BACKEND, layers, fed, outputs, reference, STATIC_TOLERANCE), layers


def load_program(path: str | os.PathLike) -> Callable[..., list[torch.Tensor]]:
    """Load a ``.pte`` with ``executorch.runtime``; returns ``forward(*inputs) -> outputs``.

    Example:
        >>> forward = load_program("model.pte")  # doctest: +SKIP
        >>> forward(torch.randn(4, 16))[0].shape  # doctest: +SKIP
        torch.Size([4, 2])
    """
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    if method is None:
        raise RuntimeError(f"{path} has no 'forward' method")

    def forward(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(method.execute([t.contiguous() for t in inputs]))

    return forward


def run(path: str | os.PathLike, inputs: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Run a ``.pte`` once on ``inputs`` (a tensor or a tuple of them) with ``executorch.runtime``.

    Example:
        >>> run("model.pte", torch.randn(4, 16))[0].shape  # doctest: +SKIP
        torch.Size([4, 2])
    """
    return load_program(path)(*as_tuple(inputs))


# ---- checks before any work ----------------------------------------------------------


def _check_model(model: nn.Module, activations: str | None) -> bool:
    """Raise UnsupportedModelError unless XNNPACK can run ``model``; returns whether it is 8da4w."""
    if activations not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activations must be one of {_ACTIVATIONS}, got {activations!r}")
    dynamic = activations == "dynamic_int8"
    tensors = check_formats(model, BACKEND, lambda p, q: _unsupported(model, p, q, dynamic), SUPPORTED)
    weights = [path for path, p in tensors if p.codes is not None]
    has_activations = len(weights) < len(tensors)
    if not weights:
        raise UnsupportedModelError("the model holds no quantized weights: nothing for XNNPACK's quantized kernels")
    if dynamic and has_activations:
        raise UnsupportedModelError(
            "activations='dynamic_int8' is for weight-only models; this one has static activation "
            "quantizers: export it with activations=None (static W8A8)"
        )
    if not dynamic and not has_activations:
        raise UnsupportedModelError(
            f"weight-only models ({weights[0]}, ...) are not exported through XNNPACK: with the pinned "
            "executorch its INT4 weight-only path returns silently wrong outputs. Pass "
            "activations='dynamic_int8' to deploy it as 8da4w (INT4 group weights, dynamic INT8 "
            "activations), or use statqat_ao.backends.onnx / statqat_ao.backends.torchao for weight-only"
        )
    return dynamic


def _unsupported(model: nn.Module, path: str, p: QuantizedParams, dynamic: bool) -> str | None:
    f, g = p.fmt, p.granularity
    if p.dtype != torch.float32:
        return f"the model is {p.dtype}; XNNPACK quantized kernels take float32 models"
    if f.family != "int" or f.bits > 8:
        return "not an INT format"
    if p.codes is None:  # an activation
        if dynamic:
            return None  # refused as a whole in _check_model
        if f.bits != 8 or "narrow" in f.name:
            return "activations must be int8 or uint8 (XNNPACK requantizes to the full 8-bit range)"
        return None if g == "tensor" else "activations must be per tensor"
    if not f.signed:
        return "weights must be signed INT (XNNPACK weights are int8 with zero point 0)"
    if bool((p.zero_point != 0).any()):
        return "weights must be symmetric (zero point 0); prepare with weight_symmetric=True"
    if dynamic:
        return _unsupported_dynamic_weight(model, path, p)
    if isinstance(g, int):
        return "group weights need dynamic activations: pass activations='dynamic_int8' (8da4w, Linear only)"
    if g == "channel" and p.scale.reshape(p.scale.shape[0], -1).shape[1] != 1:
        return "per-channel weights must be scaled along the output channel (axis 0)"
    return None


def _unsupported_dynamic_weight(model: nn.Module, path: str, p: QuantizedParams) -> str | None:
    if path not in {read_path for _, _, read_path in linear_weight_reads(model)}:
        return "8da4w quantizes Linear weights only; skip this layer in the qconfig or export W8A8"
    g = p.granularity
    if isinstance(g, int):
        return None if p.fmt.bits <= 4 else "group weights must be INT4 (XNNPACK qb4w)"
    return None if g == "channel" else "8da4w weights must be per channel or per group"


# ---- lowering --------------------------------------------------------------------------


def _lower(gm: nn.Module, inputs: tuple):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(gm, inputs, strict=False)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])


def _delegation(graph_module: fx.GraphModule) -> tuple[int, Counter]:
    """``(nodes inside XNNPACK delegates, ops left outside them)``."""
    delegated, outside = 0, Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            delegated += sum(n.op == "call_function" for n in lowered.original_module.graph.nodes)
        else:
            outside[_op_name(node)] += 1
    return delegated, outside


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "_name", None) or getattr(node.target, "__name__", node.target)).replace("::", ".")


def _check_delegated(outside: Counter, gemms: dict[str, int]) -> None:
    # float ops (LayerNorm, mean, a float layer) may run on portable kernels; quantized ones may not
    quant = {op: n for op, n in outside.items() if "quantized_decomposed" in op}
    if quant:
        raise DelegationError(
            f"XNNPACK left {quant} outside its delegate (GEMMs expected in it: {gemms}), so quantized "
            "layers would not run in XNNPACK. Check that each quantized layer's input is quantized and "
            "its weight is per channel / per group as supported"
        )


__all__ = [
    "DYNAMIC_TOLERANCE",
    "STATIC_TOLERANCE",
    "SUPPORTED",
    "DelegationError",
    "ExecuTorchReport",
    "ParityError",
    "UnsupportedModelError",
    "export",
    "load_program",
    "run",
]
