"""Compile time and compiled step time of vision QAT: StatQAT against float and torch.ao's QAT.

For each model (torchvision resnet18, mobilenet_v2, and a small torchvision ViT; random
init, 10 classes, ``--size`` x ``--size`` images, batch ``--batch``) and each method:

* float: the model itself;
* StatQAT: ``sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))`` (INT4 weights per channel,
  INT8 activations, batch norm folded);
* torch.ao: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with
  ``get_default_qat_qconfig_mapping("x86")`` (INT8 weights per channel, UINT8 activations,
  fused conv-bn modules).

Each (model, method) runs in a fresh process with Inductor's on-disk caches off, so the
first compiled training step (forward, backward, SGD) is compile time plus one step. Two
eager steps run first, as a user's loop would before compiling (the quantizers take their
first scales). Reported: the first compiled step minus a steady one (compile time) and
the median of ``--steps`` compiled steps, each with its ratio to float.

Usage: python benchmarks/vision_compile.py [--models resnet18 mobilenet_v2 vit] [--steps 10]
       [--size 64] [--batch 32] [--threads N] [--backend inductor] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

MODELS = {"resnet18": "torchvision:resnet18", "mobilenet_v2": "torchvision:mobilenet_v2", "vit": "torchvision:vit"}
METHODS = ("float", "statqat", "torch.ao")


def prepare(model, method: str, x):

    import statqat_ao as sq

    if method == "statqat":
        return sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    if method == "torch.ao":
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    return model


def run_one(args) -> dict:
    """One (model, method) in this process: the figures of the module docstring."""
    import torch

    from statqat_ao.models.vision import build_classifier

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.arange(args.batch) % 10
    model = prepare(build_classifier(MODELS[args.model], num_classes=10).train(), args.method, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(f) -> float:
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(f(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    eager = [step(model) for _ in range(2)]
    compiled = torch.compile(model, backend=args.backend)
    first = step(compiled)
    steady = [step(compiled) for _ in range(args.steps)]
    median = statistics.median(steady)
    return {
        "model": args.model,
        "method": args.method,
        "eager_step_s": statistics.median(eager),
        "first_compiled_step_s": first,
        "compile_s": first - median,
        "compiled_step_s": median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", help=argparse.SUPPRESS)  # one child run
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print(json.dumps(run_one(args)))
        return
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    rows = []
    for model in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--model", model, "--method", method, "--steps", str(args.steps),
                   "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
                   "--backend", args.backend]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"model": model, "method": method, "error": done.stderr.strip().splitlines()[-1][:300]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


def table(rows: list[dict]) -> str:
    """The BENCHMARKS.md table: compile time and compiled step, each against float."""
    float_rows = {r["model"]: r for r in rows if r["method"] == "float" and "error" not in r}
    lines = ["| model | method | compile s | x float | compiled step ms | x float | eager step ms |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | failed: {r['error']} | | | | |")
            continue
        base = float_rows.get(r["model"])
        c_ratio = f"{r['compile_s'] / base['compile_s']:.2f}" if base else "-"
        s_ratio = f"{r['compiled_step_s'] / base['compiled_step_s']:.2f}" if base else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['compile_s']:.1f} | {c_ratio} | {1e3 * r['compiled_step_s']:.1f} | "
            f"{s_ratio} | {1e3 * r['eager_step_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
