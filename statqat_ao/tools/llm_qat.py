"""Weight-only QAT of a causal LM, measured the way the benchmark and the demo report it.

One run: copy the float model, apply a quantizer (``sq.quantize_`` with a qconfig, or any
callable that quantizes a model in place), measure held-out perplexity before training
(PTQ: the scales estimated from the weights alone), train on the same batches as every
other run, measure again (QAT), and check that the converted model's logits equal the
trained model's bit for bit.

Example:
    >>> import statqat_ao as sq
    >>> from statqat_ao.models import load_smollm2, pydoc_split
    >>> model, tokenizer = load_smollm2(num_layers=2)  # doctest: +SKIP
    >>> split = pydoc_split(tokenizer)  # doctest: +SKIP
    >>> qc = sq.get_statqat_qconfig("nvfp4", None, skip=["lm_head"])
    >>> run = qat_run(model, split, statqat_recipe(qc), LLMQATSettings(steps=2))  # doctest: +SKIP
    >>> run.qat_perplexity < run.ptq_perplexity  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from statqat_ao.estimators import error_weighted_methods
from statqat_ao.frontends.calibrate import calibrate
from statqat_ao.frontends.module_swap import convert_swapped, quantize_
from statqat_ao.models.text import TextSplit, perplexity


@dataclass(frozen=True)
class LLMQATSettings:
    """The training recipe every run shares: same batches, steps, learning rate and seed."""

    steps: int = 20
    batch: int = 2
    window: int = 256
    lr: float = 5e-5
    scale_lr: float = 1e-3  # LSQ's learned step sizes
    eval_windows: int = 8
    seed: int = 0
    calibration_tokens: int = 2048  # from the start of the training text (disjoint from held-out)


@dataclass(frozen=True)
class Recipe:
    """How to quantize a float model in place (``prepare``), and convert it after training.

    ``convert`` returns the deployable model; ``None`` means the recipe has none to check.
    ``learned_scales``: name suffixes of the quantizers' learned scale parameters, trained
    at ``LLMQATSettings.scale_lr``. ``calibrate``: run :func:`statqat_ao.calibrate` on the
    calibration tokens after ``prepare`` (output-aware weight scales need the layer inputs).
    """

    prepare: Callable[[nn.Module], object]
    convert: Callable[[nn.Module], nn.Module] | None = None
    learned_scales: tuple[str, ...] = ("fake_quant.scale",)
    calibrate: bool = False


def statqat_recipe(qconfig, calibrate: bool | None = None) -> Recipe:
    """:func:`statqat_ao.quantize_` with ``qconfig``; converted with :func:`statqat_ao.convert`.

    ``calibrate``: default: when the weight quantizers are output-aware (``weight_error``
    ``"output"`` / ``"auto"`` with a method that minimises an error).
    """
    if calibrate is None:
        spec = qconfig.weight
        calibrate = spec is not None and spec.error != "weight" and spec.method in error_weighted_methods()
    return Recipe(prepare=lambda model: quantize_(model, qconfig), convert=convert_swapped, calibrate=calibrate)


def calibration_batches(split: TextSplit, settings: LLMQATSettings) -> list[dict]:
    """The calibration tokens as ``{"input_ids": [batch, window]}`` forwards."""
    windows = split.calibration(settings.calibration_tokens, settings.window)
    return [{"input_ids": chunk} for chunk in windows.split(settings.batch)]


@dataclass
class QATRun:
    """What one run measured."""

    ptq_perplexity: float
    qat_perplexity: float
    losses: list[float] = field(default_factory=list)
    step_seconds: float = float("nan")
    prepare_seconds: float = float("nan")
    converted_max_abs_diff: float | None = None  # logits of converted vs trained model, eval
    model: nn.Module | None = None  # the trained model (fake quant)
    converted: nn.Module | None = None

    @property
    def bit_identical(self) -> bool | None:
        return None if self.converted_max_abs_diff is None else self.converted_max_abs_diff == 0.0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the input embedding (kept float and frozen; tied to ``lm_head``)."""
    embedding = model.get_input_embeddings().weight
    return [p for p in model.parameters() if p.requires_grad and p is not embedding]


def parameter_groups(
    model: nn.Module, settings: LLMQATSettings, learned_scales: tuple[str, ...] = ("fake_quant.scale",)
) -> list[dict]:
    """The weights at ``lr``; learned quantizer scales (LSQ's, named ``*learned_scales``) at ``scale_lr``."""
    scales = {id(p) for name, p in model.named_parameters() if name.endswith(learned_scales)}
    params = trainable_parameters(model)
    groups = [{"params": [p for p in params if id(p) not in scales], "lr": settings.lr}]
    if scales:
        groups.append({"params": [p for p in params if id(p) in scales], "lr": settings.scale_lr})
    return groups


def train_causal_lm(
    model: nn.Module,
    split: TextSplit,
    settings: LLMQATSettings,
    progress: bool = True,
    desc: str = "QAT",
    learned_scales: tuple[str, ...] = ("fake_quant.scale",),
) -> tuple[list[float], float]:
    """AdamW on next-token loss, called as Hugging Face loops call a model (``labels=``).

    Returns the per-step losses and the median wall time of a step.
    """
    model.train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings, learned_scales), weight_decay=0.0)
    losses, seconds = [], []
    batches = split.train_batches(settings.batch, settings.window, settings.steps, seed=settings.seed)
    for ids in tqdm(batches, total=settings.steps, desc=desc, disable=not progress, leave=False):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    model.eval()
    return losses, statistics.median(seconds) if seconds else float("nan")


@torch.no_grad()
def logits_difference(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    """max |logits_a - logits_b| on ``ids`` in eval mode (0.0: bit-identical)."""
    return float((a.eval()(input_ids=ids).logits - b.eval()(input_ids=ids).logits).abs().max())


def qat_run(
    float_model: nn.Module,
    split: TextSplit,
    recipe: Recipe,
    settings: LLMQATSettings,
    progress: bool = True,
    desc: str = "QAT",
    keep_models: bool = False,
) -> QATRun:
    """PTQ perplexity, QAT on ``settings``, QAT perplexity and the convert check, for one recipe."""
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(float_model)
    held_out = split.held_out[-settings.eval_windows :]
    start = time.perf_counter()
    recipe.prepare(model)
    if recipe.calibrate:
        calibrate(model, calibration_batches(split, settings), progress=progress)
    prepared_in = time.perf_counter() - start
    ptq = perplexity(model, held_out, progress=progress, desc=f"{desc}: PTQ perplexity")
    losses, step = train_causal_lm(model, split, settings, progress, desc, recipe.learned_scales) if settings.steps else ([], float("nan"))
    qat = perplexity(model, held_out, progress=progress, desc=f"{desc}: perplexity") if settings.steps else ptq
    run = QATRun(ptq, qat, losses, step, prepared_in)
    if recipe.convert is not None:
        converted = recipe.convert(model)
        run.converted_max_abs_diff = logits_difference(model, converted, held_out[:2])
        run.converted = converted if keep_models else None
    run.model = model if keep_models else None
    return run


FLOAT_TRAINING = Recipe(prepare=lambda model: None)  # the float model, trained like every other row


def gap_recovered(float_ppl: float, ptq_minmax_ppl: float, ppl: float) -> float:
    """Share of the PTQ-MinMax perplexity gap closed: 1.0 reaches float, 0.0 is MinMax PTQ."""
    gap = ptq_minmax_ppl - float_ppl
    return float("nan") if gap <= 0 else (ptq_minmax_ppl - ppl) / gap
