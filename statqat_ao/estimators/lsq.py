"""LSQ's initial scale (Esser et al., 2020): ``2 mean|x| / sqrt(g_K)``.

LSQ learns its scale by gradient descent, so it has no per-step statistics update here:
:class:`~statqat_ao.quantizers.lsq.LSQFakeQuantize` is the module that learns it.
"""

from __future__ import annotations

import math

import torch

from statqat_ao.numerics.block_stats import reduce_blocks_with_count
from statqat_ao.numerics.formats import Format

from .common import centered_zero_point, error_model_gmax
from .registry import Estimator, register


def lsq_qparams(x: torch.Tensor, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block LSQ initial scale for ``x`` of shape ``[B, L]``."""
    gmax = error_model_gmax(fmt, symmetric)
    sums, _, n = reduce_blocks_with_count(sums=[x.abs(), x])
    s = 2 * sums[0] / n / math.sqrt(gmax)
    if symmetric:
        return s, torch.zeros_like(s)
    return s, centered_zero_point(sums[1] / n, s, fmt)


register(Estimator("lsq", lsq_qparams))  # learned by gradient descent, not estimated per step
