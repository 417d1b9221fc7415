"""Per-layer parity of activation codes: a runtime's codes against the converted model's.

A runtime (onnxruntime, XNNPACK) computes each layer from the same integer codes as the
converted model, but in its own float32 order (and its own requantization). Where a
value lands within that rounding of a code boundary (``n + 0.5`` steps), the two may
round to neighbouring codes, and in a deep network one such flip travels on: the end-to-end
outputs of a trained W8A8 resnet18 differ by 0.6-0.8% of the peak, more than one INT8 step,
with every layer computed correctly. The end-to-end comparison cannot tell that from a
real mismatch (a 5% wrong scale on one channel moved resnet18's output by *less*).

So each activation quantizer is checked on its own: the converted model runs with the
runtime's codes substituted at every quantizer (:class:`CodeRecorder`), so quantizer ``k``
sees exactly the inputs the runtime's layer ``k`` saw, and then

* every code must equal the runtime's, or differ by one step at a value within the
  runtime's window (:data:`TIE_WINDOW` for float arithmetic) of the rounding boundary;
* the model fed the runtime's codes must reproduce the runtime's outputs to float
  rounding (:data:`FED_TOLERANCE`): what follows the last quantizer is computed right.

The window is a property of the runtime's arithmetic, not of the model. A float runtime
(onnxruntime's Conv / MatMul / Add on dequantized values) evaluates the same dot products
of the same codes in another order: errors of order ``K u |v|`` for a value of at most
2^8 steps, 4e-5 steps the largest seen on trained CNNs (resnet18, K up to 4,608), inside
:data:`TIE_WINDOW` = 2^-7. An integer runtime (XNNPACK) also rounds each bias to int32
codes of ``s_x s_w`` (up to half of ``s_x s_w / s_y`` steps) and requantizes with
fixed-point multipliers: :data:`INTEGER_TIE_WINDOW` = 2^-5 (7.3e-3 steps the largest seen,
trained mobilenet_v2). A real fault moves values by a fraction of a step: a one-code
weight error shifted the flipped values 0.1 step from the boundary, a 1% scale error
flipped 11-27% of a layer's codes, at values up to half a step from it.

Example:
    >>> import torch
    >>> report = compare_codes("q", torch.tensor([3, 4]), torch.tensor([3, 5]), torch.tensor([3.0, 4.4999]))
    >>> report.differing, report.max_steps, report.within_ties
    (1, 1, True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx

from statqat_ao.numerics.codes import quantize
from statqat_ao.numerics.formats import get_format

from .parity import ParityError, check_parity, flat_tensors

TIE_WINDOW = 2.0**-7  # steps around a rounding boundary where float32 order may decide the code
INTEGER_TIE_WINDOW = 2.0**-5  # with int32 bias rounding and fixed-point requantization (XNNPACK)
FED_TOLERANCE = 1e-4  # relative to the output's peak: float rounding after the last quantizer


@dataclass
class LayerCodes:
    """One activation quantizer's codes: how many the runtime computed otherwise, and how."""

    path: str
    codes: int
    differing: int
    max_steps: int
    max_tie_distance: float  # of a differing code's value from its rounding boundary, in steps
    window: float = TIE_WINDOW

    @property
    def within_ties(self) -> bool:
        return self.max_steps <= 1 and self.max_tie_distance <= self.window

    def __str__(self) -> str:
        share = self.differing / max(self.codes, 1)
        return f"{self.path}: {self.differing}/{self.codes} codes ({100 * share:.3g}%) differ, up to {self.max_steps} step(s)"


def compare_codes(path: str, reference: torch.Tensor, runtime: torch.Tensor, steps: torch.Tensor,
                  window: float = TIE_WINDOW) -> LayerCodes:  # fmt: skip
    """Compare integer code values (zero point removed); ``steps`` is the reference's value
    before rounding, in steps (``x / scale``)."""
    diff = (runtime.to(torch.int64) - reference.to(torch.int64)).abs()
    differing = diff > 0
    distance = ((steps.double() - steps.double().floor()) - 0.5).abs()
    return LayerCodes(
        path,
        diff.numel(),
        int(differing.sum()),
        int(diff.max()) if diff.numel() else 0,
        float(distance[differing].max()) if bool(differing.any()) else 0.0,
        window,
    )


def activation_quantizers(model: fx.GraphModule) -> list[fx.Node]:
    """The ``statqat::quantize`` calls of a converted model (activation codes), in graph order."""
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target is quantize]


def quantizer_path(node: fx.Node) -> str:
    """``layer.input_quant`` for a quantize call reading ``layer.input_quant.scale``."""
    scale = node.args[1]
    return scale.target.rpartition(".")[0] if isinstance(scale, fx.Node) and scale.op == "get_attr" else node.name


def checkable(model: fx.GraphModule) -> bool:
    """True when every activation quantizer has an integer format (codes one step apart)."""
    nodes = activation_quantizers(model)
    return bool(nodes) and all(get_format(n.args[3]).family == "int" for n in nodes)


class CodeRecorder(fx.Interpreter):
    """Runs a converted model, recording each quantizer's input (in steps) and codes;
    with ``substitute``, each quantizer's output is replaced by the given code values
    (zero point removed) before the model goes on."""

    def __init__(self, model: fx.GraphModule, substitute: list[torch.Tensor] | None = None):
        super().__init__(model)
        self.substitute = substitute
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (values, steps, zero point)

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is quantize:
            x, scale, zero_point = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:3])
            zp = torch.zeros((), dtype=torch.int64) if zero_point is None else zero_point.to(torch.int64)
            self.records.append((out.to(torch.int64) - zp, (x / scale).detach(), zp))
            if self.substitute is not None:
                out = (self.substitute[len(self.records) - 1].to(torch.int64).reshape(out.shape) + zp).to(out.dtype)
        return out


def check_layer_codes(model: fx.GraphModule, inputs: tuple, runtime_codes: list[torch.Tensor],
                      window: float = TIE_WINDOW) -> tuple[list[LayerCodes], object]:  # fmt: skip
    """Per-layer comparison against the runtime's code values; returns the layers and the
    model's outputs when fed the runtime's codes (for the :data:`FED_TOLERANCE` check)."""
    fed = CodeRecorder(model, runtime_codes)
    with torch.no_grad():
        outputs = fed.run(*inputs)
    paths = [quantizer_path(n) for n in activation_quantizers(model)]
    layers = [
        compare_codes(path, values, runtime, steps, window)
        for path, (values, steps, _), runtime in zip(paths, fed.records, runtime_codes, strict=True)
    ]
    return layers, outputs


def accept_layers(backend: str, layers: list[LayerCodes], fed_outputs, runtime_outputs, reference, tolerance: float):
    """Raise ParityError unless every layer is within its ties and the model fed the runtime's
    codes reproduces the runtime's outputs; warn when the end-to-end difference exceeds
    ``tolerance``. Returns the end-to-end error."""
    wrong = [layer for layer in layers if not layer.within_ties]
    if wrong:
        raise ParityError(
            f"{backend}: activation codes differ from the converted model's beyond rounding ties, on the same "
            "inputs: " + "; ".join(f"{layer} (a differing value {layer.max_tie_distance:.3g} steps from the "
                                   f"rounding boundary, the window is {layer.window:g})" for layer in wrong[:3])
        )
    check_parity(flat_tensors(fed_outputs), runtime_outputs, backend=f"{backend}, the converted model fed its codes,",
                 tolerance=FED_TOLERANCE)  # fmt: skip
    error = check_parity(reference, runtime_outputs, backend=backend, tolerance=float("inf"))
    if error > tolerance:
        flipped = sum(layer.differing for layer in layers)
        warnings.warn(
            f"{backend}: the outputs differ from the converted model's by {error:.3g} of the peak end to end, where "
            f"{flipped} activation code(s) took the neighbouring code at a rounding tie and the difference travelled "
            "on; every layer computes the converted model's codes from its inputs (checked layer by layer)",
            stacklevel=4,
        )
    return error


__all__ = [
    "accept_layers",
    "FED_TOLERANCE",
    "INTEGER_TIE_WINDOW",
    "TIE_WINDOW",
    "CodeRecorder",
    "LayerCodes",
    "activation_quantizers",
    "check_layer_codes",
    "checkable",
    "compare_codes",
    "quantizer_path",
]
