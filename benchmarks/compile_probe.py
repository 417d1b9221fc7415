"""Where a prepared model's compile time goes, and how many graphs its first compiled steps build.

Two probes (Inductor, on-disk caches off, in this process):

* ``--phases``: two eager steps, then the first compiled training step (forward, backward,
  SGD) under cProfile; prints the cumulative seconds of each compiler phase (cProfile
  inflates Python-heavy phases about 3x, so compare methods, not absolute times).
* ``--first-steps N``: ``torch.compile`` straight after prepare, as the README does; prints
  the seconds of each of the first N compiled steps and the graphs Dynamo built.

Models: ``resnet18`` (torchvision, 10 classes, 64x64, batch 8) with ``--method float`` or
``statqat`` (``sq.prepare_qat_fx`` with ``sq.statqat_qconfig``), or ``llama`` (a 2-layer
transformers Llama after ``sq.quantize_`` with weight-only INT4 g32; first steps only).

Usage: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/compile_probe.py --model resnet18
       --method statqat (--phases | --first-steps 3) [--threads 2]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch

import statqat_ao as sq

# phase -> the function whose cumulative time it is ("file:line(function)" as pstats names it)
PHASES = {
    "AOT autograd joint-graph capture": "graph_compile.py:191(aot_stage1_graph_capture)",
    "Inductor lowering": "graph.py:1090(run)",
    "Inductor scheduler (fusion decisions)": "scheduler.py:4038(_init)",
    "Inductor C++ code generation": "scheduler.py:9203(codegen)",
    "C++ compiler wait": "async_compile.py:809(wait)",
    "compiled module load": "compile_tasks.py:22(_reload_python_module)",
    "backward graph compile": "compile_fx.py:2558(compile_fx_backward)",
}


def build(model: str, method: str):
    """``(model to train, loss of one batch)``."""
    torch.manual_seed(0)
    if model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        net = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4))  # fmt: skip
        sq.quantize_(net, sq.get_statqat_qconfig("int4", activation=None, weight_granularity=32, skip=["lm_head"]))
        ids = torch.randint(0, 256, (4, 32))
        return net, lambda f: f(input_ids=ids, labels=ids).loss
    from statqat_ao.models.vision import build_classifier

    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 10
    net = build_classifier("torchvision:resnet18", num_classes=10).train()
    if method == "statqat":
        net = sq.prepare_qat_fx(net, sq.statqat_qconfig, (x,))
    return net, lambda f: torch.nn.functional.cross_entropy(f(x), y)


def phases(profile: cProfile.Profile) -> dict[str, float]:
    cumulative: dict[str, float] = {}
    for (path, line, fn), (_, _, _, seconds, _) in pstats.Stats(profile).stats.items():
        key = f"{path.rsplit('/', 1)[-1]}:{line}({fn})"
        cumulative[key] = cumulative.get(key, 0.0) + seconds
    out = {"Dynamo bytecode tracing": cumulative.get("symbolic_convert.py:1943(run)", 0.0)
           - cumulative.get("output_graph.py:1925(compile_subgraph)", 0.0)}  # fmt: skip
    out.update({name: cumulative.get(key, 0.0) for name, key in PHASES.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "llama"])
    parser.add_argument("--method", default="statqat", choices=["float", "statqat"])
    probe = parser.add_mutually_exclusive_group(required=True)
    probe.add_argument("--phases", action="store_true")
    probe.add_argument("--first-steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    net, loss_of = build(args.model, args.method)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step(f) -> float:
        start = time.perf_counter()
        loss = loss_of(f)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    if args.phases:
        for _ in range(2):
            step(net)
        profile = cProfile.Profile()
        profile.enable()
        seconds = step(torch.compile(net))
        profile.disable()
        print(f"{args.model} {args.method}: first compiled step {seconds:.1f} s under cProfile")
        for name, t in phases(profile).items():
            print(f"  {name}: {t:.1f} s")
        return
    from torch._dynamo.utils import counters

    compiled = torch.compile(net)
    times = [round(step(compiled), 1) for _ in range(args.first_steps)]
    print(f"{args.model} {args.method}: first compiled steps {times} s, graphs {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main()
