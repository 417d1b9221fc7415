"""Helpers shared by the estimators: quantize a block view, measure its error."""

from __future__ import annotations

import torch

from ..block_stats import reduce_blocks
from ..formats import Format
from ..rounding import round_to_grid


def centered_codes(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values minus zero point: ``x ~ s * codes``. ``x`` is ``[B, L]``, ``s``/``zp`` are ``[B]``."""
    return round_to_grid(x / s[:, None] + zp[:, None], fmt) - zp[:, None]


def block_sse(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per-block sum of squared quantization error, ``[B]``."""
    err = x - s[:, None] * centered_codes(x, s, zp, fmt)
    return reduce_blocks(sums=[err * err])[0][0]


def error_model_gmax(fmt: Format, symmetric: bool) -> float:
    """Largest value of the grid as the error model and the clip point see it."""
    return fmt.clip_code(symmetric)


def centered_zero_point(mean: torch.Tensor, s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Integer zero point that puts the grid's centre at ``mean`` (asymmetric INT)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(fmt.asymmetric_center() - mean / safe).clamp(fmt.qmin, fmt.qmax)
