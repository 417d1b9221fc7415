"""Exhaustive search for the MSE-optimal scale: the limit every estimator is measured against.

A dense sweep of clip ratios relative to MinMax (``coarse`` candidates over
``[lo, hi]``), then a finer sweep (``fine`` candidates) around the best one.
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.block_stats import reduce_blocks
from statqat_ao.numerics.formats import Format

from .minmax import minmax_qparams
from .registry import Estimator, register


def _best_ratio(x, s_mm, zp_for, fmt, ratios):
    best_err = torch.full_like(s_mm, float("inf"))
    best_r = torch.ones_like(s_mm)
    for r in ratios.tolist():
        s = s_mm * r
        err = block_sse(x, s, zp_for(s), fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r


def mse_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    lo: float = 0.02,
    hi: float = 1.25,
    coarse: int = 250,
    fine: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block MSE-optimal scale for ``x`` of shape ``[B, L]`` (slow: a reference)."""
    s_mm, zp_mm = minmax_qparams(x, fmt, symmetric)
    s_mm = torch.where(s_mm > 0, s_mm, torch.ones_like(s_mm))
    if symmetric:
        def zp_for(s):
            return zp_mm
    else:
        _, m = reduce_blocks(maxima=[x, -x])
        mid = (m[0] - m[1]) / 2
        center = (fmt.qmin + fmt.qmax) / 2

        def zp_for(s):
            return torch.round(center - mid / s).clamp(fmt.qmin, fmt.qmax)

    coarse_r = torch.linspace(lo, hi, coarse, dtype=torch.float64)
    r = _best_ratio(x, s_mm, zp_for, fmt, coarse_r)
    step = (hi - lo) / (coarse - 1)
    # Refine around each block's best coarse ratio: offsets shared by all blocks.
    offsets = torch.linspace(-step, step, fine, dtype=torch.float64)
    best_err = block_sse(x, s_mm * r, zp_for(s_mm * r), fmt)
    best = r.clone()
    for o in offsets.tolist():
        cand = (r + o).clamp(min=lo / 2)
        s = s_mm * cand
        err = block_sse(x, s, zp_for(s), fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    s = s_mm * best
    return s, zp_for(s)


register(Estimator("mse", mse_qparams))  # a search over many scales: offline only
