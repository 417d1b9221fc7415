"""Eager QAT on a Llama-style decoder: one compiled training step, StatQAT against float and torchao.

The model is ``transformers.LlamaForCausalLM`` (random init; hidden 512, 4 layers,
8 heads, intermediate 1376, vocabulary 4096 by default), called as HF loops call it:
``model(input_ids=..., labels=...)``, loss backward, SGD step. Methods, each on its own
deep copy of the same model:

* float: the plain model;
* StatQAT FP4 g32 weight-only, analytic / iterative weights (``sq.quantize_``, ``lm_head``
  kept float);
* StatQAT W4A8 (INT4 per-channel analytic weights, INT8 per-tensor iterative activations);
* torchao weight-only QAT: ``QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4,
  group_size=32))``;
* torchao 8da4w QAT: ``QATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
  weight_granularity=PerGroup(32)), step="prepare")``;
* StatQAT W4A8 with ``sq.quantize_(..., example_kwargs={"input_ids": ids})``: activation
  scales estimated eagerly at the swap, so compilation sees only the warm update.

Every method runs under ``torch.compile(model, fullgraph=True)``; the first step's
time (compilation) is reported on its own. After warm-up the methods are timed in
interleaved rounds, so that load from other processes hits them alike; the figure is
the median step. Peak memory (``--memory``) is the peak resident set of a fresh process
per method that builds, prepares and runs 3 compiled steps (torch itself and the
compiler included; on CPU there is no allocator counter).

Usage: python benchmarks/llm_qat_step.py [--steps 20] [--hidden 512] [--layers 4] [--seq 256]
       [--batch 4] [--threads 2] [--methods ...] [--memory]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

# The first step's time is a compile time only if Inductor's on-disk caches are off (a
# second run would otherwise reuse the first's kernels): --cache turns them back on.
if "--cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

import statqat_ao as sq  # noqa: E402

warnings.filterwarnings("ignore")


def build_model(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def statqat(qconfig) -> callable:
    def prepare(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sq.quantize_(model, qconfig)

    return prepare


def torchao_weight_only(model):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    cfg = QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare")
    quantize_(model, cfg, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    return model


def torchao_8da4w(model):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.qat import QATConfig

    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    quantize_(model, QATConfig(base, step="prepare"), filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    return model


METHODS = {
    "float": lambda m: m,
    "StatQAT FP4 g32 weight-only, analytic": statqat(
        sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, skip=["lm_head"])
    ),
    "StatQAT FP4 g32 weight-only, iterative": statqat(
        sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, weight_method="iterative", skip=["lm_head"])
    ),
    "torchao QAT int4 g32 weight-only": torchao_weight_only,
    "StatQAT W4A8": statqat(sq.get_statqat_qconfig("int4", "int8", skip=["lm_head"])),
    "torchao QAT 8da4w": torchao_8da4w,
    "StatQAT W4A8, activation scales from an example batch": None,  # built in prepare_method
}


def prepare_method(name: str, model: nn.Module, ids: torch.Tensor) -> nn.Module:
    if name == "StatQAT W4A8, activation scales from an example batch":
        # sq.quantize_(..., example_kwargs=...) estimates activation scales eagerly, so the
        # compiled step traces only the warm one-step update, not the cold start's restarts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qconfig = sq.get_statqat_qconfig("int4", "int8", skip=["lm_head"])
            return sq.quantize_(model, qconfig, example_kwargs={"input_ids": ids})
    return METHODS[name](model)


def make_step(model, ids):
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        loss = compiled(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def run_timing(args) -> dict:
    torch.set_num_threads(args.threads)
    base = build_model(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    steps, first = {}, {}
    for name in args.methods:
        model = prepare_method(name, copy.deepcopy(base), ids).train()
        steps[name] = make_step(model, ids)
        t = time.perf_counter()
        steps[name]()  # compiles
        first[name] = time.perf_counter() - t
        print(f"compiled {name}: first step {first[name]:.1f} s", flush=True)
        steps[name]()
    times = {name: [] for name in args.methods}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: {"median_s": statistics.median(v), "first_s": first[name]} for name, v in times.items()}


def run_memory(args, name: str) -> float:
    """Peak resident set (MiB) of a fresh process that builds, prepares and runs 3 compiled steps."""
    cmd = [sys.executable, __file__, "--_memory-child", name, *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--memory"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def memory_child(args, name: str) -> None:
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    model = prepare_method(name, build_model(args), ids).train()
    step = make_step(model, ids)
    for _ in range(3):
        step()
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--memory", action="store_true", help="also measure peak memory, one process per method")
    p.add_argument("--cache", action="store_true", help="keep Inductor's on-disk caches (first-step times are then not compile times)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args, args.memory_child)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, {args.steps} timed steps")
    results = run_timing(args)
    if args.memory:
        for name in args.methods:
            results[name]["peak_mib"] = run_memory(args, name)
    f = results["float"] if "float" in results else None
    print("\n| method | median step (s) | vs float | first step, compile (s) | vs float | peak memory (MiB) | vs float |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['median_s'] / f['median_s']:.2f}x" if f else "-"
        cratio = f"{r['first_s'] / f['first_s']:.2f}x" if f else "-"
        mem = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        mratio = f"{r['peak_mib'] / f['peak_mib']:.2f}x" if f and "peak_mib" in r and "peak_mib" in f else "-"
        print(f"| {name} | {r['median_s']:.3f} | {ratio} | {r['first_s']:.1f} | {cratio} | {mem} | {mratio} |")


if __name__ == "__main__":
    main()
