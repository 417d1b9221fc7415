"""Figures for ``statqat analyze``: SNR per layer, and SNR against the clip point per format.

matplotlib (a dev dependency) is imported on first use, with the Agg backend.

Example:
    >>> rows = snr_curves(["int4"], points=5, mc_samples=0)
    >>> [round(r["c_sigma"] / rows[2]["c_sigma"], 2) for r in rows]  # geometric around c_opt
    [0.25, 0.5, 1.0, 2.0, 4.0]
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from statqat_ao.numerics.error_model import c_opt, gaussian_snr_db
from statqat_ao.numerics.formats import get_format, known_formats
from statqat_ao.numerics.rounding import round_to_grid

LAYER_METHODS = ("minmax", "analytic", "iterative", "search", "optimum")
_STYLE = {"minmax": ("o", "tab:gray"), "analytic": ("s", "tab:blue"), "iterative": ("^", "tab:orange"),
          "search": ("x", "tab:green"), "optimum": ("_", "black")}  # fmt: skip
CURVE_COLUMNS = ("format", "c_sigma", "model_snr_db", "mc_snr_db", "is_c_opt")


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or statqat-ao[dev])") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layer_snr(rows: Sequence[Mapping[str, object]], path: str | os.PathLike, title: str) -> None:
    """Plot SNR (dB) per weight tensor, one marker set per method (the paper's per-layer figure).

    ``rows``: one mapping per tensor with a ``"tensor"`` name and an SNR per method among
    ``minmax``, ``analytic``, ``iterative``, ``search``, ``optimum`` (absent methods are left out), as
    :func:`statqat_ao.tools.analyze.analyze_weights` returns. Writes a PNG to ``path``.

    Example:
        >>> rows = [{"tensor": "fc1.weight", "minmax": 18.2, "analytic": 19.4, "optimum": 19.5}]
        >>> plot_layer_snr(rows, "layer_snr.png", "int4, per channel")  # doctest: +SKIP
    """
    if not rows:
        raise ValueError("plot_layer_snr: no rows to plot")
    plt = _pyplot()
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5))
    for method in LAYER_METHODS:
        if not all(method in r for r in rows):
            continue
        marker, color = _STYLE[method]
        y = [float(r[method]) for r in rows]
        ax.plot(x, y, marker=marker, color=color, linestyle="-" if method == "optimum" else "none",
                markersize=10 if method == "optimum" else 5, linewidth=0.8, label=method)  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels([_short(str(r["tensor"])) for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SNR (dB)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(name: str, keep: int = 32) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1 :]


def snr_curves(
    formats: Sequence[str] | None = None, points: int = 121, mc_samples: int = 20_000, mc_points: int = 5
) -> list[dict[str, object]]:
    """SNR (dB) of every format against the clip point ``c`` (units of sigma), Gaussian data.

    The exact error model (:func:`statqat_ao.gaussian_snr_db`) on ``points`` clip points
    spaced geometrically from ``c_opt / 4`` to ``4 c_opt`` (odd ``points`` puts ``c_opt``
    itself in the middle, flagged ``is_c_opt``); ``mc_points`` evenly spread points also
    get a Monte-Carlo SNR from ``mc_samples`` Gaussian samples (NaN elsewhere).
    Block formats (MXFP4, NVFP4) are modelled as their element grid with one real-valued
    scale (the block-scale rounding is not modelled); unsigned grids quantize ``|x|``.

    Example:
        >>> rows = snr_curves(["int4"], points=5, mc_samples=0)
        >>> best = max(rows, key=lambda r: r["model_snr_db"])
        >>> best["is_c_opt"], round(best["c_sigma"], 2)
        (True, 2.37)
    """
    names = known_formats() if formats is None else [get_format(f).name for f in formats]
    rows: list[dict[str, object]] = []
    for name in names:
        c0 = c_opt(name)
        cs = c0 * np.geomspace(0.25, 4.0, points)
        cs[points // 2] = c0 if points % 2 else cs[points // 2]
        model = np.atleast_1d(gaussian_snr_db(name, cs))
        mc_at = set(np.linspace(0, points - 1, mc_points).round().astype(int).tolist()) if mc_samples else set()
        for i, (c, snr) in enumerate(zip(cs, model, strict=True)):
            mc = monte_carlo_snr_db(name, float(c), mc_samples) if i in mc_at else math.nan
            rows.append({"format": name, "c_sigma": float(c), "model_snr_db": float(snr), "mc_snr_db": mc,
                         "is_c_opt": bool(points % 2 and i == points // 2)})  # fmt: skip
    return rows


def monte_carlo_snr_db(fmt: str, c: float, samples: int = 20_000, seed: int = 0) -> float:
    """SNR (dB) of ``fmt`` on ``samples`` standard Gaussian values, clipped at ``c`` sigma.

    Stratified Monte Carlo: one uniform draw in each of ``samples`` equal-width strata
    of [-8, 8] sigma, weighted by the Gaussian density times the stratum width. Random,
    but it resolves the rare clipped tail that sets the error of the 8-bit formats, where
    plain sampling would need millions of values (mass beyond 8 sigma: 1e-15, ignored).

    Example:
        >>> abs(monte_carlo_snr_db("int4", 2.37) - 19.26) < 0.05
        True
    """
    f = get_format(fmt)
    gen = torch.Generator().manual_seed(seed)
    width = 16.0 / samples
    x = -8.0 + width * (torch.arange(samples, dtype=torch.float64) + torch.rand(samples, generator=gen, dtype=torch.float64))
    weight = torch.exp(-0.5 * x * x)  # the density's constant cancels in the ratio
    if not f.signed:
        x = x.abs()  # an unsigned grid used with zero point 0 takes |x| (the mirrored model)
    scale = c / f.clip_code(True)
    # Block formats: the element grid with one scale, as the error model sees it.
    codes = round_to_grid((x / scale).float(), get_format("fp4_e2m1") if f.is_block_format else f)
    noise = (weight * (x - scale * codes.double()).pow(2)).sum()
    return float(10 * torch.log10((weight * x.pow(2)).sum() / noise))


def write_curves_csv(rows: Sequence[Mapping[str, object]], path: str | os.PathLike) -> None:
    """Write :func:`snr_curves` rows to ``path`` (columns ``CURVE_COLUMNS``).

    Example:
        >>> write_curves_csv(snr_curves(["int4"], mc_samples=0), "snr_curves.csv")  # doctest: +SKIP
    """
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(CURVE_COLUMNS)
        for r in rows:
            out.writerow([r["format"], f"{r['c_sigma']:.5g}", f"{r['model_snr_db']:.4f}",
                          "" if math.isnan(r["mc_snr_db"]) else f"{r['mc_snr_db']:.4f}", int(r["is_c_opt"])])  # fmt: skip


def plot_snr_curves(rows: Sequence[Mapping[str, object]], path: str | os.PathLike) -> None:
    """One panel per format: model SNR against ``c`` (log axis), Monte-Carlo dots, ``c_opt`` marked.

    Example:
        >>> plot_snr_curves(snr_curves(["int4", "fp4_e2m1"]), "snr_curves.png")  # doctest: +SKIP
    """
    names = list(dict.fromkeys(str(r["format"]) for r in rows))
    if not names:
        raise ValueError("plot_snr_curves: no rows to plot")
    plt = _pyplot()
    cols = min(6, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        _curve_panel(ax, [r for r in rows if r["format"] == name], name)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("SNR vs clip point, Gaussian data: error model (line), Monte Carlo (dots), c_opt (dashed)",
                 fontsize=9)  # fmt: skip
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.05, top=0.92, wspace=0.3, hspace=0.55)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_panel(ax, rows: Sequence[Mapping[str, object]], name: str) -> None:
    c = np.array([r["c_sigma"] for r in rows], dtype=float)
    ax.plot(c, [r["model_snr_db"] for r in rows], color="tab:blue", linewidth=1.2)
    mc = [(r["c_sigma"], r["mc_snr_db"]) for r in rows if not math.isnan(r["mc_snr_db"])]
    if mc:
        ax.plot(*zip(*mc, strict=True), "o", color="tab:orange", markersize=3)
    best = c_opt(name)
    ax.axvline(best, color="black", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter("")  # minor labels of a short log axis overlap
    ax.set_title(f"{name}: c_opt={best:.3g}, {gaussian_snr_db(name, best):.1f} dB", fontsize=7)
    ax.tick_params(labelsize=6)
