"""The demo's figures: training curves per method, and weight SNR per layer.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "curves.png"
    >>> plot_training_curves({"int4/minmax": [2.3, 1.1, 0.7], "int4/analytic": [2.2, 0.9, 0.5]}, path)
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    t = torch.tensor(values)
    if len(values) < window:
        return values
    kernel = torch.ones(window) / window
    padded = torch.cat([t[:1].repeat(window - 1), t])
    return torch.nn.functional.conv1d(padded.view(1, 1, -1), kernel.view(1, 1, -1)).flatten().tolist()


def plot_training_curves(
    curves: dict[str, list[float]], path: Path, window: int = 10, title: str = "W4A4 QAT", log_y: bool = True
) -> None:
    """Loss per QAT step, one panel per format and one line per method (``"fmt/method"`` keys);
    thin lines are the raw losses, thick ones a moving average over ``window`` steps."""
    plt = _pyplot()
    formats = list(dict.fromkeys(key.split("/")[0] for key in curves))
    fig, axes = plt.subplots(1, len(formats), figsize=(6 * len(formats), 4), squeeze=False, sharey=True)
    for ax, fmt in zip(axes[0], formats, strict=True):
        for key, losses in curves.items():
            if key.split("/")[0] != fmt:
                continue
            (line,) = ax.plot(_smooth(losses, window), label=key.split("/")[1], linewidth=2)
            ax.plot(losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        ax.set_title(f"{title}, {fmt}")
        ax.set_xlabel("QAT step")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("training loss (cross-entropy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_snr_of(
    model: torch.nn.Module,
    fmt: str,
    path: Path,
    granularity: int | str = "channel",
    title: str | None = None,
    include=lambda name: True,
    max_rows: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Per-layer weight SNR of ``model``'s weights (the ones ``include(name)`` accepts) in
    ``fmt``: MinMax, StatQAT analytic, iterative and search, and the optimum (the paper's
    per-layer figure). Returns the rows plotted."""
    from .analyze import analyze_weights
    from .analyze_plots import plot_layer_snr

    weights = {name: p.detach() for name, p in model.named_parameters() if p.dim() >= 2 and include(name)}
    rows, _ = analyze_weights(weights, fmt, granularity, max_rows=max_rows, progress=progress)
    where = "per channel" if granularity == "channel" else f"groups of {granularity}"
    plot_layer_snr(rows, path, title or f"{type(model).__name__} float weights in {fmt}, {where}")
    return rows
