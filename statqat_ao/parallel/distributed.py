"""Multi-process QAT: one scale for the global batch on every rank.

StatQAT estimates scales from each batch's statistics. With data parallelism every rank
sees a different slice of the global batch, so the block statistics (counts, sums,
sums of squares, sum x*q, sum q^2, extrema) are combined across the data-parallel
process group before a scale is computed from them: every rank then holds exactly the
scale one process would estimate on the concatenated batch (up to float32 summation
order), and all ranks hold the same bits.

The rule: a statistic is reduced over the group when the elements it summarises are
spread over the group's ranks.

* Activation quantizers reduce. A block spans ranks when it spans the batch dimension
  (dim 0): per tensor, and per channel along an axis other than 0. Per-group blocks
  (and MX/NV blocks) lie within one row of one sample, so they stay local, which is
  also what one process computes for those rows; NVFP4's per-tensor amax spans the
  batch and is reduced.
* Weight quantizers do not reduce. Under DistributedDataParallel the weight is
  replicated: every rank already sees all of it. Under FSDP2 (``fully_shard``) the
  forward all-gathers the weight before the module runs, so the quantizer sees the
  whole, unsharded weight (a plain ``nn.Parameter``), and its per-tensor, per-channel
  and per-group statistics are the unsharded run's. Reducing either would only cost
  time (and multiply sums by the world size).

Which group: :func:`set_process_group` (module-wide, default: the default group once
``torch.distributed`` is initialised), or the ``process_group`` argument of
:class:`~statqat_ao.FakeQuantizer`. Nothing changes in a single process: the check is a
Python-level one, and no collective is traced or run.

Example:
    >>> get_process_group() is None  # no process group initialised here
    True
    >>> with process_group("off"):
    ...     get_process_group() is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from statqat_ao.numerics.block_stats import Reduction, active_reduction, reduced_over
from statqat_ao.numerics.blocks import BlockLayout

DEFAULT = "default"
OFF = "off"

# The module-wide setting: DEFAULT, OFF, or a torch.distributed ProcessGroup.
_SETTING: Any = DEFAULT


class SharedGroup:
    """A process group held by a quantizer: copies of the model share it (a
    ``ProcessGroup`` cannot be deep-copied or pickled)."""

    __slots__ = ("group",)

    def __init__(self, group: Any):
        self.group = group

    def __deepcopy__(self, memo: dict) -> SharedGroup:
        return self

    def __repr__(self) -> str:
        return f"SharedGroup({self.group!r})"


def as_setting(group: Any) -> Any:
    """What a quantizer stores for its ``process_group`` argument.

    Example:
        >>> as_setting(None), as_setting("default")
        ('off', 'default')
    """
    if group is None:
        return OFF
    if isinstance(group, str):
        if group not in (DEFAULT, OFF):
            raise ValueError(f"process_group must be 'default', 'off', None or a ProcessGroup, got {group!r}")
        return group
    return group if isinstance(group, SharedGroup) else SharedGroup(group)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def set_process_group(group: Any = DEFAULT) -> None:
    """Choose the data-parallel group StatQAT reduces activation statistics over.

    Args:
        group: ``"default"`` (the default group whenever ``torch.distributed`` is
            initialised), ``"off"`` or ``None`` (never reduce: each rank estimates from
            its own slice), or a ``torch.distributed`` process group (e.g. the
            data-parallel dimension of a device mesh, ``mesh["dp"].get_group()``).

    Example:
        >>> set_process_group("off"); get_process_group() is None
        True
        >>> set_process_group()  # back to the default
    """
    global _SETTING
    _SETTING = as_setting(group)


def _unwrap(group: Any) -> Any:
    return group.group if isinstance(group, SharedGroup) else group


def resolve(group: Any = DEFAULT) -> Any:
    """The process group ``group`` stands for, or ``None`` for no reduction.

    ``"default"`` follows :func:`set_process_group`; a group of one rank is ``None``.

    Example:
        >>> resolve("off") is None, resolve() is None
        (True, True)
    """
    group = _unwrap(group)
    if isinstance(group, str) and group == DEFAULT:
        group = _unwrap(_SETTING)
        if isinstance(group, str) and group == DEFAULT:
            group = torch.distributed.group.WORLD if _initialized() else None
    if group is None or (isinstance(group, str) and group == OFF) or not _initialized():
        return None
    return None if torch.distributed.get_world_size(group) == 1 else group


def get_process_group() -> Any:
    """The group activation statistics are reduced over now (``None``: none).

    Example:
        >>> get_process_group() is None
        True
    """
    return resolve(DEFAULT)


@contextmanager
def process_group(group: Any) -> Iterator[None]:
    """:func:`set_process_group` for the duration of a ``with`` block.

    Example:
        >>> with process_group(None):
        ...     get_process_group() is None
        True
    """
    global _SETTING
    previous = _SETTING
    set_process_group(group)
    try:
        yield
    finally:
        _SETTING = previous


def all_reduce_stats(s: torch.Tensor, m: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``s`` and take the maximum of ``m`` (both ``[k, n_blocks]``) over ``group``.

    One all-gather; every rank then adds the ranks' terms in rank order, so all ranks
    hold bit-identical results whatever algorithm the backend reduces with.
    """
    import torch.distributed as dist

    packed = torch.cat([s, m.to(s.dtype)]).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    gathered = torch.stack(parts)
    k = s.shape[0]
    return gathered[:, :k].sum(dim=0), gathered[:, k:].amax(dim=0).to(m.dtype)


@dataclass(frozen=True)
class _GroupCombine:
    """The collective a :class:`~statqat_ao.numerics.block_stats.Reduction` calls: picklable
    and comparable, and it names its group (``active_reduction().combine.group``)."""

    group: Any

    def __call__(self, s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return all_reduce_stats(s, m, self.group)


def _over(group: Any, blocks: bool = True):
    """The block-statistics context for ``group`` (``None``: local)."""
    return reduced_over(None if group is None else Reduction(_GroupCombine(group), blocks))


def block_statistics_over(group: Any):
    """Reduce every block statistic computed inside over ``group`` (``None``: stay local).

    For statistics whose blocks always span the ranks (a layer input's per-feature moments).
    """
    return _over(group, blocks=True)


def spans_ranks(layout: BlockLayout) -> bool:
    """Whether a data-parallel split along dim 0 (the batch) cuts through the blocks.

    Example:
        >>> from statqat_ao.numerics.blocks import block_layout
        >>> spans_ranks(block_layout((8, 64))), spans_ranks(block_layout((8, 64), 32))
        (True, False)
    """
    if layout.granularity == "tensor":
        return True
    return layout.granularity == "channel" and len(layout.shape) > 1 and layout.axis != 0


def statistics_group(quantizer: nn.Module, x: torch.Tensor, group: Any = DEFAULT) -> Any:
    """The group ``quantizer`` reduces the statistics of ``x`` over (``None``: none).

    ``group="default"`` reduces activation statistics only: a quantizer's
    ``is_activation`` attribute says which it is, and without one a parameter is a
    weight. An explicit group reduces whatever the quantizer sees.

    Example:
        >>> statistics_group(nn.Identity(), torch.zeros(2)) is None
        True
    """
    if isinstance(group, str) and group == DEFAULT:
        role = getattr(quantizer, "is_activation", None)
        is_activation = not isinstance(x, nn.Parameter) if role is None else bool(role)
        if not is_activation:
            return None
    return resolve(group)


def statistics_reduced(group: Any, layout: BlockLayout):
    """The context a quantizer estimates in: reduce over ``group`` the block statistics
    that span ranks (see :func:`spans_ranks`) and the tensor-wide extrema.

    Example:
        >>> from statqat_ao.numerics.blocks import block_layout
        >>> with statistics_reduced(None, block_layout((4, 4))):
        ...     pass
    """
    if group is None:
        return nullcontext()
    return _over(group, blocks=spans_ranks(layout))


def narrowed_to(layout: BlockLayout):
    """Inside :func:`reduce_statistics`: keep reducing the blocks of ``layout`` only if
    they span ranks (tensor-wide extrema stay reduced). Outside it: nothing.

    Example:
        >>> from statqat_ao.numerics.blocks import block_layout
        >>> with narrowed_to(block_layout((4, 4), 2)):
        ...     pass
    """
    active = active_reduction()
    if active is None:
        return nullcontext()
    return reduced_over(Reduction(active.combine, blocks=active.blocks and spans_ranks(layout)))


@contextmanager
def reduce_statistics(group: Any = DEFAULT) -> Iterator[None]:
    """Reduce every estimate made inside over ``group``, for offline estimation.

    For :func:`statqat_ao.estimate_qparams` on a tensor split over ranks along dim 0
    (e.g. calibration activations): per tensor, or per channel along another axis.
    Every rank must make the same calls, in the same order.

    Example:
        >>> import torch, statqat_ao as sq
        >>> with reduce_statistics():  # no group here: a local estimate
        ...     s, _ = sq.estimate_qparams(torch.randn(64, 8), "int8")
        >>> s.shape
        torch.Size([])
    """
    with _over(resolve(group)):
        yield


__all__ = [
    "SharedGroup",
    "all_reduce_stats",
    "as_setting",
    "get_process_group",
    "narrowed_to",
    "process_group",
    "reduce_statistics",
    "resolve",
    "set_process_group",
    "spans_ranks",
    "statistics_group",
    "statistics_reduced",
]
