"""statqat-ao computes statistics, scales and fake quantization in float32.

Inputs of any floating dtype are cast to float32 first: bf16 and fp16 exactly, float64
by rounding. A float64 value beyond float32's range (about 3.4e38) would become Inf
there, so the estimators and quantizers refuse it by name instead of clipping it.

Example:
    >>> import torch
    >>> beyond_float32(torch.tensor([1.0, 1e300, float("inf")], dtype=torch.float64)).tolist()
    [False, True, False]
"""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.float32


def beyond_float32(x: torch.Tensor) -> torch.Tensor:
    """Which finite elements of ``x`` overflow when cast to float32 (all False below float64)."""
    if x.dtype != torch.float64:
        return torch.zeros_like(x, dtype=torch.bool)
    return torch.isfinite(x) & (x.abs() > torch.finfo(COMPUTE_DTYPE).max)


def count_beyond_float32(x: torch.Tensor) -> int:
    """How many finite elements of ``x`` overflow float32 (0 without a host sync below float64)."""
    return 0 if x.dtype != torch.float64 else int(beyond_float32(x).sum())
