"""Signal-to-quantization-noise ratio.

Example:
    >>> import torch
    >>> round(snr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])), 2)
    13.98
"""

from __future__ import annotations

import torch


def snr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``10 log10(sum x^2 / sum (x - x_hat)^2)`` in float64; inf for an exact match."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    noise = (x - x_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(x.pow(2).sum() / noise))
