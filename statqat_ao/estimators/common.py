"""Helpers shared by the estimators: usable scales, the grid's clip code, zero points."""

from __future__ import annotations

import torch

from statqat_ao.numerics.formats import Format


def usable_scale(s: torch.Tensor) -> torch.Tensor:
    """Which scales a quantizer can use as they are: finite and positive."""
    return torch.isfinite(s) & (s > 0)


def error_model_gmax(fmt: Format, symmetric: bool) -> float:
    """Largest value of the grid as the error model and the clip point see it."""
    return fmt.clip_code(symmetric)


def centered_zero_point(mean: torch.Tensor, s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Integer zero point that puts the grid's centre at ``mean`` (asymmetric INT)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(fmt.asymmetric_center() - mean / safe).clamp(fmt.qmin, fmt.qmax)
