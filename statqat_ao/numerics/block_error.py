"""Quantization error of a block view at given per-block scales.

Shared by the estimators (least squares, search) and by scale-format rounding, which
picks between representable scales by this error. The error is the plain squared error
or, with per-element ``weights`` (the layer input's second moments for an output-aware
weight quantizer), the weighted one: ``sum_i h_i (x_i - q_i)^2``.

Example:
    >>> import torch
    >>> from statqat_ao.numerics.formats import get_format
    >>> x = torch.tensor([[0.4, -1.0, 2.6]])
    >>> centered_codes(x, torch.ones(1), torch.zeros(1), get_format("int4")).tolist()
    [[0.0, -1.0, 3.0]]
    >>> round(block_sse(x, torch.ones(1), torch.zeros(1), get_format("int4")).item(), 4)
    0.32
    >>> round(block_sse(x, torch.ones(1), torch.zeros(1), get_format("int4"), torch.tensor([[1.0, 1.0, 0.0]])).item(), 4)
    0.16
"""

from __future__ import annotations

import torch

from .block_stats import per_block, reduce_blocks
from .formats import Format
from .rounding import quantize_to_grid


def centered_codes(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values minus zero point: ``x ~ s * codes``. ``x`` is ``[B, ...]``, ``s``/``zp`` are ``[B]``."""
    s, zp = per_block(s, x), per_block(zp, x)
    return quantize_to_grid(x / s, zp, fmt) - zp


def block_sse(
    x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, fmt: Format, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block (weighted) sum of squared quantization error, ``[B]``.

    ``weights``: ``None`` or non-negative per-element weights broadcastable to ``x``.
    """
    err = x - per_block(s, x) * centered_codes(x, s, zp, fmt)
    sq = err * err
    return reduce_blocks(sums=[sq if weights is None else sq * weights])[0][0]
