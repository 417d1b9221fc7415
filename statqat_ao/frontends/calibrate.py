"""``sq.calibrate``: post-training statistics, without training.

Runs the model over calibration batches with every StatQAT quantizer in calibration
mode: activation scales update on every batch as in training, output-aware weight
quantizers collect their layer input's second moments over all batches, and at the end
re-estimate their scales from scratch with those moments (the full, cold estimator).
Works on any model holding :class:`~statqat_ao.FakeQuantizer` modules: prepared by
``sq.prepare_qat_fx`` (graph mode, Hugging Face decoders included) or swapped by
``sq.quantize_``.

Example:
    >>> import torch, statqat_ao as sq
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> qconfig = sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, weight_error="output")
    >>> model = sq.quantize_(model, qconfig)
    >>> batches = [torch.randn(16, 64) * torch.linspace(0.1, 4.0, 64) for _ in range(4)]
    >>> model = sq.calibrate(model, batches)
    >>> model.training, model[0].weight_fake_quant.input_count.item()
    (False, 64.0)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from statqat_ao.quantizers.fake_quantizer import FakeQuantizer
from statqat_ao.quantizers.nonfinite import NonFiniteTracking


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], progress: bool = False) -> nn.Module:
    """Update every StatQAT statistic from ``batches`` and return ``model`` in eval mode.

    Args:
        model: a model with StatQAT quantizers (``sq.prepare_qat_fx`` / ``sq.quantize_``).
        batches: what the model is called with, one item per forward: a tensor
            (``model(batch)``), a tuple (``model(*batch)``) or a dict of keywords
            (``model(**batch)``, e.g. ``{"input_ids": ids}``).
        progress: show a progress bar.

    Returns:
        ``model`` (modified in place), in eval mode: ready to evaluate or ``sq.convert``.

    Raises:
        ValueError: ``model`` holds no StatQAT quantizer, or ``batches`` is empty.
    """
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    if not quantizers:
        raise ValueError(
            f"{type(model).__name__} holds no StatQAT quantizer: prepare it first (sq.prepare_qat_fx or sq.quantize_)"
        )
    model.eval()  # dropout off, batch norm on its running statistics: as the model is evaluated
    for q in quantizers:
        q.start_calibration()
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            _call(model, batch)
            seen += 1
    finally:
        for q in quantizers:
            q.finish_calibration()  # empty-handed (seen == 0), scales stay as they were
    if seen == 0:
        raise ValueError("calibrate got no batches: pass an iterable of model inputs")
    for m in model.modules():
        if isinstance(m, NonFiniteTracking):
            m.restart_update_count()  # training after calibration starts at step 0
    return model


__all__ = ["calibrate"]
