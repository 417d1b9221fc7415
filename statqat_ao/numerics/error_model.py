"""Closed-form quantization error of a grid for a known input distribution.

For a unit-variance distribution and a grid scaled so that its clip point is c (in
units of sigma), the quantizer's MSE is a sum over grid cells (the intervals between
decision boundaries, the outer two running to infinity) of

    integral over the cell of (x - t_k)^2 f(x) dx
        = [P2(b) - P2(a)] - 2 t_k [P1(b) - P1(a)] + t_k^2 [F(b) - F(a)]

with F the CDF and P1, P2 the first and second partial moments. This is exact for any
grid (INT, FP with subnormals, lookup tables): clipping and granular error together,
with no uniform-in-cell approximation and no sampling. Families: Gaussian, Laplace,
Student-t (nu > 2) and generalized Gaussian (shape beta; 2 is Gaussian, 1 Laplace).

Example:
    >>> import statqat_ao as sq
    >>> round(sq.gaussian_snr_db("int8", sq.c_opt("int8")), 1)
    40.6
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special, stats

from .formats import Format, get_format


@dataclass(frozen=True)
class Family:
    """A symmetric unit-variance distribution, described by its CDF and partial moments.

    ``p1(x)`` is the integral of t f(t) from -inf to x, ``p2(x)`` that of t^2 f(t).
    """

    name: str
    shape: float | None = None

    def cdf(self, x: np.ndarray) -> np.ndarray:
        return _DISPATCH[self.name][0](self, x)

    def p1(self, x: np.ndarray) -> np.ndarray:
        return _DISPATCH[self.name][1](self, x)

    def p2(self, x: np.ndarray) -> np.ndarray:
        return _DISPATCH[self.name][2](self, x)

    @property
    def kurtosis(self) -> float:
        """Non-excess kurtosis E[x^4] / E[x^2]^2 (3 for the Gaussian)."""
        if self.name == "gaussian":
            return 3.0
        if self.name == "laplace":
            return 6.0
        if self.name == "student_t":
            return 3.0 + 6.0 / (self.shape - 4.0) if self.shape > 4 else float("inf")
        b = self.shape
        return float(special.gamma(5 / b) * special.gamma(1 / b) / special.gamma(3 / b) ** 2)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Unit-variance samples (for Monte-Carlo checks and benchmarks)."""
        if self.name == "gaussian":
            return rng.standard_normal(n)
        if self.name == "laplace":
            return rng.laplace(0.0, 1 / np.sqrt(2), n)
        if self.name == "student_t":
            return rng.standard_t(self.shape, n) * np.sqrt((self.shape - 2) / self.shape)
        return stats.gennorm.rvs(self.shape, size=n, random_state=rng) * _gg_alpha(self.shape)


def _gauss(fn):
    return {
        "cdf": lambda f, x: special.ndtr(x),
        "p1": lambda f, x: -stats.norm.pdf(x),
        "p2": lambda f, x: special.ndtr(x) - x * stats.norm.pdf(x),
    }[fn]


_LAPLACE_B = 1 / np.sqrt(2)


def _laplace_lower(x):  # for x <= 0: F, P1, P2 in closed form
    e = 0.5 * np.exp(x / _LAPLACE_B)
    b = _LAPLACE_B
    return e, e * (x - b), e * (x * x - 2 * b * x + 2 * b * b)


def _laplace_cdf(f, x):
    F, _, _ = _laplace_lower(-np.abs(x))
    return np.where(x <= 0, F, 1 - F)


def _laplace_p1(f, x):  # P1 is even for a symmetric density
    return _laplace_lower(-np.abs(x))[1]


def _laplace_p2(f, x):
    P2 = _laplace_lower(-np.abs(x))[2]
    return np.where(x <= 0, P2, 1 - P2)


def _t_scale(nu):
    return np.sqrt((nu - 2) / nu)


def _t_cdf(f, x):
    return stats.t.cdf(x / _t_scale(f.shape), f.shape)


def _t_p1(f, x):
    k, nu = _t_scale(f.shape), f.shape
    a = x / k
    return k * (-(nu + a * a) / (nu - 1) * stats.t.pdf(a, nu))


def _t_p2(f, x):
    # From t^2 = nu((1 + t^2/nu) - 1) and a change of variable onto nu - 2 dof:
    # E[T^2; T < a] = nu(nu-1)/(nu-2) F_{nu-2}(a sqrt((nu-2)/nu)) - nu F_nu(a).
    k, nu = _t_scale(f.shape), f.shape
    a = x / k
    lower = stats.t.cdf(a * np.sqrt((nu - 2) / nu), nu - 2)
    return k * k * (nu * (nu - 1) / (nu - 2) * lower - nu * stats.t.cdf(a, nu))


def _gg_alpha(beta):
    return np.sqrt(special.gamma(1 / beta) / special.gamma(3 / beta))


def _gg_cdf(f, x):
    b, a = f.shape, _gg_alpha(f.shape)
    return 0.5 + np.sign(x) * 0.5 * special.gammainc(1 / b, (np.abs(x) / a) ** b)


def _gg_p1(f, x):
    b, a = f.shape, _gg_alpha(f.shape)
    half_mean_abs = 0.5 * a * special.gamma(2 / b) / special.gamma(1 / b)
    return -half_mean_abs * special.gammaincc(2 / b, (np.abs(x) / a) ** b)


def _gg_p2(f, x):
    b, a = f.shape, _gg_alpha(f.shape)
    return 0.5 + np.sign(x) * 0.5 * special.gammainc(3 / b, (np.abs(x) / a) ** b)


_DISPATCH = {
    "gaussian": (_gauss("cdf"), _gauss("p1"), _gauss("p2")),
    "laplace": (_laplace_cdf, _laplace_p1, _laplace_p2),
    "student_t": (_t_cdf, _t_p1, _t_p2),
    "gen_gaussian": (_gg_cdf, _gg_p1, _gg_p2),
}

GAUSSIAN = Family("gaussian")
LAPLACE = Family("laplace")


def student_t(nu: float) -> Family:
    """Student-t with ``nu`` > 2 degrees of freedom, scaled to unit variance."""
    if nu <= 2:
        raise ValueError(f"Student-t needs nu > 2 for a finite variance, got {nu}")
    return Family("student_t", float(nu))


def gen_gaussian(beta: float) -> Family:
    """Generalized Gaussian with shape ``beta`` (2: Gaussian, 1: Laplace), unit variance."""
    if beta <= 0:
        raise ValueError(f"generalized Gaussian needs beta > 0, got {beta}")
    return Family("gen_gaussian", float(beta))


def quantizer_mse(grid: np.ndarray, c: np.ndarray | float, family: Family = GAUSSIAN) -> np.ndarray:
    """Exact MSE of nearest-point quantization onto ``grid`` scaled to clip point ``c``.

    ``grid`` is in code units (its largest value maps to ``c``); ``c`` in units of
    sigma, scalar or array. Returns the MSE relative to the (unit) variance.
    """
    grid = np.sort(np.asarray(grid, dtype=np.float64))
    c = np.atleast_1d(np.asarray(c, dtype=np.float64))[:, None]
    points = grid[None, :] * c / grid.max()
    mids = (points[:, 1:] + points[:, :-1]) / 2
    n = c.shape[0]

    def at_bounds(fn, at_minus_inf, at_plus_inf):
        # The outer cells run to +-inf, where F, P1, P2 take known limits.
        inner = fn(mids)
        lo = np.concatenate([np.full((n, 1), at_minus_inf), inner], axis=1)
        hi = np.concatenate([inner, np.full((n, 1), at_plus_inf)], axis=1)
        return hi - lo

    cells = (
        at_bounds(family.p2, 0.0, 1.0)
        - 2 * points * at_bounds(family.p1, 0.0, 0.0)
        + points**2 * at_bounds(family.cdf, 0.0, 1.0)
    )
    return np.clip(cells.sum(axis=1), 1e-300, None)


def snr_db_model(
    fmt: str | Format, c, family: Family = GAUSSIAN, symmetric: bool = True
) -> np.ndarray | float:
    """Model SNR in dB of ``fmt`` at clip point ``c`` (units of sigma) for ``family``."""
    fmt = get_format(fmt)
    out = -10 * np.log10(quantizer_mse(fmt.error_model_grid(symmetric), c, family))
    return float(out[0]) if np.ndim(c) == 0 else out


def gaussian_snr_db(fmt: str | Format, c) -> np.ndarray | float:
    """Closed-form SNR (dB) of ``fmt`` for Gaussian data clipped at ``c`` sigma.

    Example:
        >>> round(gaussian_snr_db("int4", 2.37), 1)
        19.3
    """
    return snr_db_model(fmt, c, GAUSSIAN)


@functools.cache
def _c_opt_cached(name: str, family: Family, symmetric: bool) -> float:
    fmt = get_format(name)
    grid = fmt.error_model_grid(symmetric)
    cs = np.geomspace(0.05, 4000.0, 300)
    for _ in range(3):  # a coarse sweep, then two refinements around the best point
        k = int(np.argmin(quantizer_mse(grid, cs, family)))
        cs = np.linspace(cs[max(k - 1, 0)], cs[min(k + 1, len(cs) - 1)], 61)
    return float(cs[np.argmin(quantizer_mse(grid, cs, family))])


@torch.compiler.assume_constant_result
def c_opt(fmt: str | Format, family: Family = GAUSSIAN, symmetric: bool = True) -> float:
    """The MSE-optimal clip point, in units of sigma, of ``fmt`` for ``family`` (cached).

    Example:
        >>> round(c_opt("int4"), 2)  # the -8..7 grid; clip point = 7 * scale
        2.37
    """
    return _c_opt_cached(get_format(fmt).name, family, symmetric)


# Under torch.compile these constants of a format are evaluated once at trace time:
# Dynamo would otherwise trace into the scipy code behind them.
@torch.compiler.assume_constant_result
def kurtosis_to_c_opt_table(
    fmt: str | Format, symmetric: bool = True
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(kurtosis, c_opt) pairs along the generalized Gaussian family, kurtosis ascending.

    Spans shape 0.3 (kurtosis about 70, very heavy tails) to 12 (about 1.9, nearly uniform).
    The analytic estimator interpolates it at each block's sample kurtosis.
    """
    return _kurtosis_table_cached(get_format(fmt).name, symmetric)


@functools.cache
def _kurtosis_table_cached(name: str, symmetric: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    fmt = get_format(name)
    betas = np.geomspace(12.0, 0.3, 32)
    kurt = [gen_gaussian(b).kurtosis for b in betas]
    copt = [c_opt(fmt, gen_gaussian(float(b)), symmetric) for b in betas]
    return tuple(kurt), tuple(copt)
