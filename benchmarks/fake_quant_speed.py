"""Compiled QAT step cost: float vs StatQAT vs torch.ao's default x86 QAT qconfig.

A Linear(4096 -> 1024) on x[256, 4096], forward + backward, each timed in one run:

* float: the plain layer under torch.compile;
* StatQAT: weight INT4 per channel (analytic), activation INT8 per tensor (iterative,
  one warm-started step), statistics updated every step, under torch.compile(fullgraph=True);
* torch.ao: ``get_default_qat_qconfig("x86")`` through ``prepare_qat_fx``, eager and
  compiled (the faster one is reported).

The eager StatQAT step is timed twice: with the default ``nonfinite="raise"`` (one host
sync per quantizer per training forward, to raise at the batch that holds NaN) and with
``"skip"`` (no sync).

Usage: python benchmarks/fake_quant_speed.py [--iters 30] [--device cpu]
       [--tokens 256 --in-features 4096 --out-features 1024]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
import warnings

import torch
from torch import nn

import statqat_ao as sq

warnings.filterwarnings("ignore")


class StatQATLinear(nn.Module):
    def __init__(self, linear: nn.Linear, nonfinite: str = "raise"):
        super().__init__()
        self.linear = linear
        self.weight_fq = sq.FakeQuantizer("int4", "analytic", "channel", nonfinite=nonfinite)
        self.act_fq = sq.FakeQuantizer("int8", "iterative", "tensor", nonfinite=nonfinite)

    def forward(self, x):
        w = self.weight_fq(self.linear.weight)
        return nn.functional.linear(self.act_fq(x), w, self.linear.bias)


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def time_step(model: nn.Module, x: torch.Tensor, iters: int, warmup: int = 5) -> float:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        out = model(x)
        out.square().mean().backward()
        for p in params:
            p.grad = None

    for _ in range(warmup):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument(
        "--exact-division", action="store_true",
        help="compile with Inductor's IEEE-exact division (Triton's / is approximate on GPUs)",
    )
    args = parser.parse_args()
    if args.exact_division:
        import torch._inductor.config as inductor_config
        from cuda_checks import exact_division_setting

        setting = exact_division_setting()
        inductor_config.patch(setting).__enter__()  # for the whole run
        print(f"Inductor: {setting}")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = nn.Sequential(nn.Linear(args.in_features, args.out_features)).to(dev)
    x = torch.randn(args.tokens, args.in_features, device=dev)

    results = {}
    results["float (compiled)"] = time_step(torch.compile(copy.deepcopy(base)), x, args.iters)
    statqat = StatQATLinear(copy.deepcopy(base[0])).to(dev).train()
    results["StatQAT W4A8 (compiled, fullgraph)"] = time_step(
        torch.compile(statqat, fullgraph=True), x, args.iters
    )
    results["StatQAT W4A8 (eager)"] = time_step(StatQATLinear(copy.deepcopy(base[0])).to(dev), x, args.iters)
    results["StatQAT W4A8 (eager, nonfinite='skip')"] = time_step(
        StatQATLinear(copy.deepcopy(base[0]), "skip").to(dev), x, args.iters
    )
    ao_eager = time_step(torch_ao_qat(base, x), x, args.iters)
    results["torch.ao x86 QAT (eager)"] = ao_eager
    try:
        results["torch.ao x86 QAT (compiled)"] = time_step(torch.compile(torch_ao_qat(base, x)), x, args.iters)
    except Exception as exc:  # report, do not hide
        print(f"torch.ao compiled failed: {type(exc).__name__}: {exc}")

    ref = results["float (compiled)"]
    print(f"\nLinear({args.in_features}->{args.out_features}), x[{args.tokens},{args.in_features}], "
          f"fwd+bwd, median of {args.iters} steps, "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("| step | ms | ratio to float |\n|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / ref:.2f}x |")
    ao_best = min(v for k, v in results.items() if k.startswith("torch.ao"))
    sq_c = results["StatQAT W4A8 (compiled, fullgraph)"]
    print(f"\nStatQAT compiled / float: {sq_c / ref:.2f}x (target <= 1.3x); "
          f"StatQAT compiled / best torch.ao: {sq_c / ao_best:.2f}x (target < 1)")


if __name__ == "__main__":
    main()
