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


def reduce_blocks(
    sums: Sequence[torch.Tensor] = (), maxima: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``[n_blocks, block_len]`` terms to per-block sums and maxima.

    Returns ``(stacked_sums [len(sums), n_blocks], stacked_maxima [len(maxima), n_blocks])``;
    an empty sequence gives an empty leading dimension. Minima are maxima of negated terms.
    """
    ref = (list(sums) + list(maxima))[0]
    n_blocks = ref.shape[0]
    s = (
        torch.stack([t.sum(dim=1) for t in sums])
        if sums
        else ref.new_zeros((0, n_blocks))
    )
    m = (
        torch.stack([t.amax(dim=1) for t in maxima])
        if maxima
        else ref.new_zeros((0, n_blocks))
    )
    return s, m
