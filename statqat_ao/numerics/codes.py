"""Storage codes of each format, and the quantize / dequantize ops that use them.

Codes are what a deployed model stores: INT formats their integer (``int8`` for signed,
``uint8`` for unsigned, zero point included); float formats their OCP bit pattern in a
``uint8`` (sign, exponent, mantissa: E2M1 ``0b0111`` is 6.0, FP8 codes view as
``torch.float8_e4m3fn``); lookup formats (NF4, SF4) their table index.

``statqat::quantize`` and ``statqat::dequantize`` are CompositeImplicitAutograd custom
ops, visible as single nodes in exported graphs. ``dequantize(quantize(x))`` is
bit-identical to :func:`statqat_ao.fake_quantize` with the same scale: both compute
``(grid_value - zero_point) * scale`` in float32.

Example:
    >>> import torch, statqat_ao as sq
    >>> from statqat_ao.numerics.codes import quantize, dequantize
    >>> x = torch.tensor([[0.3, -1.2, 2.9, 6.5]])
    >>> scale, zp = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
    >>> codes = quantize(x, scale, zp, "fp4_e2m1")
    >>> codes
    tensor([[ 1, 10,  5,  7]], dtype=torch.uint8)
    >>> dequantize(codes, scale, zp, "fp4_e2m1")
    tensor([[ 0.5000, -1.0000,  3.0000,  6.0000]])
"""

from __future__ import annotations

import functools
import math

import torch

from .blocks import group_view
from .formats import Format, get_format
from .rounding import quantize_to_grid


def code_dtype(fmt: Format) -> torch.dtype:
    """The storage dtype of ``fmt``'s codes.

    Example:
        >>> code_dtype(get_format("int4")), code_dtype(get_format("nvfp4"))
        (torch.int8, torch.uint8)
    """
    return torch.int8 if fmt.family == "int" and fmt.signed else torch.uint8


def _float_code_value(code: int, fmt: Format) -> float:
    sign = -1.0 if code >> (fmt.bits - 1) & 1 else 1.0
    e_field = (code >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    m_field = code & ((1 << fmt.mbits) - 1)
    if e_field == 0:
        value = m_field * 2.0 ** (fmt.emin - fmt.mbits)
    else:
        value = (1 + m_field / 2**fmt.mbits) * 2.0 ** (e_field + fmt.emin - 1)
    return sign * value if value <= fmt.max_value else math.nan  # FP8's NaN / Inf codes


@functools.cache
def code_table(fmt_name: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """``(value_of_code, code_of_grid_index)`` for a float or lookup format.

    ``value_of_code[c]`` decodes code ``c`` (NaN for FP8's NaN/Inf codes);
    ``code_of_grid_index[i]`` encodes ``fmt.grid[i]`` (zero as +0; quantize keeps -0).

    Example:
        >>> values, codes = code_table("fp4_e2m1")
        >>> values[7], values[15], codes[-1]
        (6.0, -6.0, 7)
    """
    fmt = get_format(fmt_name)
    if fmt.family == "lut":
        return tuple(fmt.grid), tuple(range(len(fmt.grid)))
    if fmt.family != "float":
        raise ValueError(f"{fmt.name} is an INT format: its codes are its integers")
    values = tuple(_float_code_value(c, fmt) for c in range(2**fmt.bits))
    code_of = {}
    for c, v in enumerate(values):
        code_of.setdefault(v, c)  # +0 (code 0) before -0
    return values, tuple(code_of[v] for v in fmt.grid)


_LIB = torch.library.Library("statqat", "FRAGMENT")
_LIB.define("quantize(Tensor x, Tensor scale, Tensor zero_point, str fmt) -> Tensor")
_LIB.define(
    "dequantize(Tensor codes, Tensor scale, Tensor zero_point, str fmt, ScalarType out_dtype=float) -> Tensor"
)


def _grouped(t: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    s, z = scale.float(), zero_point.float()
    grouped = group_view(t, scale)
    if grouped is not None:
        t, s = t.reshape(grouped[0]), s.reshape(grouped[1])
        if z.dim() > 0:
            z = z.reshape(grouped[1])
    return t, s, z


def _quantize_impl(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    f = get_format(fmt)
    shape = x.shape
    xf, s, z = _grouped(x.float(), scale, zero_point)
    grid_values = quantize_to_grid(xf / s, z, f)  # the same expression as fake_quantize
    if f.family == "int":
        return grid_values.to(code_dtype(f)).reshape(shape)
    grid = f.grid_tensor(x.device)
    index = torch.searchsorted(grid, grid_values.reshape(-1).contiguous())
    codes = torch.tensor(code_table(f.name)[1], dtype=torch.uint8, device=x.device)[index]
    if f.family == "float":  # keep the sign of zero, as the casts (and fake_quantize's -0.0) do
        flat = grid_values.reshape(-1)
        codes = torch.where((flat == 0) & torch.signbit(flat), 1 << (f.bits - 1), codes.int()).to(torch.uint8)
    return codes.reshape(shape)


def _dequantize_impl(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    f = get_format(fmt)
    shape = codes.shape
    if f.family == "int":
        values = codes.float()
    else:
        table = torch.tensor(code_table(f.name)[0], dtype=torch.float32, device=codes.device)
        values = table[codes.long()]
    v, s, z = _grouped(values, scale, zero_point)
    return ((v - z) * s).reshape(shape).to(out_dtype)


_LIB.impl("quantize", _quantize_impl, "CompositeImplicitAutograd")
_LIB.impl("dequantize", _dequantize_impl, "CompositeImplicitAutograd")


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: str | Format
) -> torch.Tensor:
    """Codes of ``x`` in ``fmt`` (see the module docstring); scale as for fake_quantize."""
    f = get_format(fmt)
    if zero_point is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
    return torch.ops.statqat.quantize(x, scale, zero_point, f.name)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    fmt: str | Format,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values of ``codes``: ``(grid_value(codes) - zero_point) * scale``."""
    f = get_format(fmt)
    if zero_point is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=codes.device)
    return torch.ops.statqat.dequantize(codes, scale, zero_point, f.name, out_dtype)


__all__ = ["code_dtype", "code_table", "dequantize", "quantize"]
