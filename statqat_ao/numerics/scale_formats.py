"""Rounding a block scale to the format it is stored in (MXFP4: E8M0, NVFP4: FP8 E4M3).

The rounding is part of the quantizer: a scale estimated in float32 is moved to one of
its two neighbours in the scale format, the one with the lower block error (MinMax
keeps each standard's own rule instead, as the baseline). NVFP4 block scales are stored
relative to a float32 per-tensor scale, ``amax / (448 * 6)``.

Example:
    >>> import torch
    >>> nvfp4_tensor_scale(torch.tensor([[2688.0]])).item()
    1.0
"""

from __future__ import annotations

import math

import torch

from .block_error import block_sse
from .formats import Format, get_format
from .rounding import round_to_grid

E4M3_MAX = 448.0
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def largest_scale(dtype: torch.dtype, fmt: Format, symmetric: bool) -> float:
    """The largest scale whose every grid point is finite in ``dtype``.

    Above it the fake quant's output, cast back to ``dtype``, would hold Inf (fp16's
    range ends at 65504: an INT4 scale over 65504 / 8 puts code -8 beyond it). The fake
    quant computes in float32 whatever the input's dtype, so float32's range bounds
    wider dtypes (float64) too; the result is representable as a float32 scale.

    Example:
        >>> largest_scale(torch.float16, get_format("int4"), True)
        8188.0
        >>> largest_scale(torch.float64, get_format("int4"), True) == largest_scale(torch.float32, get_format("int4"), True)
        True
    """
    span = max(abs(fmt.qmin), abs(fmt.qmax)) if symmetric else fmt.qmax - fmt.qmin
    limit = torch.finfo(torch.float32).max
    if dtype.is_floating_point:
        limit = min(limit, torch.finfo(dtype).max)
    return limit / span


def cap_scale(s: torch.Tensor, dtype: torch.dtype, fmt: Format, symmetric: bool = True) -> torch.Tensor:
    """``s`` with every scale at most :func:`largest_scale`, kept on the scale's own grid.

    E8M0 (MX) scales are capped at the largest power of two below the limit. NVFP4's
    scales need no cap: its tensor scale puts the largest block at the tensor's max.

    Example:
        >>> cap_scale(torch.tensor([16384.0, 2.0]), torch.float16, get_format("mxfp4")).tolist()
        [8192.0, 2.0]
    """
    if fmt.scale_format == "fp8_e4m3":
        return s
    cap = largest_scale(dtype, fmt, symmetric)
    if fmt.scale_format == "e8m0":
        cap = 2.0 ** math.floor(math.log2(cap))
    return s.clamp(max=cap)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 per-tensor scale: ``amax / (448 * 6)`` (1.0 for an all-zero tensor)."""
    amax = x.detach().abs().amax().float()
    ts = amax / (E4M3_MAX * 6.0)
    return torch.where(ts > 0, ts, torch.ones_like(ts))


_E4M3_POSITIVE = tuple(v for v in get_format("fp8_e4m3").grid if v > 0)


def _neighbours(t: torch.Tensor, scale_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable scales just below and just above ``t`` (equal when ``t`` is one)."""
    if scale_format == "e8m0":
        e = torch.floor(torch.log2(t)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
        lo = torch.exp2(e)
        # log2 can round across a power of two: correct by one either way.
        lo = torch.where(lo > t, lo / 2, torch.where(lo * 2 <= t, lo * 2, lo))
        hi = torch.where(lo == t, lo, lo * 2)
        return lo, hi
    grid = torch.tensor(_E4M3_POSITIVE, dtype=t.dtype, device=t.device)
    t = t.clamp(grid[0], grid[-1])
    i = torch.bucketize(t, grid)  # grid[i-1] < t <= grid[i]
    hi = grid[i.clamp(max=len(grid) - 1)]
    lo = torch.where(hi == t, hi, grid[(i - 1).clamp(min=0)])
    return lo, hi


def scale_candidates(t: torch.Tensor, scale_format: str, offsets: range | tuple[int, ...]) -> torch.Tensor:
    """Representable scales near ``t`` (``[B]``), ``[len(offsets), B]``: offset 0 is the
    smallest representable value >= ``t`` (``t`` itself when it is representable), offset
    ``k`` the one ``k`` grid steps above it (below for negative ``k``), clamped to the range.

    Example:
        >>> scale_candidates(torch.tensor([3.0]), "e8m0", (-1, 0, 1)).flatten().tolist()
        [2.0, 4.0, 8.0]
        >>> scale_candidates(torch.tensor([1.0]), "fp8_e4m3", (-1, 0, 1)).flatten().tolist()
        [0.9375, 1.0, 1.125]
    """
    if scale_format == "e8m0":
        lo, hi = _neighbours(t, scale_format)
        e = torch.log2(hi).round()
        return torch.stack([torch.exp2((e + k).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)) for k in offsets])
    grid = torch.tensor(_E4M3_POSITIVE, dtype=t.dtype, device=t.device)
    i = torch.bucketize(t.clamp(grid[0], grid[-1]), grid)  # grid[i-1] < t <= grid[i]
    return torch.stack([grid[(i + k).clamp(0, len(grid) - 1)] for k in offsets])


def round_scale(
    x: torch.Tensor,
    s: torch.Tensor,
    fmt: Format,
    standard: bool = False,
    tensor_scale: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round per-block scales ``s`` (``[B]``) of block view ``x`` (``[B, L]``) to ``fmt``'s scale format.

    ``standard=True`` follows the format's own rule (OCP MX: from the block's amax; NVFP4:
    round to nearest), as MinMax does; otherwise each block takes whichever neighbouring
    representable scale gives it the lower (``weights``-weighted) error.
    """
    ts = torch.ones((), dtype=s.dtype, device=s.device) if tensor_scale is None else tensor_scale
    zp = torch.zeros_like(s)
    if fmt.scale_format == "e8m0" and standard:
        # OCP MX rule: 2^(floor(log2 amax) - emax of the element format).
        amax = x.abs().amax(dim=1)
        exp = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax))))
        return torch.exp2((exp - 2).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))
    if fmt.scale_format == "fp8_e4m3" and standard:
        t = (s / ts).clamp(max=E4M3_MAX)
        t = round_to_grid(t, get_format("fp8_e4m3"))
        smallest = _E4M3_POSITIVE[0]
        return ts * torch.where(t > 0, t, torch.full_like(t, smallest))
    lo, hi = _neighbours(s / ts, fmt.scale_format)
    s_lo, s_hi = ts * lo, ts * hi
    better_hi = block_sse(x, s_hi, zp, fmt, weights) < block_sse(x, s_lo, zp, fmt, weights)
    return torch.where(better_hi, s_hi, s_lo)
