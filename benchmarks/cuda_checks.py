"""CUDA correctness: StatQAT on a GPU against the CPU and against itself compiled (Triton).

For each format, granularity and method, on one weight-like tensor:

* estimate on CUDA vs on the CPU: the largest relative scale difference (reductions
  sum in another order, so a few float32 ulps are expected);
* fake quant on CUDA with the CPU's scale vs on the CPU: elements that differ (must be 0,
  the op is elementwise and IEEE-exact in both);
* ``torch.compile`` (Inductor, Triton kernels) vs eager on CUDA: forward values and
  straight-through gradients that differ, bit for bit. Triton's float32 ``/`` is an
  approximate division (up to 2 ulp), so by default a value whose quotient lands on a
  rounding tie can take the neighbouring code; Inductor's exact-division setting
  (``sq.exact_division()``) makes ``/`` IEEE-exact, and with it this must be 0;
* a FakeQuantizer trained 5 steps compiled (fullgraph, exact division) vs eager on CUDA:
  the largest relative scale difference (reductions may sum in another order).

``--cases`` picks a subset, e.g. ``--cases fp4_e2m1:32 int8:channel``.

Prints a markdown table and exits non-zero if a must-be-zero column is not zero.

Usage: python benchmarks/cuda_checks.py   (needs a CUDA device)
"""

from __future__ import annotations

import argparse
import sys

import torch

import statqat_ao as sq
from statqat_ao.quantizers.exact_division import exact_division_setting

CASES = [
    ("int4", "channel"),
    ("int4", 32),
    ("int8", "channel"),
    ("fp4_e2m1", 32),
    ("nf4", 64),
    ("fp8_e4m3", "channel"),
    ("mxfp4", None),
    ("nvfp4", None),
]
METHODS = ["minmax", "analytic", "iterative"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).abs() / b.double().cpu().abs().clamp(min=1e-30)).max().item()


def parse_args(argv: list[str]) -> tuple[list[tuple[str, object]], list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="format:granularity pairs (default: all)")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    args = parser.parse_args(argv)
    cases = CASES
    if args.cases:
        cases = []
        for case in args.cases:
            fmt, _, gran = case.partition(":")
            cases.append((fmt, int(gran) if gran.isdigit() else (gran or None)))
    return cases, args.methods


def main() -> int:
    cases, methods = parse_args(sys.argv[1:])
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * torch.rand(512, 1).mul(3).exp()  # rows of different scales
    exact = {exact_division_setting(): True}
    compiled_fq = torch.compile(sq.fake_quantize, fullgraph=True)
    exact_fq = torch.compile(lambda *a: sq.fake_quantize(*a), fullgraph=True)
    failures = 0
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, tensor {tuple(w.shape)}, exact division: {exact}")
    print("| format | granularity | method | scale rel. diff CUDA vs CPU | fake quant elements CUDA != CPU | compiled != eager (values, grads) | compiled, exact division, != eager | online, 5 steps, compiled (exact division) vs eager: scale rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, gran in cases:
        granularity = gran or sq.get_format(fmt).block_size
        for method in methods:
            s_cpu, zp_cpu = sq.estimate_qparams(w, fmt, method, granularity)
            s_gpu, zp_gpu = sq.estimate_qparams(w.to(dev), fmt, method, granularity)
            scale_diff = rel(s_gpu, s_cpu)
            s_dev, zp_dev = s_cpu.to(dev), zp_cpu.to(dev)
            eager_cpu = sq.fake_quantize(w, s_cpu, zp_cpu, fmt)
            x_e = w.to(dev).requires_grad_(True)
            x_c = w.to(dev).requires_grad_(True)
            eager = sq.fake_quantize(x_e, s_dev, zp_dev, fmt)
            compiled = compiled_fq(x_c, s_dev, zp_dev, fmt)
            with sq.exact_division():
                exact_out = exact_fq(w.to(dev), s_dev, zp_dev, fmt)
            (eager * torch.linspace(-1, 1, eager.numel(), device=dev).reshape(eager.shape)).sum().backward()
            (compiled * torch.linspace(-1, 1, compiled.numel(), device=dev).reshape(compiled.shape)).sum().backward()
            cpu_mismatch = int((eager.detach().cpu() != eager_cpu).sum())
            compiled_mismatch = int((compiled != eager).sum()), int((x_c.grad != x_e.grad).sum())
            exact_mismatch = int((exact_out != eager).sum()) if exact else "n/a"
            online = online_scale_diff(fmt, method, granularity, w.to(dev))
            failures += cpu_mismatch + (exact_mismatch if exact else 0)
            print(f"| {fmt} | {granularity} | {method} | {scale_diff:.1e} | {cpu_mismatch} | {compiled_mismatch} | {exact_mismatch} | {online:.1e} |")
    print(f"\n{'OK' if failures == 0 else f'FAILED: {failures} mismatching elements'}")
    return 0 if failures == 0 else 1


def online_scale_diff(fmt: str, method: str, granularity, w: torch.Tensor) -> float:
    """5 training forwards compiled vs eager, compiled with exact division."""
    torch._dynamo.reset()
    eager = sq.FakeQuantizer(fmt, method, granularity).to(w.device)
    compiled_module = sq.FakeQuantizer(fmt, method, granularity).to(w.device)
    compiled = torch.compile(compiled_module, fullgraph=True)
    g = torch.Generator(device=w.device).manual_seed(1)
    for _ in range(5):
        x = w + 0.1 * torch.randn(w.shape, device=w.device, generator=g)
        eager(x)
        with sq.exact_division():
            compiled(x)
    return rel(compiled_module.scale, eager.scale)


if __name__ == "__main__":
    sys.exit(main())
