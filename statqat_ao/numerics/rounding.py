"""Nearest-grid-point rounding, written as plain elementwise torch ops.

Everything here is branch-free on tensor values, so torch.compile fuses it into the
surrounding kernel. Ties go to even: ``torch.round`` for INT grids, and
round-to-nearest-even on the mantissa for float grids, which makes the codes equal to
torch's float8 casts and torchao's FP4 conversion of the same values.

Example:
    >>> import torch, statqat_ao as sq
    >>> from statqat_ao.numerics.rounding import round_to_grid
    >>> round_to_grid(torch.tensor([0.25, 0.75, 2.5, 5.0, 9.0]), sq.get_format("fp4_e2m1"))
    tensor([0., 1., 2., 4., 6.])
"""

from __future__ import annotations

import torch

from .formats import Format

_F32_MANTISSA_BITS = 23
_F32_BIAS = 127


def _float_step(a: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid step of a float format at magnitudes ``a`` (float32, >= 0, <= max), exactly.

    The step inside a binade is 2**(e - mbits); subnormals use emin's step. The exponent
    is read from the float32 bits, so there is no log2 rounding.
    """
    exponent = ((a.view(torch.int32) >> _F32_MANTISSA_BITS) - _F32_BIAS).clamp(min=fmt.emin)
    return ((exponent - fmt.mbits + _F32_BIAS) << _F32_MANTISSA_BITS).view(torch.float32)


def _round_float(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    # v / step is an exact power-of-two division, so torch.round's ties-to-even on the
    # quotient is round-to-nearest-even on the mantissa.
    a = v.abs().clamp(max=fmt.max_value)
    step = _float_step(a, fmt)
    return torch.copysign(torch.round(a / step) * step, v)


def _round_lut(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    # Sum of steps over the decision boundaries (cell midpoints): elementwise, so it
    # fuses, and it clamps to the table's ends by construction. Ties go to the lower value.
    grid = fmt.grid
    q = torch.full_like(v, grid[0])
    for lo, hi in zip(grid[:-1], grid[1:], strict=True):
        q = q + (v > (lo + hi) / 2).to(v.dtype) * (hi - lo)
    return torch.where(torch.isnan(v), v, q)  # NaN compares false everywhere: keep it NaN


def round_to_grid(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round float32 values (in code units) to the nearest point of ``fmt``'s grid, clamped.

    NaN stays NaN. ``v`` must be float32 (callers upcast bf16/fp16 first).
    """
    if fmt.family == "int":
        return torch.round(v).clamp(fmt.qmin, fmt.qmax)
    if fmt.family == "float":
        return _round_float(v, fmt)
    return _round_lut(v, fmt)


def quantize_to_grid(v: torch.Tensor, zero_point: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Grid values of ``v = x / scale`` (float32) under integer ``zero_point``: the runtimes' convention.

    INT: ``clamp(round(v) + zp, qmin, qmax)``, as ONNX QuantizeLinear, torch.ao and XNNPACK
    compute it. Rounding ``v + zp`` instead differs at ties whenever ``zp`` is odd
    (``round(2.5) + 1 = 3`` but ``round(3.5) = 4``). Float and lookup grids are symmetric
    here (``zero_point`` is 0): ``round_G(v)``.

    Example:
        >>> import torch, statqat_ao as sq
        >>> quantize_to_grid(torch.tensor([2.5, -0.5]), torch.tensor(1.0), sq.get_format("uint8")).tolist()
        [3.0, 1.0]
    """
    if fmt.family == "int":
        return (torch.round(v) + zero_point).clamp(fmt.qmin, fmt.qmax)
    return round_to_grid(v + zero_point, fmt)


def grid_spacing(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Width, in code units, of the grid cell that ``v`` rounds into (elementwise).

    Used by error estimates that need the local step (OCTAV's granular noise term).
    """
    if fmt.family == "int":
        return torch.ones_like(v)
    if fmt.family == "float":
        return _float_step(v.abs().clamp(max=fmt.max_value), fmt)
    grid = fmt.grid
    widths = [hi - lo for lo, hi in zip(grid[:-1], grid[1:], strict=True)]
    width = torch.full_like(v, widths[0])
    for k in range(1, len(widths)):
        width = torch.where(v > (grid[k - 1] + grid[k]) / 2, widths[k], width)
    return width
