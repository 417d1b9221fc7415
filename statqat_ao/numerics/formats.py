"""Number formats: the grids a quantizer rounds to.

A :class:`Format` is a finite sorted grid of representable element values (in code
units, before scaling) plus what it takes to round to it bit-exactly. Block formats
(MXFP4, NVFP4) add a block size and the format their per-block scale is stored in.

Example:
    >>> import statqat_ao as sq
    >>> fmt = sq.get_format("fp4_e2m1")
    >>> fmt.grid[-4:], fmt.max_value, fmt.bits
    ((2.0, 3.0, 4.0, 6.0), 6.0, 4)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

FormatFamily = Literal["int", "float", "lut"]


@dataclass(frozen=True)
class Format:
    """A quantization grid.

    Attributes:
        name: canonical name, as accepted by :func:`get_format`.
        family: ``"int"`` (uniform integer grid), ``"float"`` (sign, exponent, mantissa)
            or ``"lut"`` (a lookup table of arbitrary values).
        bits: storage bits per element.
        grid: every representable element value, sorted ascending, in code units.
        signed: whether the grid holds negative values (unsigned INT grids do not).
        ebits, mbits, emin: float formats only: exponent bits, mantissa bits and the
            smallest normal exponent (unbiased); subnormals share emin's step.
        block_size: block formats only: elements sharing one scale.
        scale_format: block formats only: ``"e8m0"`` (power of two) or ``"fp8_e4m3"``.
        torch_dtype: the torch dtype whose casts this grid matches bit for bit, if any.
    """

    name: str
    family: FormatFamily
    bits: int
    grid: tuple[float, ...]
    signed: bool = True
    ebits: int = 0
    mbits: int = 0
    emin: int = 0
    block_size: int | None = None
    scale_format: str | None = None
    torch_dtype: torch.dtype | None = None

    @property
    def qmin(self) -> float:
        """Smallest grid value (code units)."""
        return self.grid[0]

    @property
    def qmax(self) -> float:
        """Largest grid value (code units): the clip point is ``scale * qmax``."""
        return self.grid[-1]

    @property
    def max_value(self) -> float:
        """Largest magnitude on the grid."""
        return max(abs(self.grid[0]), abs(self.grid[-1]))

    @property
    def is_block_format(self) -> bool:
        return self.block_size is not None

    @property
    def levels(self) -> int:
        return len(self.grid)

    def asymmetric_center(self) -> float:
        """Zero point that centres an unsigned INT grid on zero (0 for other grids)."""
        return float(2 ** (self.bits - 1)) if (self.family == "int" and not self.signed) else 0.0

    def clip_code(self, symmetric: bool = True) -> float:
        """Grid value at the clip point, for zero-centred use: ``clip = scale * clip_code``.

        Equals ``error_model_grid(symmetric).max()`` (plain Python: safe under torch.compile).
        """
        return self.qmax - (0.0 if symmetric else self.asymmetric_center())

    def error_model_grid(self, symmetric: bool = True) -> np.ndarray:
        """The grid as the error model sees it, for zero-centred data.

        Signed grids are used as they are. An unsigned grid used symmetrically (zero
        point 0, for non-negative data) is mirrored, which models |x| on the grid;
        used asymmetrically it is shifted by :meth:`asymmetric_center`.
        """
        g = np.asarray(self.grid, dtype=np.float64)
        if self.signed:
            return g
        if symmetric:
            return np.unique(np.concatenate([-g, g]))
        return g - self.asymmetric_center()

    def grid_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.grid, device=device, dtype=dtype)

    def __repr__(self) -> str:
        extra = f", block={self.block_size}, scale={self.scale_format}" if self.block_size else ""
        return f"Format({self.name}, {self.family}, {self.bits} bits, {self.levels} levels{extra})"


def _int_format(bits: int, signed: bool, narrow: bool = False) -> Format:
    if signed:
        hi = 2 ** (bits - 1) - 1
        lo = -hi if narrow else -(hi + 1)
    else:
        lo, hi = 0, 2**bits - 1 - (1 if narrow else 0)
    name = f"{'int' if signed else 'uint'}{bits}{'_narrow' if narrow else ''}"
    dtype = {(8, True, False): torch.int8, (8, False, False): torch.uint8}.get((bits, signed, narrow))
    return Format(name, "int", bits, tuple(float(v) for v in range(lo, hi + 1)), signed, torch_dtype=dtype)


def _float_grid(ebits: int, mbits: int, bias: int, max_value: float) -> tuple[float, ...]:
    """All finite values of a sign/exponent/mantissa format, up to ``max_value``."""
    emin = 1 - bias
    positives = {0.0}
    for e_field in range(0, 2**ebits):
        for m_field in range(0, 2**mbits):
            if e_field == 0:
                v = m_field * 2.0 ** (emin - mbits)
            else:
                v = (1 + m_field / 2**mbits) * 2.0 ** (e_field - bias)
            if v <= max_value:
                positives.add(v)
    pos = sorted(positives)
    return tuple([-v for v in reversed(pos[1:])] + pos)


def _float_format(name: str, ebits: int, mbits: int, bias: int, max_value: float, dtype=None) -> Format:
    return Format(
        name,
        "float",
        1 + ebits + mbits,
        _float_grid(ebits, mbits, bias, max_value),
        ebits=ebits,
        mbits=mbits,
        emin=1 - bias,
        torch_dtype=dtype,
    )


# NF4 as published with QLoRA (Dettmers et al., 2023) and used by bitsandbytes and torchao.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def _normal_float_table(quantile_fn, offset: float = 0.9677083) -> tuple[float, ...]:
    """The NF4 construction (Dettmers et al., 2023) for any symmetric distribution.

    8 positive values at evenly spaced quantiles in [0.5, offset], 7 negative ones,
    and an exact zero, normalised to [-1, 1].
    """
    pos = quantile_fn(np.linspace(offset, 0.5, 9)[:-1])
    neg = -quantile_fn(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    return tuple(float(np.float32(v)) for v in values / np.abs(values).max())


@functools.cache
def _lut_formats() -> dict[str, Format]:
    from scipy import stats

    nf4 = NF4_TABLE
    # SF4 (Dotzel et al., 2024): the same construction on Student-t with 5 degrees of freedom.
    sf4 = _normal_float_table(lambda p: stats.t.ppf(p, df=5))
    return {"nf4": Format("nf4", "lut", 4, nf4), "sf4": Format("sf4", "lut", 4, sf4)}


def _block_format(name: str, element: Format, block_size: int, scale_format: str) -> Format:
    return Format(
        name,
        element.family,
        element.bits,
        element.grid,
        ebits=element.ebits,
        mbits=element.mbits,
        emin=element.emin,
        block_size=block_size,
        scale_format=scale_format,
    )


@functools.cache
def _registry() -> dict[str, Format]:
    formats: dict[str, Format] = {}
    for bits in (2, 3, 4, 8):
        for signed in (True, False):
            for narrow in (False, True):
                f = _int_format(bits, signed, narrow)
                formats[f.name] = f
    fp4 = _float_format("fp4_e2m1", 2, 1, 1, 6.0)
    for f in (
        fp4,
        _float_format("fp4_e3m0", 3, 0, 3, 16.0),
        _float_format("fp6_e2m3", 2, 3, 1, 7.5),
        _float_format("fp6_e3m2", 3, 2, 3, 28.0),
        _float_format("fp8_e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn),
        _float_format("fp8_e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
        _block_format("mxfp4", fp4, 32, "e8m0"),
        _block_format("nvfp4", fp4, 16, "fp8_e4m3"),
    ):
        formats[f.name] = f
    formats.update(_lut_formats())
    return formats


_ALIASES = {"fp4": "fp4_e2m1", "fp8_e4m3fn": "fp8_e4m3", "e2m1": "fp4_e2m1", "fp8": "fp8_e4m3"}


_REGISTRY = _registry()  # built at import: torch.compile then reads a plain dict


def known_formats() -> list[str]:
    """Names accepted by :func:`get_format` (aliases excluded)."""
    return sorted(_REGISTRY)


def get_format(name: str | Format) -> Format:
    """Return the :class:`Format` called ``name`` (case-insensitive).

    Example:
        >>> get_format("int4").grid[:3]
        (-8.0, -7.0, -6.0)
        >>> get_format("mxfp4").block_size
        32

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a Format, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _REGISTRY[key]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; known formats: {', '.join(known_formats())}"
        ) from None
