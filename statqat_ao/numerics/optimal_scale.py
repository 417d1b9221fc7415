"""The exact (weighted) MSE-optimal continuous scale of a block, by a sweep over its breakpoints.

For a symmetric grid with 0 on it, a block's error as a function of the scale,
``E(s) = sum_i h_i (x_i - s * u_i(s))^2`` with ``u_i(s) = round_G(x_i / s)``, is piecewise
quadratic: the codes change only where ``x_i / s`` crosses a decision boundary (the
midpoint between two neighbouring grid values), that is at the breakpoints
``s = |x_i| / b_k``. Sweeping ``s`` down from infinity (every code 0), each breakpoint
moves one element's code one grid step outwards, so the sums ``B = sum h |x| |u|`` and
``C = sum h u^2`` change by one term. On each piece, ``E = A - 2 s B + s^2 C`` is
minimised at ``B / C`` clamped into the piece; the smallest of these is the global
optimum (clipping is the last piece of each element: its code stays at the grid's end).

Cost: one sort of ``block_len * boundaries`` breakpoints per block, so this is for
grids with few levels per side (4-bit formats: :func:`sweep_supported`); 8-bit grids use
candidate searches instead.

Example:
    >>> import torch
    >>> from statqat_ao.numerics.formats import get_format
    >>> x = torch.tensor([[1.0, 2.0, 3.0]])
    >>> s, err = optimal_scale(x, get_format("int4"))
    >>> s.tolist(), err.tolist()  # codes 1, 2, 3 at s = 1: exact
    ([1.0], [0.0])
"""

from __future__ import annotations

import functools

import torch

from .block_stats import active_reduction
from .formats import Format

MAX_BOUNDARIES_PER_SIDE = 16
_CHUNK_ELEMENTS = 1 << 18  # breakpoints per chunk: small enough to stay in cache (fastest measured)


@functools.cache
def _side_steps(fmt_name: str, grid: tuple[float, ...]) -> tuple[tuple[tuple[float, float, float], ...], ...]:
    """For the positive and the negative side: ``(boundary, step of |u|, step of u^2)`` outwards from 0."""
    sides = []
    for sign in (1.0, -1.0):
        mags = sorted({abs(g) for g in grid if g * sign > 0})
        steps, prev = [], 0.0
        for m in mags:
            steps.append(((prev + m) / 2, m - prev, m * m - prev * prev))
            prev = m
        sides.append(tuple(steps))
    return tuple(sides)


def sweep_supported(fmt: Format, symmetric: bool = True) -> bool:
    """Whether :func:`optimal_scale` applies: symmetric, 0 on the grid, few levels per side."""
    if not symmetric or 0.0 not in fmt.grid:
        return False
    pos, neg = _side_steps(fmt.name, fmt.grid)
    return max(len(pos), len(neg)) <= MAX_BOUNDARIES_PER_SIDE


def _sweep(x: torch.Tensor, h: torch.Tensor | None, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    pos, neg = _side_steps(fmt.name, fmt.grid)
    k = max(len(pos), len(neg))

    def table(col: int, pad: float) -> torch.Tensor:  # [2, k]: row 0 positive side, row 1 negative
        rows = [[r[col] for r in side] + [pad] * (k - len(side)) for side in (pos, neg)]
        return torch.tensor(rows, dtype=x.dtype, device=x.device)

    inv_bound, dg, dg2 = table(0, float("inf")).reciprocal(), table(1, 0.0), table(2, 0.0)
    a = x.abs()
    side = (x < 0).long()  # [B, L]
    hw = a if h is None else h * a
    t = (a.unsqueeze(-1) * inv_bound[side]).flatten(1)  # breakpoints; 0 for padding and x = 0
    db = (hw.unsqueeze(-1) * dg[side]).flatten(1)
    dc = ((torch.ones_like(a) if h is None else h).unsqueeze(-1) * dg2[side]).flatten(1)
    t, order = torch.sort(t, dim=1, descending=True)
    b = torch.cumsum(torch.gather(db, 1, order), dim=1)
    c = torch.cumsum(torch.gather(dc, 1, order), dim=1)
    lower = torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)  # piece j: s in [t_{j+1}, t_j]
    s = torch.where(c > 0, b / c.clamp(min=torch.finfo(c.dtype).tiny), t).clamp(min=lower, max=t)
    a_sum = (hw * a).sum(dim=1, keepdim=True)
    err = a_sum - s * (2 * b - s * c)
    err = torch.where((c > 0) & (t > 0), err, torch.full_like(err, float("inf")))
    best, j = err.min(dim=1)
    s_best = torch.gather(s, 1, j.unsqueeze(1)).squeeze(1)
    empty = ~torch.isfinite(best)  # an all-zero block: no breakpoint; every scale is exact
    s_best = torch.where(empty, torch.zeros_like(s_best), s_best)
    best = torch.where(empty, torch.zeros_like(best), best.clamp(min=0))
    return s_best, best


def optimal_scale(
    x: torch.Tensor, fmt: Format, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block exact optimum ``(scale [B], error [B])`` of ``x`` ``[B, L]`` on ``fmt``'s grid.

    ``weights``: per-element error weights broadcastable to ``x`` (``None``: plain MSE).
    The scale is continuous (float32 scales); an all-zero block gets scale 0 (the caller's
    fallback applies). Raises ValueError where :func:`sweep_supported` is False.
    """
    active = active_reduction()
    if active is not None and active.blocks:
        raise ValueError(
            "the exact scale sweep sorts each block's elements, which no all-reduce of sums can do, and "
            "these blocks are split over data-parallel ranks: estimate activations with analytic or "
            "iterative (or mse with exact=False) under statqat_ao.distributed"
        )
    if not sweep_supported(fmt):
        raise ValueError(f"the breakpoint sweep needs a symmetric grid through 0 with <= {MAX_BOUNDARIES_PER_SIDE} levels per side; {fmt.name} has not")
    x2 = x.reshape(x.shape[0], -1).float()
    h2 = None if weights is None else torch.broadcast_to(weights, x.shape).reshape(x2.shape).float()
    k = max(len(side) for side in _side_steps(fmt.name, fmt.grid))
    rows = max(1, _CHUNK_ELEMENTS // max(1, x2.shape[1] * k))
    scales, errors = [], []
    for start in range(0, x2.shape[0], rows):
        sl = slice(start, start + rows)
        s, e = _sweep(x2[sl], None if h2 is None else h2[sl], fmt)
        scales.append(s)
        errors.append(e)
    return torch.cat(scales).to(x.dtype), torch.cat(errors).to(x.dtype)
