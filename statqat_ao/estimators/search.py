"""Search: the lowest-error scale among each block's candidates, on the scale format's grid.

For small blocks, where the analytic estimate is capped by the block's own maximum (it
*is* MinMax at FP4 groups of 32) and least squares stops in a local minimum, the error
is evaluated at a few candidate scales per block and the best is kept:

* FP32 scales on symmetric 4-bit (and smaller) grids: the exact optimum, by the
  breakpoint sweep of :mod:`statqat_ao.numerics.optimal_scale`. FP4's error is so
  jagged in the scale at groups of 16-128 that a ratio grid plus least squares stays
  0.3-0.8 dB above it (measured on Gaussian blocks).
* Other FP32 scales (8-bit grids, asymmetric INT): MinMax's scale and
  ``r * max|x| / g_K`` for the ratios ``r`` in :data:`RATIOS`, then
  :data:`POLISH_STEPS` least-squares steps from the best (kept only where they lower
  the error, which they cannot raise for their own codes).
* Discrete scales (MXFP4's E8M0, NVFP4's E4M3 under its FP32 tensor scale): every
  representable scale in a window around ``max|x| / g_K`` (:data:`E4M3_OFFSETS`,
  :data:`E8M0_OFFSETS`): the result is representable, so no rounding step follows.

The error is the block's MSE, or with ``weights`` (an output-aware weight quantizer) the
weighted error ``sum h (w - q)^2``. Because MinMax's own scale is a candidate (or the
exact optimum is taken), the search never does worse than MinMax on that error.

QAT (a warm step, at most 3 passes over the weight): FP32 scales take one weighted
least-squares step from the last scale (1 pass); discrete scales compare the last scale
with its two neighbours on the scale grid (3 passes).

Example:
    >>> import torch
    >>> from statqat_ao.numerics.formats import get_format
    >>> x = torch.randn(8, 32)
    >>> s, zp = search_qparams(x, get_format("fp4_e2m1"), True)
    >>> s.shape, bool((s > 0).all())
    (torch.Size([8]), True)
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.block_stats import reduce_blocks
from statqat_ao.numerics.formats import Format
from statqat_ao.numerics.optimal_scale import optimal_scale, sweep_supported
from statqat_ao.numerics.scale_formats import scale_candidates

from .iterative import least_squares_step
from .minmax import minmax_qparams
from .registry import Estimator, OnlineStep, register

RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
POLISH_STEPS = 2
# 8 E4M3 values per binade: about [0.35, 1.6] x max|x| / g_K (FP4's optimum often maps
# the block maximum to 4, not 6: a clip beyond the maximum; an output-aware error can
# clip a block's low-energy maximum hard).
E4M3_OFFSETS = tuple(range(-12, 6))
E8M0_OFFSETS = (-2, -1, 0, 1)  # powers of two from 1/4 to 2 x the one just above max|x| / g_K
NEIGHBOURS = (-1, 0, 1)


def keep_best(x, candidates, zp_for, fmt, weights):
    """Per block, the candidate scale (of the list of ``[B]`` tensors) with the lowest error, and that error."""
    best_s, best_err = None, None
    for s in candidates:
        err = block_sse(x, s, zp_for(s), fmt, weights)
        if best_s is None:
            best_s, best_err = s, err
            continue
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s, best_err


def _zero_point_rule(x: torch.Tensor, fmt: Format, symmetric: bool):
    """The zero point each candidate scale takes: 0, or the grid centred on the block's mid-range."""
    if symmetric:
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return lambda s: zero
    _, m = reduce_blocks(maxima=[x, -x])
    mid = (m[0].clamp(min=0) - m[1].clamp(min=0)) / 2
    center = (fmt.qmin + fmt.qmax) / 2

    def zp_for(s: torch.Tensor) -> torch.Tensor:
        return torch.round(center - mid / s).clamp(fmt.qmin, fmt.qmax)

    return zp_for


def search_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    weights: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
    ratios: tuple[float, ...] = RATIOS,
    polish: int = POLISH_STEPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block searched scale and zero point for ``x`` of shape ``[B, L]``.

    ``tensor_scale``: NVFP4's FP32 per-tensor scale (block scales are ``tensor_scale *``
    an E4M3 value); 1 if omitted.
    """
    s_mm, _ = minmax_qparams(x, fmt, symmetric)
    s_mm = torch.where(s_mm > 0, s_mm, torch.ones_like(s_mm))
    zp_for = _zero_point_rule(x, fmt, symmetric)
    if fmt.is_block_format:
        ts = torch.ones((), dtype=x.dtype, device=x.device) if tensor_scale is None else tensor_scale.to(x.dtype)
        _, m = reduce_blocks(maxima=[x.abs()])
        base = torch.where(m[0] > 0, m[0] / fmt.qmax, torch.ones_like(m[0]))
        offsets = E8M0_OFFSETS if fmt.scale_format == "e8m0" else E4M3_OFFSETS
        candidates = ts * scale_candidates(base / ts, fmt.scale_format, offsets)
        s, _ = keep_best(x, list(candidates), zp_for, fmt, weights)
        return s, zp_for(s)
    if symmetric and sweep_supported(fmt):
        s, _ = optimal_scale(x, fmt, weights)
        s = torch.where(s > 0, s, s_mm)
        return s, zp_for(s)
    span = s_mm * ((fmt.qmax - fmt.qmin) / 2 if (fmt.family == "int" and fmt.signed and symmetric) else 1.0)
    base = span / fmt.qmax if symmetric else s_mm
    s, err = keep_best(x, [s_mm] + [base * r for r in ratios], zp_for, fmt, weights)
    zp = zp_for(s)
    for _ in range(polish):
        s_new = least_squares_step(x, s, zp, fmt, weights)
        err_new = block_sse(x, s_new, zp, fmt, weights)
        better = err_new < err
        s, err = torch.where(better, s_new, s), torch.where(better, err_new, err)
    return s, zp


def search_step(step: OnlineStep) -> tuple[torch.Tensor, torch.Tensor]:
    """A QAT step: the full search on a cold start, then a local move from the last scale."""
    if not step.warm:
        return search_qparams(step.blocks, step.fmt, step.symmetric, step.weights, step.tensor_scale)
    zp = step.zero_point.float()
    if step.fmt.is_block_format:
        ts = torch.ones((), dtype=step.scale.dtype, device=step.scale.device) if step.tensor_scale is None else step.tensor_scale
        candidates = ts * scale_candidates(step.scale / ts, step.fmt.scale_format, NEIGHBOURS)
        s, _ = keep_best(step.blocks, list(candidates), lambda s: zp, step.fmt, step.weights)
        return s, step.zero_point
    return least_squares_step(step.blocks, step.scale, zp, step.fmt, step.weights), step.zero_point


register(
    Estimator(
        "search",
        search_qparams,
        online=search_step,
        keeps_zero_point=True,
        error_weighted=True,
        representable_scales=True,
    )
)
