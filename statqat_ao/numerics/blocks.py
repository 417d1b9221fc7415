"""Block layout: which elements share one scale.

Every estimator works on a 2-D view ``[n_blocks, block_len]`` of its input; a
:class:`BlockLayout` makes that view and shapes the per-block scales back so that they
broadcast against the input (per tensor, per channel) or group it (per group; see
:func:`statqat_ao.fake_quantize`).

Example:
    >>> import torch
    >>> layout = block_layout((8, 64), granularity=32, axis=0)
    >>> layout.to_blocks(torch.zeros(8, 64)).shape, layout.scale_shape
    (torch.Size([16, 32]), (8, 2))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Format

Granularity = str | int


@dataclass(frozen=True)
class BlockLayout:
    shape: tuple[int, ...]
    granularity: Granularity
    axis: int
    n_blocks: int
    block_len: int
    scale_shape: tuple[int, ...]

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``[n_blocks, block_len]``."""
        if self.granularity == "channel":
            return x.movedim(self.axis, 0).reshape(self.n_blocks, self.block_len)
        return x.reshape(self.n_blocks, self.block_len)

    def block_view(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`to_blocks`, but a per-tensor block keeps ``x``'s shape: ``[1, *x.shape]``.

        For the online estimators, which reduce every dimension after the first: a view,
        so a compiled graph reads the tensor in whatever layout Inductor gave it.
        """
        return x.unsqueeze(0) if self.granularity == "tensor" else self.to_blocks(x)

    def from_blocks(self, per_block: torch.Tensor) -> torch.Tensor:
        """Shape a ``[n_blocks]`` tensor of scales or zero points like :attr:`scale_shape`."""
        return per_block.reshape(self.scale_shape)


def block_layout(
    shape: tuple[int, ...] | torch.Size,
    granularity: Granularity = "tensor",
    axis: int = 0,
    fmt: Format | None = None,
    name: str = "input",
) -> BlockLayout:
    """Validate a granularity against a shape and describe its blocks.

    ``granularity``: ``"tensor"``, ``"channel"`` (one block per index along ``axis``) or
    an int group size: consecutive elements of each index along axis 0, taken in the
    row-major order of the remaining dimensions (the reduction dimension of a Linear or
    Conv weight). Block formats (MXFP4, NVFP4) fix the group size to their block size.

    Raises:
        ValueError: empty tensors, a group size that does not divide the row length
            (both numbers named), a granularity that contradicts a block format.
    """
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        raise ValueError(f"{name} is empty (shape {shape}): there is nothing to estimate a scale from")
    if fmt is not None and fmt.is_block_format:
        if granularity not in (None, "tensor", fmt.block_size):
            raise ValueError(
                f"{fmt.name} has a fixed block size of {fmt.block_size}; got granularity="
                f"{granularity!r}. Leave it unset or pass {fmt.block_size}."
            )
        granularity = fmt.block_size
    if granularity is None:
        granularity = "tensor"
    if granularity == "tensor":
        return BlockLayout(shape, "tensor", axis, 1, numel, ())
    ndim = max(len(shape), 1)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {name} with shape {shape}")
    axis = axis % ndim
    if granularity == "channel":
        channels = shape[axis] if shape else 1
        scale_shape = tuple(channels if d == axis else 1 for d in range(len(shape)))
        return BlockLayout(shape, "channel", axis, channels, numel // channels, scale_shape)
    if isinstance(granularity, bool) or not isinstance(granularity, int):
        raise ValueError(
            f"granularity must be 'tensor', 'channel' or a positive int group size, got {granularity!r}"
        )
    if granularity <= 0:
        raise ValueError(f"group size must be positive, got {granularity}")
    if axis != 0:
        raise ValueError(
            f"group granularity groups along the dimensions after axis 0; got axis={axis}. "
            "Move the channel dimension first."
        )
    rows = shape[0] if len(shape) > 1 else 1
    row_len = numel // rows
    if row_len % granularity:
        raise ValueError(
            f"group size {granularity} does not divide the row length {row_len} of {name} "
            f"(shape {shape}); choose a divisor of {row_len}"
        )
    groups = row_len // granularity
    scale_shape = (rows, groups) if len(shape) > 1 else (groups,)
    return BlockLayout(shape, granularity, 0, rows * groups, granularity, scale_shape)


def _is_broadcastable(small: torch.Size, big: torch.Size) -> bool:
    if len(small) > len(big):
        return False
    return all(s in (1, b) for s, b in zip(reversed(small), reversed(big), strict=False))


def group_view(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Size, torch.Size] | None:
    """For a per-group scale ``[rows, groups]``, the shapes that view x as ``[rows, groups, size]``."""
    if _is_broadcastable(scale.shape, x.shape):
        return None
    if scale.dim() == 0 or x.numel() % scale.numel() or x.shape[0] != scale.shape[0]:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} neither broadcasts against x of shape "
            f"{tuple(x.shape)} nor groups it (a per-group scale is [rows, row_len // group_size])"
        )
    return torch.Size((*scale.shape, -1)), torch.Size((*scale.shape, 1))
