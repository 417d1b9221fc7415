"""Digits accuracy after W4A8 QAT: float vs StatQAT vs MinMax QAT, converted models.

For each seed:

1. train ``DigitsCNN`` in float (Adam) on sklearn's digits (1,348 train / 449 test
   images, the fixed split of ``load_digits_split``);
2. from that float checkpoint, QAT for W4A8 with
   (i) StatQAT, ``sq.statqat_qconfig`` (INT4 per-channel analytic weights, INT8
   per-tensor iterative activations), and
   (ii) MinMax QAT, ``sq.get_statqat_qconfig("int4", "int8", weight_method="minmax",
   activation_method="minmax")``,
   each for a few epochs at a lower learning rate, on the same batches;
3. ``sq.convert`` the QAT model and measure the *converted* model's test accuracy,
   checking that its predictions (and logits) equal the prepared model's in eval.

For reference it also reports each qconfig with no QAT at all (prepare with one
calibration batch, then convert). Prints mean +- std (sample std over seeds) and the target check "StatQAT within 1
point of float, and not below MinMax".

``--weight`` / ``--activation`` pick other formats (e.g. ``--weight int2``) for a harder
setting than W4A8, which this small, easy task barely notices.

Usage: python benchmarks/digits_accuracy.py [--seeds 3] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, load_digits_split
from statqat_ao.tools.training import train_classifier

warnings.filterwarnings("ignore")


def qat_methods(weight: str, activation: str) -> dict:
    """``{row name: qconfig}``; the default int4 / int8 StatQAT row is ``sq.statqat_qconfig`` itself."""
    tag = "W4A8" if (weight, activation) == ("int4", "int8") else f"W {weight} / A {activation}"
    statqat = (
        sq.statqat_qconfig
        if (weight, activation) == ("int4", "int8")
        else sq.get_statqat_qconfig(weight, activation)
    )
    minmax = sq.get_statqat_qconfig(
        weight, activation, weight_method="minmax", activation_method="minmax"
    )
    return {f"StatQAT {tag}": statqat, f"MinMax {tag}": minmax}


def train(model, x, y, epochs, lr, batch, seed, desc, quiet) -> None:
    """statqat_ao's training loop (Adam, cosine schedule, batches ordered by ``seed``)."""
    train_classifier(model, x, y, epochs, lr, batch, seed, None if quiet else desc)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def run_seed(seed: int, data, args) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    train(
        model,
        x_train,
        y_train,
        args.float_epochs,
        args.float_lr,
        args.batch,
        seed,
        f"seed {seed} float",
        args.no_progress,
    )
    float_logits = logits_of(model, x_test)
    result = {"seed": seed, "float": accuracy(float_logits, y_test)}
    model.train()
    for name, qconfig in qat_methods(args.weight, args.activation).items():
        torch.manual_seed(seed)
        prepared = sq.prepare_qat_fx(copy.deepcopy(model), qconfig, (x_train[: args.batch],))
        # For reference: no QAT at all (scales from the weights and one calibration batch).
        ptq_logits = logits_of(sq.convert(prepared), x_test)
        result[f"{name} PTQ"] = accuracy(ptq_logits, y_test)
        result[f"{name} PTQ logit SNR dB"] = float(sq.snr_db(float_logits, ptq_logits))
        prepared.train()
        # QAT batches: the same order for every method (same generator seed).
        train(
            prepared,
            x_train,
            y_train,
            args.qat_epochs,
            args.qat_lr,
            args.batch,
            seed + 1000,
            f"seed {seed} {name}",
            args.no_progress,
        )
        prepared_logits = logits_of(prepared, x_test)
        converted = sq.convert(prepared)
        converted_logits = logits_of(converted, x_test)
        result[name] = accuracy(converted_logits, y_test)
        result[f"{name} prepared-eval"] = accuracy(prepared_logits, y_test)
        result[f"{name} converted==prepared predictions"] = bool(
            torch.equal(converted_logits.argmax(1), prepared_logits.argmax(1))
        )
        result[f"{name} converted==prepared logits (bitwise)"] = bool(
            torch.equal(converted_logits, prepared_logits)
        )
        result[f"{name} max |converted - prepared| logit"] = (
            (converted_logits - prepared_logits).abs().max().item()
        )
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--float-lr", type=float, default=3e-3)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--qat-lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--weight", default="int4", help="weight format (default int4)")
    parser.add_argument("--activation", default="int8", help="activation format (default int8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs (a smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.float_epochs, args.qat_epochs = 1, 10, 3
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    methods = list(qat_methods(args.weight, args.activation))
    statqat_name, minmax_name = methods
    print(
        f"DigitsCNN on sklearn digits ({len(data[1])} train / {len(data[3])} test), {args.seeds} seed(s): "
        f"float Adam {args.float_epochs} epochs lr {args.float_lr}, QAT Adam {args.qat_epochs} epochs "
        f"lr {args.qat_lr}, batch {args.batch}, cosine LR; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    print("command: python " + " ".join(sys.argv))
    t0 = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        r = run_seed(seed, data, args)
        per_seed.append(r)
        print(
            f"seed {seed}: float {r['float']:.2f}, "
            + ", ".join(f"{n} {r[n]:.2f}" for n in methods),
            flush=True,
        )

    rows = ["float", *methods, *(f"{n} PTQ" for n in methods)]
    summary = {name: mean_std([r[name] for r in per_seed]) for name in rows}
    print(
        f"\n| model | test accuracy % (converted; mean +- std over {args.seeds} seed(s)) | per seed |"
    )
    print("|---|---|---|")
    for name in rows:
        m, s = summary[name]
        label = {"float": "float"}.get(
            name,
            f"{name.removesuffix(' PTQ')} PTQ, no QAT (reference)"
            if name.endswith("PTQ")
            else f"{name} QAT (converted)",
        )
        print(
            f"| {label} | {m:.2f} +- {s:.2f} | "
            + ", ".join(f"{r[name]:.2f}" for r in per_seed)
            + " |"
        )

    checks = {}
    for name in methods:
        same_pred = all(r[f"{name} converted==prepared predictions"] for r in per_seed)
        same_logits = all(r[f"{name} converted==prepared logits (bitwise)"] for r in per_seed)
        worst = max(r[f"{name} max |converted - prepared| logit"] for r in per_seed)
        checks[name] = {
            "predictions_equal": same_pred,
            "logits_bitwise_equal": same_logits,
            "max_logit_diff": worst,
        }
        print(
            f"- {name}: converted == prepared-eval predictions: {'yes' if same_pred else 'NO'}; "
            f"logits bit-identical: {'yes' if same_logits else 'NO'} (max |diff| {worst:.3g})"
        )

    snr = {n: statistics.fmean(r[f"{n} PTQ logit SNR dB"] for r in per_seed) for n in methods}
    print(
        "- PTQ (no QAT) test-logit SNR against the float model: "
        + ", ".join(f"{n} {v:.1f} dB" for n, v in snr.items())
        + " (mean over seeds)"
    )

    f, sq_acc, mm = summary["float"][0], summary[statqat_name][0], summary[minmax_name][0]
    met = (f - sq_acc) <= 1.0 and sq_acc >= mm
    print(
        f"\nTarget (StatQAT within 1 point of float, and not below MinMax): {'MET' if met else 'MISSED'}: "
        f"StatQAT {sq_acc:.2f} vs float {f:.2f} ({sq_acc - f:+.2f} points), vs MinMax {mm:.2f} "
        f"({sq_acc - mm:+.2f} points)"
    )
    n_test = len(data[3])
    wins = sum(r[statqat_name] > r[minmax_name] for r in per_seed)
    losses = sum(r[statqat_name] < r[minmax_name] for r in per_seed)
    print(
        f"(one test image = {100 / n_test:.2f} points; StatQAT - MinMax summed over seeds: "
        f"{round(sum(r[statqat_name] - r[minmax_name] for r in per_seed) * n_test / 100):+d} images; "
        f"per seed StatQAT better / worse / tied: {wins} / {losses} / {len(per_seed) - wins - losses})"
    )
    print(f"total time {time.perf_counter() - t0:.0f} s")

    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "torch": torch.__version__,
                    "per_seed": per_seed,
                    "summary": {k: {"mean": v[0], "std": v[1]} for k, v in summary.items()},
                    "convert_checks": checks,
                    "target_met": met,
                },
                fh,
                indent=2,
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
