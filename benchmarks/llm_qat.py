"""SmolLM2-135M weight-only QAT: held-out perplexity, StatQAT against MinMax, LSQ and the peers.

The model is the real SmolLM2-135M-Instruct (``statqat_ao.models.load_smollm2``, a
30-layer Llama decoder). Every Linear is quantized weight-only except the tied
``lm_head``; the embedding stays float and frozen. Text: Python's ``pydoc_data.topics``,
tokenized once; held-out perplexity on the last ``--eval-windows`` windows of 256 tokens,
training on random windows of everything before them (never the held-out ones).

Per row, one run: quantize a copy of the float model, measure perplexity (PTQ: scales
from the weights alone), train ``--steps`` AdamW steps on the same batches as every other
row, measure again (QAT), convert and compare the converted model's logits with the
trained model's (0 = bit-identical). Rows:

* StatQAT (``sq.quantize_``): MinMax, LSQ, StatQAT analytic, StatQAT iterative;
* torchao's own QAT (``quantize_(model, QATConfig(IntxFakeQuantizeConfig(torch.int4, ...)))``,
  converted with ``QATConfig(step="convert")`` + ``IntxWeightOnlyConfig``): INT4
  symmetric per group of 32 and per channel, the formats torchao's QAT has on CPU
  (its NVFP4 / MX QAT needs CUDA);
* Brevitas 0.13 (``pip install -e '.[bench]'``; rows say why they are empty if it is
  missing), ``benchmarks/llm_peers_brevitas.py``: FP4 E2M1 g32, NVFP4, MXFP4, INT4 per
  channel, MSE-initialised learned scales;
* float trained the same way: QAT on this text also adapts the model to it, so this row
  says how much of a QAT row's drop in perplexity is not about quantization.

Formats: FP4 E2M1 g32 and NVFP4 with every StatQAT row; MXFP4, INT4 per channel, INT3 g32
and INT4 g32 with MinMax and StatQAT analytic (PTQ iterative too). The weights were
dequantized from GGUF Q4_1 (asymmetric INT4 in blocks of 32), so no benchmarked format
lines up with that grid.

After the table: for each format, the StatQAT analytic QAT model is converted, lowered
with ``statqat_ao.backends.torchao.lower`` (weights become torchao tensors) and asked to
continue a prompt; torchao has no tensor for E2M1 codes with float32 group scales, so
FP4 E2M1 g32 is not lowered (the reason is printed).

The ``StatQAT default`` row is what ``sq.get_statqat_qconfig(fmt, None)`` gives:
``weight_method="auto"`` (the search for groups up to 256 and MX / NV blocks, analytic
above) and ``weight_error="auto"`` (output-aware), calibrated with ``sq.calibrate`` on the
first 2,048 training tokens before the PTQ measurement. The other StatQAT rows use the
weight's own error and no calibration, as before the output-aware estimators.

Usage: python benchmarks/llm_qat.py [--quick] [--steps 20] [--out llm_qat.json]
       python benchmarks/llm_qat.py --methods minmax default --peers torchao --merge old.json --out new.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import statqat_ao as sq  # noqa: E402
from statqat_ao.models import load_smollm2, perplexity, pydoc_split  # noqa: E402
from statqat_ao.tools.llm_qat import (  # noqa: E402
    FLOAT_TRAINING,
    LLMQATSettings,
    Recipe,
    gap_recovered,
    qat_run,
    statqat_recipe,
)

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))

PROMPT = "The for statement in Python"
FORMATS = {  # label: (statqat format, granularity, torchao / brevitas peers)
    "FP4 E2M1 g32": ("fp4_e2m1", 32, ("brevitas fp4_e2m1",)),
    "NVFP4": ("nvfp4", 16, ("brevitas nvfp4",)),
    "MXFP4": ("mxfp4", 32, ("brevitas mxfp4",)),
    "INT4 sym per channel": ("int4", "channel", ("torchao", "brevitas int4")),
    "INT3 sym g32": ("int3", 32, ()),
    "INT4 sym g32": ("int4", 32, ("torchao",)),
}
FULL = ("FP4 E2M1 g32", "NVFP4")  # every method
QAT_FULL = ("minmax", "lsq", "analytic", "iterative", "default")
QAT_SHORT = ("minmax", "analytic", "default")
LABELS = {
    "minmax": "MinMax",
    "lsq": "LSQ",
    "analytic": "StatQAT analytic",
    "iterative": "StatQAT iterative",
    "default": "StatQAT default (auto, output-aware)",
}
DEPLOYED = "default"  # the QAT model that is lowered and asked to continue the prompt


@dataclass
class Row:
    fmt: str
    method: str
    ptq: float | None
    qat: float | None
    step_s: float | None = None
    converted_diff: float | None = None
    note: str = ""


def statqat(fmt: str, granularity, method: str) -> Recipe:
    """``default``: the qconfig's own defaults (``weight_method="auto"``, ``weight_error="auto"``),
    calibrated on the first 2,048 training tokens; other methods with the weight's own error."""
    if method == "default":
        qc = sq.get_statqat_qconfig(fmt, None, weight_granularity=granularity, skip=["lm_head"])
    else:
        qc = sq.get_statqat_qconfig(fmt, None, weight_granularity=granularity, weight_method=method, weight_error="weight", skip=["lm_head"])
    return statqat_recipe(qc)


def _is_quantized_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name != "lm_head"


def torchao_recipe(granularity) -> Recipe:
    """torchao's weight-only INT4 QAT (symmetric), as its docs show it, converted to IntxWeightOnly."""
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    group = None if granularity == "channel" else granularity
    fake = IntxFakeQuantizeConfig(torch.int4, group_size=group) if group else IntxFakeQuantizeConfig(torch.int4, granularity="per_channel")

    def prepare(model: nn.Module) -> None:
        quantize_(model, QATConfig(weight_config=fake, step="prepare"), filter_fn=_is_quantized_linear)

    def convert(model: nn.Module) -> nn.Module:
        out = copy.deepcopy(model)
        quantize_(out, QATConfig(step="convert"), filter_fn=_is_quantized_linear)
        gran = PerAxis(0) if group is None else PerGroup(group)
        quantize_(out, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=gran), filter_fn=_is_quantized_linear)
        return out.eval()

    return Recipe(prepare, convert)


def brevitas_recipe(fmt: str, granularity) -> Recipe | str:
    """Brevitas weight-only QAT, or the reason it cannot run here."""
    import llm_peers_brevitas as peers

    reason = peers.brevitas_available()
    if reason is not None:
        return reason
    group = None if granularity == "channel" else granularity
    return Recipe(lambda model: peers.brevitas_quantize_(model, fmt, group), None, learned_scales=("scaling_impl.value",))


def peer_recipes(fmt: str, granularity, peers: tuple[str, ...]):
    for peer in peers:
        if peer == "torchao":
            yield "torchao QAT", torchao_recipe(granularity)
        else:
            yield "Brevitas QAT", brevitas_recipe(peer.split()[1], granularity)


def lowered_sentence(converted: nn.Module, tokenizer, fmt_label: str) -> str:
    from statqat_ao.backends import torchao as torchao_backend

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    try:
        lowered = torchao_backend.lower(converted, (ids,))
    except torchao_backend.UnsupportedModelError as error:
        return f"not lowered ({str(error).split(';')[0].split(': ', 1)[-1]})"
    with torch.no_grad():
        out = lowered.generate(ids, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ")


def run(args) -> dict:
    model, tokenizer = load_smollm2(num_layers=args.layers)
    split = pydoc_split(tokenizer, held_out_windows=16)
    settings = LLMQATSettings(steps=args.steps, batch=args.batch, lr=args.lr, eval_windows=args.eval_windows, seed=args.seed)
    float_ppl = perplexity(model, split.held_out[-settings.eval_windows :])
    print(f"float perplexity {float_ppl:.3f}", flush=True)
    formats = {k: FORMATS[k] for k in (args.formats or FORMATS)}
    rows: list[Row] = []
    if not args.quick and args.methods is None:  # how much of QAT's drop in perplexity is the text, not the quantizer
        result = qat_run(model, split, FLOAT_TRAINING, settings, desc="float")
        rows.append(Row("float", "float, same training", float_ppl, result.qat_perplexity, result.step_seconds))
        print(rows[-1], flush=True)
    sentences: dict[str, str] = {}
    for label, (fmt, granularity, peers) in formats.items():
        qat_methods = QAT_FULL if label in FULL else QAT_SHORT
        if args.quick:
            qat_methods, peers = ("minmax", "default"), ()
        if args.methods:
            qat_methods = tuple(m for m in qat_methods if m in args.methods)
        peers = tuple(p for p in peers if args.peers is None or p.split()[0] in args.peers)
        for method in qat_methods:
            keep = method == DEPLOYED
            result = qat_run(model, split, statqat(fmt, granularity, method), settings, desc=f"{label} {method}", keep_models=keep)
            rows.append(Row(label, LABELS[method], result.ptq_perplexity, result.qat_perplexity, result.step_seconds, result.converted_max_abs_diff))
            print(rows[-1], flush=True)
            if keep and not args.no_lower:
                sentences[label] = lowered_sentence(result.converted, tokenizer, label)
                print(f"  deployed: {sentences[label]}", flush=True)
        if "iterative" not in qat_methods and (not args.methods or "iterative" in args.methods):  # PTQ only
            result = qat_run(model, split, statqat(fmt, granularity, "iterative"), LLMQATSettings(**{**settings.__dict__, "steps": 0}), progress=False)
            rows.append(Row(label, LABELS["iterative"], result.ptq_perplexity, None, note="PTQ only"))
            print(rows[-1], flush=True)
        for name, recipe in peer_recipes(fmt, granularity, peers):
            if isinstance(recipe, str):
                rows.append(Row(label, name, None, None, note=recipe))
                continue
            try:
                result = qat_run(model, split, recipe, settings, desc=f"{label} {name}")
            except Exception as error:  # a peer that fails on this model is a result, not a crash
                rows.append(Row(label, name, None, None, note=f"failed: {type(error).__name__}: {error}"[:200]))
            else:
                rows.append(Row(label, name, result.ptq_perplexity, result.qat_perplexity, result.step_seconds, result.converted_max_abs_diff))
            print(rows[-1], flush=True)
    return {"float": float_ppl, "rows": [r.__dict__ for r in rows], "sentences": sentences}


def markdown(results: dict) -> str:
    float_ppl = results["float"]
    lines = [
        f"Float perplexity: {float_ppl:.2f}.",
        "",
        "| format | method | PTQ ppl | QAT ppl | PTQ-MinMax gap recovered by QAT | QAT / float trained the same way | converted = QAT | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    minmax = {r["fmt"]: r["ptq"] for r in results["rows"] if r["method"] == "MinMax"}
    trained = next((r["qat"] for r in results["rows"] if r["method"] == "float, same training"), None)
    for r in results["rows"]:
        ptq = "-" if r["ptq"] is None else f"{r['ptq']:.2f}"
        qat = "-" if r["qat"] is None else f"{r['qat']:.2f}"
        gap = "-" if r["qat"] is None or r["fmt"] not in minmax else f"{100 * gap_recovered(float_ppl, minmax[r['fmt']], r['qat']):.0f}%"
        diff = r["converted_diff"]
        same = "n/a" if diff is None else ("bit-identical" if diff == 0 else f"max diff {diff:.2g}")
        step = "-" if r["step_s"] is None else f"{r['step_s']:.2f}"
        ratio = "-" if r["qat"] is None or trained is None else f"{r['qat'] / trained:.3f}"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['fmt']} | {r['method']}{note} | {ptq} | {qat} | {gap} | {ratio} | {same} | {step} |")
    if results["sentences"]:
        lines += ["", f'Deployed (torchao-lowered) StatQAT QAT models, greedy continuation of "{PROMPT}":', ""]
        lines += [f"- {fmt}: {text}" for fmt, text in results["sentences"].items()]
    return "\n".join(lines)


SAME_SETTINGS = ("steps", "batch", "lr", "eval_windows", "seed", "layers")


def merged(new: dict, path: str) -> dict:
    """``new`` with the rows of the results file ``path`` that ``new`` did not redo, in its row order."""
    with open(path) as f:
        old = json.load(f)
    differ = [k for k in SAME_SETTINGS if old["settings"].get(k) != new["settings"].get(k)]
    if differ or abs(old["float"] - new["float"]) > 1e-9:
        raise SystemExit(f"--merge {path}: its settings differ ({', '.join(differ) or 'float perplexity'}); rerun instead")
    redone = {(r["fmt"], r["method"]) for r in new["rows"]}
    fresh = {(r["fmt"], r["method"]): r for r in new["rows"]}
    rows = [fresh.pop((r["fmt"], r["method"]), r) for r in old["rows"]]
    for r in fresh.values():  # rows the old file did not have: after the last row of their format
        last = max((i for i, o in enumerate(rows) if o["fmt"] == r["fmt"]), default=len(rows) - 1)
        rows.insert(last + 1, r)
    sentences = {**old.get("sentences", {}), **new["sentences"]}
    runs = old.get("runs", [old["settings"]]) + [new["settings"]]
    return {**new, "rows": rows, "sentences": sentences, "runs": runs, "redone": sorted(map(list, redone)),
            "seconds": old.get("seconds", 0) + new["seconds"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="FP4 E2M1 g32 only, MinMax and StatQAT, 10 steps")
    parser.add_argument("--steps", type=int, default=None, help="QAT steps per row (default 20, 10 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 256 tokens (default 8)")
    parser.add_argument("--formats", nargs="*", choices=list(FORMATS), default=None)
    parser.add_argument("--no-lower", action="store_true", help="skip the torchao lowering and generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (a smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--methods", nargs="*", choices=list(LABELS), default=None, help="run only these StatQAT rows")
    parser.add_argument("--peers", nargs="*", choices=["torchao", "brevitas"], default=None, help="run only these peers")
    parser.add_argument(
        "--merge", default=None, metavar="JSON",
        help="an earlier results file: its rows this run did not redo are kept (same settings required)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.formats = args.formats or ["FP4 E2M1 g32"]
        args.steps = 10 if args.steps is None else args.steps
    args.steps = 20 if args.steps is None else args.steps
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    results = run(args)
    results["settings"] = {**vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    results["seconds"] = time.time() - start
    if args.merge:
        results = merged(results, args.merge)
    print(markdown(results))
    print(f"\ntotal {results['seconds'] / 60:.1f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
