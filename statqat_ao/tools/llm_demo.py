"""``statqat demo``: weight-only FP4 QAT of a real LLM (SmolLM2-135M), end to end.

SmolLM2-135M-Instruct (:func:`statqat_ao.models.load_smollm2`) is quantized weight-only
in NVFP4 (FP4 E2M1 values in blocks of 16 with an FP8 E4M3 scale each, under one float32
tensor scale; every Linear but the tied ``lm_head``), once with MinMax scales and once
with StatQAT's, and trained for a few steps on Python's own documentation
(``pydoc_data.topics``). It prints held-out perplexity for float (as loaded, and trained
the same way: training on this text also adapts the model to it), PTQ and QAT with each
method, writes training curves and per-layer weight SNR figures, then converts the
StatQAT model (codes and scales), lowers it to torchao tensors, checks it against the
trained model and lets the deployed model finish a sentence.

NVFP4 is the default because it is FP4 as torchao deploys it; ``--format fp4_e2m1
--granularity 32`` (float32 group scales, the paper's recipe) trains and converts the
same way, but torchao has no tensor type for it, so that run stops before lowering.

Example:
    >>> settings = LLMDemoSettings.for_run(quick=True)
    >>> settings.steps, settings.fmt
    (4, 'nvfp4')
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from statqat_ao.frontends.qconfig import get_statqat_qconfig
from statqat_ao.models import load_smollm2, perplexity, pydoc_split
from statqat_ao.numerics.formats import get_format

from .llm_qat import FLOAT_TRAINING, LLMQATSettings, QATRun, gap_recovered, qat_run, statqat_recipe

PROMPT = "The for statement in Python"
METHODS = {"MinMax": "minmax", "StatQAT": "auto"}  # StatQAT: the default qconfig (auto, output-aware, calibrated)
SNR_LAYERS = (0, 15, 29)  # decoder layers shown in the per-layer SNR figure


@dataclass(frozen=True)
class LLMDemoSettings:
    """What the demo runs: the format, the QAT recipe shared by both methods, the model size."""

    fmt: str = "nvfp4"
    granularity: int | str = 16
    steps: int = 15
    batch: int = 2
    window: int = 256
    lr: float = 5e-5
    eval_windows: int = 8
    num_layers: int | None = None  # None: all 30 decoder layers
    new_tokens: int = 20

    @classmethod
    def for_run(cls, quick: bool, **overrides) -> LLMDemoSettings:
        """The full demo (about 6 minutes on 2 cores), or ``quick``: 4 steps, 2 windows."""
        base = cls(steps=4, eval_windows=2, new_tokens=8) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def qat(self) -> LLMQATSettings:
        return LLMQATSettings(steps=self.steps, batch=self.batch, window=self.window, lr=self.lr, eval_windows=self.eval_windows)


def run_llm_demo(out: Path, settings: LLMDemoSettings, progress: bool = True) -> dict:
    """Run the demo; returns ``results.json``'s content (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (the first load converts the GGUF file, about 30 s) ...", flush=True)
    model, tokenizer = load_smollm2(num_layers=settings.num_layers)
    split = pydoc_split(tokenizer)
    held_out = split.held_out[-settings.eval_windows :]
    results: dict = {"float": perplexity(model, held_out, progress=progress, desc="float perplexity")}
    print(f"float perplexity {results['float']:.2f}", flush=True)
    # Training on this text also adapts the model to it: the float model trained the same
    # way says how much of QAT's drop in perplexity is that, not the quantizer.
    trained = qat_run(model, split, FLOAT_TRAINING, settings.qat(), progress=progress, desc="float, same training")
    results["float, same training"] = trained.qat_perplexity
    print(f"float trained the same way: {trained.qat_perplexity:.2f}", flush=True)
    runs: dict[str, QATRun] = {}
    for label, method in METHODS.items():
        qconfig = get_statqat_qconfig(settings.fmt, None, weight_granularity=settings.granularity, weight_method=method, skip=["lm_head"])
        runs[label] = qat_run(model, split, statqat_recipe(qconfig), settings.qat(), progress=progress, desc=f"QAT {label}", keep_models=label == "StatQAT")
        print(f"{label}: PTQ {runs[label].ptq_perplexity:.2f}, QAT {runs[label].qat_perplexity:.2f}", flush=True)
    minmax_ptq = runs["MinMax"].ptq_perplexity
    for label, run in runs.items():
        results[f"PTQ {label}"] = run.ptq_perplexity
        results[f"QAT {label}"] = run.qat_perplexity
        results[f"QAT {label} gap recovered"] = gap_recovered(results["float"], minmax_ptq, run.qat_perplexity)
        results[f"QAT {label} converted max diff"] = run.converted_max_abs_diff
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _figures(model, {"float": trained, **runs}, settings, out, progress)
    info = {"settings": asdict(settings), "deployment": deploy(runs["StatQAT"].converted, tokenizer, settings, out)}
    info["deployment"]["float_generated"] = _generate(model, tokenizer, settings.new_tokens)
    print(f'float model, for comparison: "{info["deployment"]["float_generated"]}"')
    info["seconds"] = round(time.perf_counter() - started, 1)
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    return results


def _figures(float_model: nn.Module, runs: dict[str, QATRun], settings: LLMDemoSettings, out: Path, progress: bool) -> None:
    from .demo_report import plot_layer_snr_of, plot_training_curves

    name = get_format(settings.fmt).name
    plot_training_curves({f"{name}/{label}": run.losses for label, run in runs.items()}, out / "training_curves.png",
                         window=5, title="SmolLM2-135M weight-only QAT", log_y=False)  # fmt: skip
    layers = [i for i in SNR_LAYERS if i < float_model.config.num_hidden_layers]
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    plot_layer_snr_of(
        float_model, settings.fmt, out / "layer_snr.png", settings.granularity,
        title=f"SmolLM2-135M weights of layers {', '.join(map(str, layers))} in {name} (256 rows each)",
        include=lambda n: n.startswith(prefixes), max_rows=256, progress=progress,
    )  # fmt: skip


def deploy(converted: nn.Module, tokenizer, settings: LLMDemoSettings, out: Path) -> dict:
    """Lower the converted StatQAT model to torchao tensors, generate, and report the sizes."""
    from statqat_ao.backends.parity import UnsupportedModelError
    from statqat_ao.backends.torchao import lower, weight_bytes

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    try:
        lowered = lower(converted, (ids,))  # checks every layer and the logits against `converted`
    except UnsupportedModelError as err:
        print(f"\nnot lowered to torchao: {err}")
        return {"lowered": False, "reason": str(err)}
    with torch.no_grad():
        reference = converted(input_ids=ids).logits
        parity = float((lowered(input_ids=ids).logits - reference).abs().max() / reference.abs().max())
    text = _generate(lowered, tokenizer, settings.new_tokens)
    float_bytes, stored_bytes = weight_bytes(lowered)
    lowered_paths = {w.path for w in lowered.lowered_weights}
    other = sum(p.numel() * p.element_size() for n, p in lowered.named_parameters() if n not in lowered_paths)
    report = {
        "lowered": True,
        "generated": text,
        "parity": parity,  # max |lowered - converted| / max |converted| over the prompt's logits
        "linear_weight_bytes": {"fp32": float_bytes, "deployed": stored_bytes},
        "model_bytes": {"fp32": float_bytes + other, "deployed": stored_bytes + other},
    }
    print(f'\ndeployed model (torchao tensors; logits within {parity:.1e} of the converted model\'s peak): "{text}"')
    print(f"Linear weights {float_bytes / 2**20:.1f} MiB -> {stored_bytes / 2**20:.1f} MiB ({float_bytes / stored_bytes:.1f}x smaller); "
          f"whole model {(float_bytes + other) / 2**20:.1f} -> {(stored_bytes + other) / 2**20:.1f} MiB "
          "(the float embedding, tied to lm_head, stays as it is)")  # fmt: skip
    return report


@torch.no_grad()
def _generate(model: nn.Module, tokenizer, new_tokens: int) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def format_table(results: dict) -> str:
    """The demo's perplexity table in Markdown.

    Example:
        >>> print(format_table({"float": 14.5, "PTQ MinMax": 19.0, "QAT MinMax": 15.0, "QAT MinMax gap recovered": 0.9}))
        | model | held-out perplexity | PTQ-MinMax gap recovered |
        |---|---|---|
        | float | 14.50 | |
        | PTQ MinMax | 19.00 | |
        | QAT MinMax | 15.00 | 90% |
    """
    lines = ["| model | held-out perplexity | PTQ-MinMax gap recovered |", "|---|---|---|"]
    for key, value in results.items():
        if key.endswith(("gap recovered", "max diff")):
            continue
        gap = results.get(f"{key} gap recovered")
        lines.append(f"| {key} | {value:.2f} |{'' if gap is None else f' {100 * gap:.0f}%'} |")
    return "\n".join(lines)
