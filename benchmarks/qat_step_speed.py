"""Graph-mode QAT training step: float vs StatQAT vs torch.ao QAT vs torchao QAT.

One training step (forward + backward + SGD step) of two whole models, each method
timed in the same run:

* (a) ``DigitsCNN`` on a batch of 256 real digits (cross-entropy);
* (b) ``TransformerBlock(dim=256)`` on x[8, 128, 256] (MSE to a fixed random target).

Methods:

* float: the plain model under ``torch.compile(fullgraph=True)``;
* StatQAT W4A8: ``sq.prepare_qat_fx(model, sq.statqat_qconfig, example_inputs)``
  (INT4 per-channel analytic weights, INT8 per-tensor iterative activations, statistics
  updated every step), compiled;
* torch.ao QAT: ``prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), ...)``
  (W8A8), compiled;
* torchao QAT: ``quantize_(model, QATConfig(Int8DynamicActivationIntxWeightConfig(
  weight_dtype=torch.int4, weight_granularity=PerGroup(32)), step="prepare"))``
  (W4 per group of 32, dynamic per-token INT8 activations; Linear layers only, so on
  DigitsCNN only the final ``fc`` is quantized), compiled;
* for reference (not part of the target): StatQAT W4A8 with ``statqat_qconfig.skip("")``,
  which keeps only the Linear/Conv weight and input quantizers and drops the matmul-operand
  and residual-add quantizers: about the set of tensors torchao's QAT quantizes.

Every method is first tried with ``torch.compile(fullgraph=True)``; if that fails the
failure is printed and the method is timed both under the default ``torch.compile``
(graph breaks allowed) and eagerly; the table says which mode ran, and a peer's best
mode is the one the target compares against. The optimizer step
(``torch.optim.SGD``, foreach) runs eagerly for every method. After warm-up (compilation),
the methods are timed in interleaved rounds, so that load from other processes on a
shared machine hits them alike; the reported figure is the median over all steps.

Usage: python benchmarks/qat_step_speed.py [--steps 60] [--threads 2] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, TransformerBlock, load_digits_split

warnings.filterwarnings("ignore")

FULLGRAPH, DEFAULT, EAGER = "compiled, fullgraph", "compiled, default", "eager"
TARGET = "StatQAT W4A8"
REFERENCE = "StatQAT W4A8, layer quantizers only (reference)"


# ---------------------------------------------------------------------------- methods


def prepare_float(model: nn.Module, example: tuple) -> nn.Module:
    return copy.deepcopy(model)


def prepare_statqat(model: nn.Module, example: tuple) -> nn.Module:
    return sq.prepare_qat_fx(model, sq.statqat_qconfig, example)


def prepare_statqat_layers_only(model: nn.Module, example: tuple) -> nn.Module:
    # skip("") matches the root module, which owns the matmuls and residual adds.
    return sq.prepare_qat_fx(model, sq.statqat_qconfig.skip(""), example)


def prepare_torch_ao(model: nn.Module, example: tuple) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(model), get_default_qat_qconfig_mapping("x86"), example)


def prepare_torchao(model: nn.Module, example: tuple) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    m = copy.deepcopy(model)
    base = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32)
    )
    quantize_(m, QATConfig(base, step="prepare"))
    return m


METHODS = {
    "float": prepare_float,
    TARGET: prepare_statqat,
    "torch.ao x86 QAT (W8A8)": prepare_torch_ao,
    "torchao QAT 8da4w (g32)": prepare_torchao,
    REFERENCE: prepare_statqat_layers_only,
}


# ---------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    loss: object
    lr: float


def digits_workload(dev: torch.device, batch: int) -> Workload:
    torch.manual_seed(0)
    x_train, y_train, _, _ = load_digits_split()
    x, y = x_train[:batch].to(dev), y_train[:batch].to(dev)
    return Workload(
        f"DigitsCNN, digits batch {batch}",
        DigitsCNN().to(dev).train(),
        x,
        y,
        nn.functional.cross_entropy,
        0.05,
    )


def transformer_workload(dev: torch.device, batch: int, seq: int, dim: int) -> Workload:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, dim, generator=g).to(dev)
    target = torch.randn(batch, seq, dim, generator=g).to(dev)
    return Workload(
        f"TransformerBlock(dim={dim}), x[{batch}, {seq}, {dim}]",
        TransformerBlock(dim).to(dev).train(),
        x,
        target,
        nn.functional.mse_loss,
        0.01,
    )


# ---------------------------------------------------------------------------- timing


@dataclass
class Runner:
    method: str
    mode: str
    step: object
    notes: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _one_line(exc: BaseException) -> str:
    """The exception's type, first line and (dynamo's) explanation line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    keep = lines[:1] + [ln for ln in lines[1:] if ln.startswith("Explanation:")][:1]
    return f"{type(exc).__name__}: " + " ".join(keep)[:400]


def _warm_runner(method: str, wl: Workload, mode: str, warmup: int) -> Runner:
    """Prepare ``method`` on ``wl``, wrap it for ``mode`` and run the warm-up steps (may raise)."""
    model = METHODS[method](wl.model, (wl.x,)).to(wl.x.device).train()
    run = model if mode == EAGER else torch.compile(model, fullgraph=(mode == FULLGRAPH))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=wl.lr, momentum=0.9, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        wl.loss(run(wl.x), wl.target).backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(wl.x.device)
    return Runner(method, mode, step)


def make_runners(method: str, wl: Workload, warmup: int) -> list[Runner]:
    """fullgraph if it works; otherwise both the default compile and eager, with the reason."""
    notes = []
    # No dynamo reset after a failure: it would drop the warmed-up graphs of the other methods.
    try:
        return [_warm_runner(method, wl, FULLGRAPH, warmup)]
    except Exception as exc:  # report, do not hide
        notes.append(f"{FULLGRAPH} failed: {_one_line(exc)}")
    runners = []
    for mode in (DEFAULT, EAGER):
        try:
            runners.append(_warm_runner(method, wl, mode, warmup))
        except Exception as exc:
            notes.append(f"{mode} failed: {_one_line(exc)}")
    if not runners:
        runners.append(Runner(method, "failed", None))
    runners[0].notes = notes
    return runners


def time_all(runners: list[Runner], steps: int, rounds: int, dev: torch.device) -> None:
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for r in runners:
            if r.step is None:
                continue
            for _ in range(per_round):
                t = time.perf_counter()
                r.step()
                _sync(dev)
                r.times.append(time.perf_counter() - t)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def report(wl: Workload, runners: list[Runner]) -> dict:
    ref = median(runners[0].times)
    print(f"\n### {wl.name}\n")
    print("| method | mode | ms / step (median) | ratio to float | min ms |\n|---|---|---|---|---|")
    out = {}  # method -> its best mode's median
    for r in runners:
        if r.times:
            t = median(r.times)
            out[r.method] = min(t, out.get(r.method, float("inf")))
            print(
                f"| {r.method} | {r.mode} | {t * 1e3:.2f} | {t / ref:.2f}x | {min(r.times) * 1e3:.2f} |"
            )
        else:
            print(f"| {r.method} | {r.mode} | - | - | - |")
    for r in runners:
        for note in r.notes:
            print(f"- {r.method}: {note}")
    sq_t = out.get(TARGET)
    peers = {k: v for k, v in out.items() if k not in ("float", TARGET, REFERENCE)}
    if sq_t is None:
        print(
            "\nTarget (StatQAT <= 1.3x float and faster than both peers): MISSED (StatQAT did not run)"
        )
        return out
    ratio = sq_t / ref
    faster = all(sq_t < v for v in peers.values()) and len(peers) == 2
    verdict = "MET" if ratio <= 1.3 and faster else "MISSED"
    peer_txt = (
        ", ".join(f"{sq_t / v:.2f}x of {k} (best mode)" for k, v in peers.items()) or "no peer ran"
    )
    print(
        f"\nTarget (StatQAT <= 1.3x float and faster than both peers): {verdict}: "
        f"StatQAT {ratio:.2f}x float; {peer_txt}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=60, help="timed steps per method (median reported)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps (compilation) per method"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--models", default="digits,transformer", help="comma-separated: digits, transformer"
    )
    parser.add_argument(
        "--quick", action="store_true", help="few steps (a smoke test, not a measurement)"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup = 6, 2, 3
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")

    workloads = {
        "digits": lambda: digits_workload(dev, 256),
        "transformer": lambda: transformer_workload(dev, 8, 128, 256),
    }
    print(
        f"QAT step (fwd + bwd + SGD step), median of {args.steps} steps in {args.rounds} interleaved rounds, "
        f"{dev.type}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    )
    print("command: python " + " ".join(sys.argv))
    for key in args.models.split(","):
        wl = workloads[key.strip()]()
        runners = []
        for method in METHODS:
            t = time.perf_counter()
            rs = make_runners(method, wl, args.warmup)
            modes = "; ".join(r.mode for r in rs)
            print(
                f"[{key}] {method}: ready ({modes}) in {time.perf_counter() - t:.1f} s", flush=True
            )
            runners.extend(rs)
        time_all(runners, args.steps, args.rounds, dev)
        report(wl, runners)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
