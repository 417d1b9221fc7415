"""What every backend shares: the quantized tensors of a converted model, the check that
a backend can express them (before any work), and the parity check after lowering.

A backend lowers the model that :func:`statqat_ao.convert` produced, runs the lowered
artifact on the example inputs and compares with the converted model. The error is the
largest absolute difference divided by the largest magnitude of the reference output,
so one tolerance fits logits and hidden states alike.

Example:
    >>> import torch
    >>> check_parity([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 2.0001])], backend="demo", tolerance=1e-3) < 1e-4
    True
    >>> try:
    ...     check_parity([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 2.5])], backend="demo", tolerance=1e-3)
    ... except ParityError as e:
    ...     print(e)
    demo output differs from the converted model: output 0 (shape (2,)), max abs error 0.5 at index (1,) (2.5 vs 2), relative error 0.25 > tolerance 0.001
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from statqat_ao.quantizers.quantized import QuantizedParams


@dataclass(frozen=True)
class ExportReport:
    """What an ``export`` wrote: the file, its size, and the parity error it passed with."""

    backend: str
    path: Path
    file_bytes: int
    max_error: float  # max|artifact - converted| / max|converted| on the example inputs
    # Per activation quantizer, where the backend checked codes layer by layer
    # (statqat_ao.backends.code_parity.LayerCodes): the share that differ and by how much.
    layers: tuple = ()

    def __str__(self) -> str:
        text = f"{self.backend}: wrote {self.path} ({self.file_bytes / 1024:.1f} KiB), parity error {self.max_error:.3g}"
        if self.layers:
            differing = sum(layer.differing for layer in self.layers)
            total = sum(layer.codes for layer in self.layers)
            steps = max(layer.max_steps for layer in self.layers)
            text += (
                f"; {len(self.layers)} activation quantizers checked layer by layer: {differing} of {total} codes "
                f"differ (at most {steps} step, all at rounding ties)"
            )
        return text


class UnsupportedModelError(ValueError):
    """The backend cannot express this model or format (raised before any lowering work)."""


class ParityError(RuntimeError):
    """The lowered artifact's output differs from the converted model beyond tolerance."""


def quantized_tensors(model: nn.Module) -> list[tuple[str, QuantizedParams]]:
    """``(path, QuantizedParams)`` of every quantized tensor in a converted model.

    Raises UnsupportedModelError when the model was not converted (it still holds
    fake-quantize modules): lower the output of ``sq.convert``.
    """
    found, fake = [], []
    for path, mod in model.named_modules():
        if isinstance(mod, QuantizedParams):
            found.append((path, mod))
        elif type(mod).__name__ in ("FakeQuantizer", "StatQATFakeQuantize", "LSQFakeQuantize", "StatQATPT2EFakeQuantize"):
            fake.append(path)
    if fake:
        raise UnsupportedModelError(
            f"the model still holds fake-quantize modules ({', '.join(fake[:3])}...): "
            "backends lower a converted model, call statqat_ao.convert(model) first"
        )
    if not found and not isinstance(model, fx.GraphModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} holds no quantized tensor: lower what statqat_ao.convert returns"
        )
    return found


def check_formats(
    model: nn.Module,
    backend: str,
    supports: Callable[[str, QuantizedParams], str | None],
    supported_text: str,
) -> list[tuple[str, QuantizedParams]]:
    """Apply ``supports(path, params) -> reason or None`` to every quantized tensor.

    Raises UnsupportedModelError listing every tensor the backend cannot express and
    what it does support; returns the quantized tensors otherwise.
    """
    tensors = quantized_tensors(model)
    problems = [f"{path} ({p.fmt.name}, {_granularity_text(p)}): {why}" for path, p in tensors if (why := supports(path, p))]
    if problems:
        raise UnsupportedModelError(
            f"the {backend} backend cannot lower " + "; ".join(problems) + f". It supports: {supported_text}"
        )
    return tensors


def _granularity_text(p: QuantizedParams) -> str:
    g = p.granularity
    return f"group {g}" if isinstance(g, int) else f"per {g}"


LINEAR_TARGETS = (torch._C._nn.linear, nn.functional.linear, torch.ops.aten.linear.default)


def linear_weight_reads(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, str]]:
    """``(linear node, weight dequantize node, QuantizedParams path)`` of each Linear whose
    weight a converted model reads from codes (fx-traced or torch.export-traced graphs)."""
    from statqat_ao.numerics.codes import dequantize

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "call_function" and w.target is dequantize and w.args[0].op == "get_attr":
            found.append((node, w, w.args[0].target.rpartition(".")[0]))
    return found


def flat_tensors(outputs) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) model output, in pytree order."""
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def check_parity(
    reference: Sequence[torch.Tensor] | torch.Tensor,
    lowered: Sequence[torch.Tensor] | torch.Tensor,
    *,
    backend: str,
    tolerance: float,
) -> float:
    """Raise ParityError unless every lowered output matches the reference.

    The error of an output is ``max|lowered - reference| / max|reference|``. Returns the
    largest error (0.0 for bit-identical outputs).
    """
    ref, low = flat_tensors(reference), flat_tensors(lowered)
    if len(ref) != len(low):
        raise ParityError(f"{backend} returned {len(low)} outputs, the converted model {len(ref)}")
    worst = 0.0
    for i, (r, lo) in enumerate(zip(ref, low, strict=True)):
        lo = torch.as_tensor(lo)
        if tuple(r.shape) != tuple(lo.shape):
            raise ParityError(f"{backend} output {i} has shape {tuple(lo.shape)}, the converted model's {tuple(r.shape)}")
        r32, lo32 = r.detach().float().cpu(), lo.detach().float().cpu()
        if not bool(torch.isfinite(lo32).all()) and bool(torch.isfinite(r32).all()):
            raise ParityError(f"{backend} output {i} holds NaN/Inf where the converted model's is finite")
        diff = (lo32 - r32).abs()
        if diff.numel() == 0:
            continue
        peak = float(r32.abs().max())
        err = float(diff.max()) / max(peak, torch.finfo(torch.float32).tiny)
        if err > tolerance:
            where = tuple(int(k) for k in torch.unravel_index(diff.argmax(), diff.shape))
            raise ParityError(
                f"{backend} output differs from the converted model: output {i} (shape {tuple(r.shape)}), "
                f"max abs error {float(diff.max()):.4g} at index {where} ({float(lo32[where]):.4g} vs "
                f"{float(r32[where]):.4g}), relative error {err:.4g} > tolerance {tolerance:g}"
            )
        worst = max(worst, err)
    return worst


def as_tuple(example_inputs: Iterable | torch.Tensor) -> tuple:
    """Example inputs as a tuple (a single tensor is wrapped)."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
