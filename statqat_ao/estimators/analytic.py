"""Analytic StatQAT estimator: one reduction pass, scale from the error model's c_opt.

``s = min(c_opt(F, family) * sigma / g_K, max|x| / g_K)``. With ``family="gaussian"`` this is the paper's
estimator. The default, ``family="auto"``, reads each block's sample kurtosis and takes
c_opt along the generalized Gaussian family at that kurtosis (STATQAT.md section 4):
heavy-tailed blocks clip further out, light-tailed ones closer in.
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_stats import reduce_blocks, reduce_blocks_with_count
from statqat_ao.numerics.error_model import GAUSSIAN, Family, c_opt, kurtosis_to_c_opt_table
from statqat_ao.numerics.formats import Format

from .common import centered_zero_point, error_model_gmax
from .registry import Estimator, each_step, register


def _interp(x: torch.Tensor, xp: tuple[float, ...], fp: tuple[float, ...]) -> torch.Tensor:
    xp_t = torch.tensor(xp, dtype=x.dtype, device=x.device)
    fp_t = torch.tensor(fp, dtype=x.dtype, device=x.device)
    x = x.clamp(xp[0], xp[-1])
    i = torch.bucketize(x, xp_t).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp_t[i - 1], xp_t[i], fp_t[i - 1], fp_t[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def clip_in_sigmas(
    kurtosis: torch.Tensor, fmt: Format, symmetric: bool, family: str | Family
) -> torch.Tensor:
    """c_opt per block: a constant for a fixed family, kurtosis-interpolated for ``"auto"``."""
    if family == "auto":
        kurt, copt = kurtosis_to_c_opt_table(fmt.name, symmetric)  # a str: a constant to every torch.compile
        return _interp(kurtosis, kurt, copt)
    fam = GAUSSIAN if family == "gaussian" else family
    if not isinstance(fam, Family):
        raise ValueError(f"family must be 'auto', 'gaussian' or an error_model.Family, got {family!r}")
    return torch.full_like(kurtosis, c_opt(fmt, fam, symmetric))


def analytic_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    family: str | Family = "auto",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block analytic scale and zero point for ``x`` of shape ``[B, L]``.

    Symmetric blocks use the RMS about zero (the grid is centred on zero); asymmetric
    ones the standard deviation about the mean, and a zero point that centres the grid
    on the mean, slid inside the block's range where the grid is narrower (one-sided data
    such as a ReLU's output start the grid at their minimum, with no codes below it).
    With ``weights`` (output-aware error) the moments are weighted:
    ``sigma^2 = sum h x^2 / sum h``, the variance of the error-weighted distribution.
    """
    if symmetric:
        x2 = x * x
        if weights is None:
            sums, maxima, n = reduce_blocks_with_count(sums=[x2, x2 * x2], maxima=[x.abs()])
        else:
            hx2 = weights * x2
            sums, maxima = reduce_blocks(sums=[hx2, hx2 * x2, weights.expand_as(x)], maxima=[x.abs()])
            sums, n = sums[:2], sums[2].clamp(min=torch.finfo(x.dtype).tiny)
        var, fourth = sums[0] / n, sums[1] / n
        mean = torch.zeros_like(var)
    else:
        if weights is None:
            sums, maxima, n = reduce_blocks_with_count(sums=[x, x * x, x**3, x**4], maxima=[x, -x])
        else:
            h = weights.expand_as(x)
            sums, maxima = reduce_blocks(sums=[h * x, h * x * x, h * x**3, h * x**4, h], maxima=[x, -x])
            sums, n = sums[:4], sums[4].clamp(min=torch.finfo(x.dtype).tiny)
        mean = sums[0] / n
        m2, m3, m4 = sums[1] / n, sums[2] / n, sums[3] / n
        var = (m2 - mean**2).clamp(min=0)
        fourth = m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4
    sigma = var.sqrt()
    kurtosis = fourth / var.clamp(min=torch.finfo(var.dtype).tiny) ** 2
    s = clip_in_sigmas(kurtosis, fmt, symmetric, family) * sigma / error_model_gmax(fmt, symmetric)
    # A clip beyond the block's own range only coarsens the step (nothing is clipped):
    # small blocks have a sample max well below the population's c_opt * sigma.
    if symmetric:
        s = torch.minimum(s, maxima[0] / fmt.qmax)
        return s, torch.zeros_like(s)
    s = torch.minimum(s, (maxima[0].clamp(min=0) + maxima[1].clamp(min=0)) / (fmt.qmax - fmt.qmin))
    return s, centered_zero_point(mean, s, fmt, lo=-maxima[1], hi=maxima[0])


register(Estimator("analytic", analytic_qparams, online=each_step(analytic_qparams), error_weighted=True))
