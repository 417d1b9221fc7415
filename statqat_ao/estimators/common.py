"""Helpers shared by the estimators: usable scales, the grid's clip code, zero points."""

from __future__ import annotations

import torch

from statqat_ao.numerics.formats import Format


def usable_scale(s: torch.Tensor) -> torch.Tensor:
    """Which scales a quantizer can use as they are: finite and positive."""
    return (s > 0) & (s < torch.inf)  # NaN fails both comparisons


def with_fallback(
    s: torch.Tensor,
    zp: torch.Tensor,
    s_minmax: torch.Tensor,
    zp_minmax: torch.Tensor,
    previous: torch.Tensor,
    finite: torch.Tensor | bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch-free (no graph break): the estimate where it is usable, else MinMax's, else ``previous``.

    Sums of squares overflow float32 above ~1e19 (and underflow below ~1e-19) where the
    maximum does not, so MinMax's scale is the first fallback; an all-zero block keeps
    ``previous`` (zero point 0). Where ``finite`` is False nothing is taken from the batch.

    Example:
        >>> s, zp = with_fallback(torch.tensor([0.0, 2.0]), torch.zeros(2), torch.tensor([0.0, 1.0]), torch.zeros(2), torch.ones(2))
        >>> s.tolist()
        [1.0, 2.0]
    """
    estimated, fallback = finite & usable_scale(s), finite & usable_scale(s_minmax)
    s = torch.where(estimated, s, torch.where(fallback, s_minmax, previous.expand_as(s)))
    zp = torch.where(estimated, zp, torch.where(fallback, zp_minmax, torch.zeros_like(zp)))
    return s.clamp(min=torch.finfo(torch.float32).tiny), zp


def error_model_gmax(fmt: Format, symmetric: bool) -> float:
    """Largest value of the grid as the error model and the clip point see it."""
    return fmt.clip_code(symmetric)


def centered_zero_point(
    mean: torch.Tensor, s: torch.Tensor, fmt: Format, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer zero point that puts the grid's centre at ``mean`` (asymmetric INT).

    With the block's range ``[lo, hi]`` the grid slides inside it where it is narrower:
    a code below the block's minimum or above its maximum represents nothing, and the
    other end then clips less. Data that start at 0 (a ReLU's output) get the grid's
    lowest code at 0: ``zp = qmin``, every code in use.

    Example:
        >>> from statqat_ao.numerics.formats import get_format
        >>> s = torch.tensor([0.01])
        >>> centered_zero_point(torch.tensor([0.5]), s, get_format("uint8")).tolist()
        [78.0]
        >>> centered_zero_point(torch.tensor([0.5]), s, get_format("uint8"), torch.tensor([0.0]), torch.tensor([3.0])).tolist()
        [0.0]
    """
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zp = fmt.asymmetric_center() - mean / safe
    if lo is not None and hi is not None:
        # Lowest code at or above lo: zp <= qmin - lo / s; highest at or below hi: zp >= qmax - hi / s.
        # Both hold together when s <= (hi - lo) / (qmax - qmin), which the callers' cap ensures.
        zp = torch.minimum(torch.maximum(zp, fmt.qmax - hi / safe), fmt.qmin - lo / safe)
    return torch.round(zp).clamp(fmt.qmin, fmt.qmax)
