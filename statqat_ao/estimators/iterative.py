"""Iterative StatQAT estimator: least-squares scale steps (Lloyd-Max with the grid shape fixed).

Each step assigns every value to its nearest grid point for the current scale, then
solves for the scale that minimises the block's squared error for those assignments:

    u_i = round_G(x_i / s + z) - z,      s <- sum_i x_i u_i / sum_i u_i^2

Neither half can raise the error, so no step raises the block MSE. The zero point of an
asymmetric quantizer stays at its initial (integer) value.

Alternation stops in a local minimum, and non-uniform grids (FP4) have several. A cold
start therefore runs from a few multiples of the analytic scale (``starts``) and keeps,
per block, the path that ends with the lowest error. A warm start (a tensor ``init``,
as in QAT) follows one path.
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_error import block_sse, centered_codes
from statqat_ao.numerics.block_stats import reduce_blocks
from statqat_ao.numerics.formats import Format

from .analytic import analytic_qparams
from .minmax import minmax_qparams
from .registry import Estimator, OnlineStep, register

DEFAULT_STEPS = 8
DEFAULT_STARTS = (1.0, 0.8, 1.2)


def least_squares_sums(
    x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(sum h*x*u, sum h*u*u)`` for the codes ``u`` of ``x`` at scale ``s``.

    ``h`` is 1 (plain MSE) or the per-element ``weights``: weighted least squares, whose
    solution ``s = sum h x u / sum h u^2`` minimises ``sum h (x - s u)^2`` for fixed codes.
    Additive over the parts of a block (the operands of a shared quantizer).
    """
    u = centered_codes(x, s, zp, fmt)
    hu = u if weights is None else weights * u
    sums, _ = reduce_blocks(sums=[x * hu, u * hu])
    return sums[0], sums[1]


def least_squares_update(num: torch.Tensor, den: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The least-squares scale ``num / den``, or ``s`` where that is undefined."""
    new = num / den.clamp(min=torch.finfo(den.dtype).tiny)
    return torch.where((den > 0) & (new > 0), new, s)


def least_squares_step(
    x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """One assignment + (weighted) least-squares update of the per-block scale ``s`` (``[B]``)."""
    return least_squares_update(*least_squares_sums(x, s, zp, fmt, weights), s)


def iterative_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    steps: int = DEFAULT_STEPS,
    init: str | torch.Tensor = "analytic",
    init_zero_point: torch.Tensor | None = None,
    starts: tuple[float, ...] = DEFAULT_STARTS,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block iterative scale for ``x`` of shape ``[B, L]``.

    ``init``: ``"analytic"`` (default) or ``"minmax"``, each run from every multiple in
    ``starts``; or a ``[B]`` tensor of scales to warm-start one path from (QAT takes one
    step per training iteration from the last scale). ``weights``: per-element error
    weights (weighted least squares; see :func:`least_squares_sums`).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if isinstance(init, torch.Tensor):
        s0 = init.reshape(-1).to(x.dtype)
        zp = torch.zeros_like(s0) if init_zero_point is None else init_zero_point.reshape(-1).to(x.dtype)
        starts = (1.0,)
    elif init == "analytic":
        s0, zp = analytic_qparams(x, fmt, symmetric, weights=weights)
    elif init == "minmax":
        s0, zp = minmax_qparams(x, fmt, symmetric)
    else:
        raise ValueError(f"init must be 'analytic', 'minmax' or a tensor of scales, got {init!r}")
    tiny = torch.finfo(x.dtype).tiny
    s0 = torch.where(s0 > 0, s0, torch.full_like(s0, 1.0)).clamp(min=tiny)
    best_s, best_err = None, None
    for factor in starts:
        s = s0 * factor
        for _ in range(steps):
            s = least_squares_step(x, s, zp, fmt, weights)
        if best_s is None:
            best_s = s
            if len(starts) > 1:
                best_err = block_sse(x, s, zp, fmt, weights)
            continue
        err = block_sse(x, s, zp, fmt, weights)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s, zp


def iterative_step(step: OnlineStep) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's QAT update: one least-squares step warm-started from the last scale.

    The first estimate (a cold start) runs the full offline estimator. The sums add
    over the operands of a shared quantizer, so they need not be joined into one tensor.
    """
    if not step.warm:
        return iterative_qparams(step.blocks, step.fmt, step.symmetric, weights=step.weights)
    zp = step.zero_point.float()
    num, den = least_squares_sums(step.blocks, step.scale, zp, step.fmt, step.weights)
    for t in step.shared:
        n, d = least_squares_sums(t.detach().float().unsqueeze(0), step.scale, zp, step.fmt)
        num, den = num + n, den + d
    return least_squares_update(num, den, step.scale), step.zero_point


register(
    Estimator(
        "iterative",
        iterative_qparams,
        online=iterative_step,
        keeps_zero_point=True,
        sums_shared_operands=True,
        error_weighted=True,
    )
)
