"""MinMax: the scale that just avoids clipping (the baseline every method is measured against)."""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_stats import reduce_blocks
from statqat_ao.numerics.formats import Format

from .registry import Estimator, each_step, register


def minmax_qparams(x: torch.Tensor, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block MinMax scale and zero point for ``x`` of shape ``[B, L]``.

    Symmetric: ``s = max|x| / ((qmax - qmin) / 2)`` for signed INT grids (torch's
    MinMaxObserver convention: all 2^b levels in use), ``max|x| / qmax`` otherwise. Asymmetric (INT only): the range
    ``[min(x, 0), max(x, 0)]`` spread over the whole grid, integer zero point.
    """
    if symmetric:
        amax = reduce_blocks(maxima=[x.abs()])[1][0]
        half_range = (fmt.qmax - fmt.qmin) / 2 if (fmt.family == "int" and fmt.signed) else fmt.qmax
        return amax / half_range, torch.zeros_like(amax)
    _, m = reduce_blocks(maxima=[x, -x])
    hi, lo = m[0].clamp(min=0), (-m[1]).clamp(max=0)
    s = (hi - lo) / (fmt.qmax - fmt.qmin)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zp = (fmt.qmin - torch.round(lo / safe)).clamp(fmt.qmin, fmt.qmax)
    return s, zp


register(Estimator("minmax", minmax_qparams, online=each_step(minmax_qparams), standard_scale_rounding=True))
