"""``statqat demo``: StatQAT against its peers on real data (sklearn's digits), end to end.

For each seed: train :class:`~statqat_ao.models.DigitsCNN` in float, then QAT from that
checkpoint with weights *and* activations at 4 bits (W4A4), for INT4 and FP4 E2M1, with
every method on the same batches:

==========  =============================================  ==========================
method      weights                                        activations
==========  =============================================  ==========================
minmax      MinMax                                         MinMax
lsq         LSQ (learned scale)                            LSQ
octav       OCTAV (fixed point on the MSE clip)            OCTAV
analytic    StatQAT analytic (error model, one pass)       StatQAT iterative
iterative   StatQAT iterative (least squares)              StatQAT iterative
==========  =============================================  ==========================

Accuracy is that of the converted model (codes and scales, bit-identical to the trained
fake-quant model). Writes ``results.json``, ``training_curves.png``, ``layer_snr.png`` and
``run_info.json`` to the output folder, then exports the best StatQAT model with the
deployment backends and reports their parity checks and file sizes.

Example:
    >>> settings = DemoSettings.for_run(quick=True, seeds=None)
    >>> settings.seeds, settings.qat_epochs
    (1, 2)
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from statqat_ao.models import DigitsCNN, load_digits_split

from .training import accuracy, train_classifier

FORMATS = ("int4", "fp4_e2m1")
METHODS = {  # name: (weight method, activation method)
    "minmax": ("minmax", "minmax"),
    "lsq": ("lsq", "lsq"),
    "octav": ("octav", "octav"),
    "analytic": ("analytic", "iterative"),
    "iterative": ("iterative", "iterative"),
}
STATQAT_METHODS = ("analytic", "iterative")


@dataclass(frozen=True)
class DemoSettings:
    """The recipe: seeds, epochs, learning rates and batch size."""

    seeds: int = 3
    float_epochs: int = 20
    qat_epochs: int = 5
    float_lr: float = 3e-3
    qat_lr: float = 3e-4
    batch: int = 64

    @classmethod
    def for_run(cls, quick: bool, seeds: int | None) -> DemoSettings:
        """The full recipe, or ``--quick``'s (1 seed, fewer epochs); ``seeds`` overrides."""
        base = cls(seeds=1, float_epochs=8, qat_epochs=2) if quick else cls()
        return base if seeds is None else cls(**{**asdict(base), "seeds": seeds})


def qconfig_for(fmt: str, method: str):
    """W4A4 qconfig: ``fmt`` for weights (per channel) and activations (per tensor)."""
    from statqat_ao.frontends.qconfig import get_statqat_qconfig

    weight_method, activation_method = METHODS[method]
    return get_statqat_qconfig(fmt, fmt, weight_method=weight_method, activation_method=activation_method)


def _summary(runs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(runs),
        "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
        "runs": runs,
    }


def run_demo(out: Path, settings: DemoSettings, progress: bool = True, export: bool = True) -> dict:
    """Run the whole demo; returns ``results.json``'s content (also written to ``out``)."""
    from statqat_ao.passes import convert, prepare_qat_fx

    out.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = load_digits_split()
    runs: dict[str, list[float]] = {"float": [], **{f"{f}/{m}": [] for f in FORMATS for m in METHODS}}
    curves: dict[str, list[float]] = {}
    best: tuple[float, str, nn.Module] | None = None
    first_float: nn.Module | None = None
    started = time.perf_counter()
    total = settings.seeds * len(FORMATS) * len(METHODS)
    bar = tqdm(total=total, desc="QAT runs", disable=not progress)
    for seed in range(settings.seeds):
        torch.manual_seed(seed)
        model = DigitsCNN()
        desc = f"seed {seed} float" if progress else None
        train_classifier(model, x, y, settings.float_epochs, settings.float_lr, settings.batch, seed, desc)
        runs["float"].append(accuracy(model, x_test, y_test))
        first_float = first_float or copy.deepcopy(model)
        for fmt in FORMATS:
            for method in METHODS:
                key = f"{fmt}/{method}"
                bar.set_postfix_str(f"seed {seed} {key}")
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qat = prepare_qat_fx(copy.deepcopy(model).train(), qconfig_for(fmt, method), (x[: settings.batch],))
                losses = train_classifier(qat, x, y, settings.qat_epochs, settings.qat_lr, settings.batch, 1000 + seed)
                quantized = convert(qat)
                acc = accuracy(quantized, x_test, y_test)
                runs[key].append(acc)
                if seed == 0:
                    curves[key] = losses
                if fmt == "int4" and method in STATQAT_METHODS and (best is None or acc > best[0]):
                    best = (acc, f"{key} seed {seed}", quantized)
                bar.update()
    bar.close()
    results = {key: _summary(values) for key, values in runs.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from .demo_report import plot_layer_snr_of, plot_training_curves

    plot_training_curves(curves, out / "training_curves.png")
    plot_layer_snr_of(first_float, "int4", out / "layer_snr.png")
    info = {"settings": asdict(settings), "seconds": round(time.perf_counter() - started, 1)}
    if export and best is not None:
        info["export"] = export_best(best[2], best[1], x_test[:1], out)
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    return results


def export_best(model: nn.Module, label: str, example: torch.Tensor, out: Path) -> dict:
    """Lower the best StatQAT model with each backend; returns what each reported."""
    from statqat_ao.backends.parity import ParityError, UnsupportedModelError

    report: dict[str, dict] = {"model": {"label": label}}
    print(f"\nExporting the best StatQAT model ({label}):")
    for backend in ("torchao", "onnx", "executorch"):
        try:
            report[backend] = _export_one(backend, model, example, out)
            print(f"  {backend}: {report[backend]['summary']}")
        except (UnsupportedModelError, ParityError) as err:
            report[backend] = {"error": str(err)}
            print(f"  {backend}: not exported: {str(err).split('. It supports')[0]}")
    return report


def _export_one(backend: str, model: nn.Module, example: torch.Tensor, out: Path) -> dict:
    if backend == "torchao":
        from statqat_ao.backends.torchao import lower, weight_bytes

        lowered = lower(model, (example,))
        before, after = weight_bytes(lowered)
        path = out / "best_torchao.pt"
        torch.save(lowered.state_dict(), path)
        return {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "linear_weight_bytes": [before, after],
            "summary": f"Linear weights {before} -> {after} bytes ({after / before:.3f}x), outputs checked",
        }
    if backend == "onnx":
        from statqat_ao.backends.onnx import export
    else:
        from statqat_ao.backends.executorch import export
    suffix = "onnx" if backend == "onnx" else "pte"
    r = export(model, (example,), out / f"best.{suffix}")
    return {"path": str(r.path), "file_bytes": r.file_bytes, "max_error": r.max_error, "summary": str(r)}


def format_table(results: dict) -> str:
    """The results as a Markdown table: float first, then each format and method.

    Example:
        >>> print(format_table({"float": {"mean": 99.18, "std": 0.0, "runs": [99.18]}}))
        | model | test accuracy % (mean ± std) | runs |
        |---|---|---|
        | float | 99.18 ± 0.00 | 99.18 |
    """
    lines = ["| model | test accuracy % (mean ± std) | runs |", "|---|---|---|"]
    for key, r in results.items():
        runs = ", ".join(f"{v:.2f}" for v in r["runs"])
        lines.append(f"| {key} | {r['mean']:.2f} ± {r['std']:.2f} | {runs} |")
    return "\n".join(lines)
