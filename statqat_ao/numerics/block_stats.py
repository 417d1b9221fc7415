"""The one place where per-block statistics are reduced.

Every estimator computes its block statistics (counts, sums, sums of squares, sum x*q,
sum q^2, extrema) through :func:`reduce_blocks` (or :func:`reduce_blocks_with_count`
where it needs the element count), so that a data-parallel run can all-reduce them in
one spot and estimate exactly what one process would on the global batch.

The reduction is off (purely local, as in a single process) unless code runs inside
:func:`reduced_over` with a :class:`Reduction`; :class:`~statqat_ao.FakeQuantizer` and
:mod:`statqat_ao.parallel.distributed` decide when (see there for the rule) and supply
the collective.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    >>> sums, maxima = reduce_blocks(sums=[x, x * x], maxima=[x.abs()])
    >>> sums.tolist(), maxima.tolist()
    ([[-2.0, 4.0], [10.0, 8.0]], [[3.0, 2.0]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Combine = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Reduction:
    """Where block statistics go: ``combine(sums [k, B], maxima [m, B])`` returns them
    summed and maximised over every rank (:mod:`statqat_ao.parallel.distributed` supplies
    it: this layer knows nothing of process groups). ``blocks`` says whether the blocks
    span the ranks; tensor-wide extrema (NVFP4's amax) are combined either way."""

    combine: Combine
    blocks: bool = True


# The active reduction; None (the default, and always in a single process) is local.
_ACTIVE: Reduction | None = None


def active_reduction() -> Reduction | None:
    """The reduction that :func:`reduced_over` put in force here, if any."""
    return _ACTIVE


@contextmanager
def reduced_over(reduction: Reduction | None) -> Iterator[None]:
    """Reduce the statistics computed inside with ``reduction`` (``None``: stay local).

    This is the one hook through which multi-process statistics reach the estimators.

    Example:
        >>> import torch
        >>> with reduced_over(None):
        ...     reduce_blocks(maxima=[torch.ones(1, 3)])[1].tolist()
        [[1.0]]
    """
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = reduction
    try:
        yield
    finally:
        _ACTIVE = previous


def block_len(x: torch.Tensor) -> int:
    """Elements per block of a ``[n_blocks, ...]`` block view."""
    return x.numel() // x.shape[0]


def per_block(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape ``[n_blocks]`` values to broadcast against the block view ``x``."""
    return values.reshape(-1, *([1] * (x.dim() - 1)))


def _local(
    sums: Sequence[torch.Tensor], maxima: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    ref = (list(sums) + list(maxima))[0]
    n_blocks = ref.shape[0]
    dims = tuple(range(1, ref.dim()))
    s = torch.stack([t.sum(dim=dims) for t in sums]) if sums else ref.new_zeros((0, n_blocks))
    m = torch.stack([t.amax(dim=dims) for t in maxima]) if maxima else ref.new_zeros((0, n_blocks))
    return s, m


def reduce_blocks(
    sums: Sequence[torch.Tensor] = (), maxima: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``[n_blocks, block_len]`` terms to per-block sums and maxima.

    A block view may keep more dimensions, ``[n_blocks, *block_shape]`` (a whole tensor
    as one block is ``x.unsqueeze(0)``: no reshape, so no copy of a channels-last
    activation); everything after the first dimension is reduced.

    Returns ``(stacked_sums [len(sums), n_blocks], stacked_maxima [len(maxima), n_blocks])``;
    an empty sequence gives an empty leading dimension. Minima are maxima of negated terms.
    Inside :func:`reduced_over` (blocks spanning ranks) both are combined over the ranks.
    """
    s, m = _local(sums, maxima)
    if _ACTIVE is not None and _ACTIVE.blocks:
        s, m = _ACTIVE.combine(s, m)
    return s, m


def reduce_blocks_with_count(
    sums: Sequence[torch.Tensor] = (), maxima: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """:func:`reduce_blocks`, plus the number of elements per block.

    The count is :func:`block_len` (a Python int) when the reduction is local, and the
    global count (a float tensor ``[n_blocks]``, reduced in the same collective as the
    sums) when it spans ranks: means are global sums over global counts.

    Example:
        >>> import torch
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> sums, _, n = reduce_blocks_with_count(sums=[x])
        >>> (sums[0] / n).tolist(), n
        ([1.0, 4.0], 3)
    """
    ref = (list(sums) + list(maxima))[0]
    n = block_len(ref)
    s, m = _local(sums, maxima)
    if _ACTIVE is None or not _ACTIVE.blocks:
        return s, m, n
    count = s.new_full((1, ref.shape[0]), float(n))
    s, m = _ACTIVE.combine(torch.cat([s, count]), m)
    return s[:-1], m, s[-1]


def tensor_abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the whole tensor (0-dim float32), over every rank inside :func:`reduced_over`.

    For tensor-wide scales (NVFP4's per-tensor scale), which span ranks even where the
    blocks do not.

    Example:
        >>> tensor_abs_max(torch.tensor([[1.0, -4.0], [2.0, 3.0]])).item()
        4.0
    """
    amax = x.detach().abs().amax().float()
    if _ACTIVE is not None:
        _, m = _ACTIVE.combine(amax.new_zeros((0, 1)), amax.reshape(1, 1))
        amax = m.reshape(())
    return amax
