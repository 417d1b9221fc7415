"""Helpers shared by the estimators: quantize a block view, measure its error."""

from __future__ import annotations

import torch

from ..block_stats import per_block, reduce_blocks
from ..formats import Format
from ..rounding import round_to_grid


def centered_codes(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values minus zero point: ``x ~ s * codes``. ``x`` is ``[B, ...]``, ``s``/``zp`` are ``[B]``."""
    s, zp = per_block(s, x), per_block(zp, x)
    return round_to_grid(x / s + zp, fmt) - zp


def block_sse(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per-block sum of squared quantization error, ``[B]``."""
    err = x - per_block(s, x) * centered_codes(x, s, zp, fmt)
    return reduce_blocks(sums=[err * err])[0][0]


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
