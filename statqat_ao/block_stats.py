"""The one place where per-block statistics are reduced.

Every estimator computes its block statistics (counts, sums, sums of squares, sum x*q,
sum q^2, extrema) through :func:`reduce_blocks`, so that a data-parallel run can
all-reduce them in one spot and estimate exactly what one process would on the global
batch.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    >>> sums, maxima = reduce_blocks(sums=[x, x * x], maxima=[x.abs()])
    >>> sums.tolist(), maxima.tolist()
    ([[-2.0, 4.0], [10.0, 8.0]], [[3.0, 2.0]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_len(x: torch.Tensor) -> int:
    """Elements per block of a ``[n_blocks, ...]`` block view."""
    return x.numel() // x.shape[0]


def per_block(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape ``[n_blocks]`` values to broadcast against the block view ``x``."""
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def reduce_blocks(
    sums: Sequence[torch.Tensor] = (), maxima: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``[n_blocks, block_len]`` terms to per-block sums and maxima.

    A block view may keep more dimensions, ``[n_blocks, *block_shape]`` (a whole tensor
    as one block is ``x.unsqueeze(0)``: no reshape, so no copy of a channels-last
    activation); everything after the first dimension is reduced.

    Returns ``(stacked_sums [len(sums), n_blocks], stacked_maxima [len(maxima), n_blocks])``;
    an empty sequence gives an empty leading dimension. Minima are maxima of negated terms.
    """
    ref = (list(sums) + list(maxima))[0]
    n_blocks = ref.shape[0]
    dims = tuple(range(1, ref.dim()))
    s = torch.stack([t.sum(dim=dims) for t in sums]) if sums else ref.new_zeros((0, n_blocks))
    m = torch.stack([t.amax(dim=dims) for t in maxima]) if maxima else ref.new_zeros((0, n_blocks))
    return s, m
