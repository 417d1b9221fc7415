"""Cold start on SmolLM2-135M: estimating every quantized weight at ``sq.quantize_`` time.

Per format, the wall time of ``sq.quantize_(model, qconfig)`` (the swap and every weight
scale's first estimate) with MinMax, the default estimator (``weight_method="auto"``), and
StatQAT iterative (3 starts x 8 least-squares steps: the cold start the issue measured at
305 s), and of ``sq.calibrate`` on 2,048 tokens with the default qconfig (the forwards
plus the output-aware re-estimate of every weight). 210 Linear weights (``lm_head`` is
tied to the embedding and skipped), 2 CPU threads as the machine has them.

Usage: python benchmarks/llm_cold_start.py [--out benchmarks/results/llm_cold_start.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import statqat_ao as sq  # noqa: E402
from statqat_ao.models import load_smollm2, pydoc_split  # noqa: E402
from statqat_ao.tools.llm_qat import LLMQATSettings, calibration_batches  # noqa: E402

warnings.filterwarnings("ignore")

FORMATS = {"FP4 E2M1 g32": ("fp4_e2m1", 32), "NVFP4": ("nvfp4", 16), "MXFP4": ("mxfp4", 32),
           "INT4 sym per channel": ("int4", "channel"), "INT3 sym g32": ("int3", 32), "INT4 sym g32": ("int4", 32)}  # fmt: skip


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-iterative", action="store_true", help="skip the slow iterative baseline")
    args = parser.parse_args(argv)
    model, tokenizer = load_smollm2()
    batches = calibration_batches(pydoc_split(tokenizer), LLMQATSettings())
    rows = []
    for label, (fmt, granularity) in FORMATS.items():
        row = {"format": label}
        methods = ["minmax", "auto"] + ([] if args.no_iterative or label != "FP4 E2M1 g32" else ["iterative"])
        for method in methods:
            qc = sq.get_statqat_qconfig(fmt, None, weight_granularity=granularity, weight_method=method, skip=["lm_head"])
            copy_ = copy.deepcopy(model)
            row[f"quantize_{method}_s"] = timed(lambda qc=qc, m=copy_: sq.quantize_(m, qc))
            if method == "auto":
                row["calibrate_auto_s"] = timed(lambda m=copy_: sq.calibrate(m, batches))
            del copy_
        rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
