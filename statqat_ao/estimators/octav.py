"""OCTAV (Sakr et al., 2022): Newton fixed-point iteration on the MSE-optimal clip.

For a clip point C the error is sum over clipped values of (|x| - C)^2 plus, for values
inside, the granular noise delta_i^2 C^2 / 12 (delta_i: the local grid step relative to
C). Setting the derivative to zero gives the fixed point

    C <- sum_{|x| > C} |x| / (n_clipped + sum_{|x| <= C} delta_i^2 / 12)

which for a b-bit INT grid is OCTAV's original update; for FP and lookup grids the local
step varies with |x|, which this generalises to. Symmetric quantizers only.
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_stats import reduce_blocks, reduce_blocks_with_count
from statqat_ao.numerics.error_model import c_opt
from statqat_ao.numerics.formats import Format
from statqat_ao.numerics.rounding import grid_spacing

from .common import error_model_gmax
from .registry import Estimator, OnlineStep, register

DEFAULT_STEPS = 20


def octav_qparams(
    x: torch.Tensor, fmt: Format, symmetric: bool, steps: int = DEFAULT_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block OCTAV scale for ``x`` of shape ``[B, L]``."""
    if not symmetric:
        raise ValueError("octav estimates symmetric quantizers only; pass symmetric=True")
    gmax = error_model_gmax(fmt, True)
    a = x.abs()
    sums, _, n = reduce_blocks_with_count(sums=[a * a])
    clip = c_opt(fmt.name) * (sums[0] / n).sqrt()  # start from the Gaussian optimum
    for _ in range(steps):
        inside = a <= clip[:, None]
        rel_step = grid_spacing(a * (gmax / clip[:, None]), fmt) / gmax
        s, _ = reduce_blocks(
            sums=[torch.where(inside, 0.0, a), (~inside).to(a.dtype), torch.where(inside, rel_step**2 / 12, 0.0)]
        )
        den = s[1] + s[2]
        new = s[0] / den.clamp(min=torch.finfo(den.dtype).tiny)
        clip = torch.where((den > 0) & (new > 0), new, clip)
    s = clip / gmax
    return s, torch.zeros_like(s)


def octav_step(step: OnlineStep) -> tuple[torch.Tensor, torch.Tensor]:
    """OCTAV in QAT: its full fixed-point iteration on every training batch."""
    return octav_qparams(step.blocks.reshape(step.blocks.shape[0], -1), step.fmt, step.symmetric)


register(Estimator("octav", octav_qparams, online=octav_step, symmetric_only=True))
