"""The MSE-optimal scale: the limit every estimator is measured against.

Exact where it can be, exhaustive elsewhere:

* Discrete scale formats (MXFP4's E8M0, NVFP4's E4M3 under its tensor scale): every
  representable scale from ``max|x| / g_K / 64`` to ``4 max|x| / g_K``
  (:data:`E4M3_RANGE`, :data:`E8M0_RANGE`), the best kept.
* FP32 scales on symmetric grids through 0 with few levels (4-bit and smaller INT, FP
  and lookup grids): the exact optimum, by the breakpoint sweep of
  :mod:`statqat_ao.numerics.optimal_scale`.
* Otherwise (8-bit grids, asymmetric quantizers): a dense sweep of clip ratios relative
  to MinMax (``coarse`` candidates over ``[lo, hi]``; ``hi`` defaults to 2 for FP and
  lookup grids, where a clip beyond the block maximum can lower the error, and 1.25 for
  INT), then a finer sweep (``fine`` candidates) around the best one.

Every variant minimises the weighted error when given ``weights``.
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.block_stats import reduce_blocks
from statqat_ao.numerics.formats import Format
from statqat_ao.numerics.optimal_scale import optimal_scale, sweep_supported
from statqat_ao.numerics.scale_formats import scale_candidates

from .minmax import minmax_qparams
from .registry import Estimator, register
from .search import keep_best

E4M3_RANGE = tuple(range(-48, 17))  # 8 values per binade: 1/64 .. 4 x max|x| / g_K
E8M0_RANGE = tuple(range(-6, 3))


def _best_ratio(x, s_mm, zp_for, fmt, ratios, weights):
    best_err = torch.full_like(s_mm, float("inf"))
    best_r = torch.ones_like(s_mm)
    for r in ratios.tolist():
        s = s_mm * r
        err = block_sse(x, s, zp_for(s), fmt, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r


def mse_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    lo: float = 0.02,
    hi: float | None = None,
    coarse: int = 250,
    fine: int = 50,
    weights: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block MSE-optimal scale for ``x`` of shape ``[B, L]`` (slow: a reference).

    ``tensor_scale``: NVFP4's FP32 per-tensor scale (1 if omitted). ``exact=False``: the
    dense sweep even where the exact one applies (blocks split over data-parallel ranks
    need it: the exact sweep sorts each block's elements).
    """
    if fmt.is_block_format:
        _, m = reduce_blocks(maxima=[x.abs()])
        base = torch.where(m[0] > 0, m[0] / fmt.qmax, torch.ones_like(m[0]))
        ts = torch.ones((), dtype=x.dtype, device=x.device) if tensor_scale is None else tensor_scale.to(x.dtype)
        offsets = E8M0_RANGE if fmt.scale_format == "e8m0" else E4M3_RANGE
        zp = torch.zeros_like(base)
        best_s, _ = keep_best(x, list(ts * scale_candidates(base / ts, fmt.scale_format, offsets)), lambda s: zp, fmt, weights)
        return best_s, zp
    if exact and symmetric and sweep_supported(fmt):
        s, _ = optimal_scale(x, fmt, weights)
        return s, torch.zeros_like(s)
    if hi is None:
        hi = 1.25 if fmt.family == "int" else 2.0
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
    r = _best_ratio(x, s_mm, zp_for, fmt, coarse_r, weights)
    step = (hi - lo) / (coarse - 1)
    # Refine around each block's best coarse ratio: offsets shared by all blocks.
    offsets = torch.linspace(-step, step, fine, dtype=torch.float64)
    best_err = block_sse(x, s_mm * r, zp_for(s_mm * r), fmt, weights)
    best = r.clone()
    for o in offsets.tolist():
        cand = (r + o).clamp(min=lo / 2)
        s = s_mm * cand
        err = block_sse(x, s, zp_for(s), fmt, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    s = s_mm * best
    return s, zp_for(s)


# A search over many scales: offline only.
register(Estimator("mse", mse_qparams, error_weighted=True, representable_scales=True))
