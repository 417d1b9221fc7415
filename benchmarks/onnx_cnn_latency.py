"""onnxruntime batch-1 latency of W8A8 CNNs against their fp32 export, and which kernels run.

Models: DigitsCNN (8x8 digits) and torchvision's resnet18 and mobilenet_v2 (10 classes,
sklearn's digits upsampled to ``--size`` pixels, RGB), each QAT-trained ``--steps`` SGD
steps with ``sq.get_statqat_qconfig("int8", "int8")`` (INT8 weights per channel, INT8
activations per tensor, int32 biases; ``--activations uint8``: asymmetric UINT8
activations), converted and exported with ``statqat_ao.backends.onnx.export`` (parity
checked layer by layer on 64 test images). The baseline is ``torch.onnx.export`` of the same architecture in fp32 (batch norm included).

For each file: the ops onnxruntime runs after its graph optimizations (``kernel_ops``) (how many convs are
``QLinearConv`` or, for a 1x1 conv no quantizer reads, ``MatMulInteger``; how many stay float), the file size, the test accuracy of the converted
model, and the median of ``--runs`` batch-1 calls (interleaved, after warm-up) in a
default onnxruntime session with ``--threads`` intra-op threads.

Usage: python benchmarks/onnx_cnn_latency.py [--models digits resnet18 mobilenet_v2] [--steps 100]
       [--size 32] [--runs 200] [--threads 1] [--activations int8|uint8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnxruntime as ort
import torch
from statqat_ao.backends import onnx as onnx_backend

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, load_digits_split
from statqat_ao.models.vision import build_classifier, digits_images

MODELS = {"digits": None, "resnet18": "torchvision:resnet18", "mobilenet_v2": "torchvision:mobilenet_v2"}
ACTIVATIONS = {  # INT8 weights per channel either way
    "int8": sq.get_statqat_qconfig("int8", "int8"),
    "uint8": sq.get_statqat_qconfig("int8", "uint8", activation_symmetric=False),
}


def trained(name: str, steps: int, size: int, activations: str = "int8"):
    """``(float model, converted W8A8 model, test images, test labels)``."""
    data = load_digits_split() if name == "digits" else digits_images(size)
    x, y, x_test, y_test = data
    torch.manual_seed(0)
    model = DigitsCNN() if name == "digits" else build_classifier(MODELS[name], num_classes=10)
    qat = sq.prepare_qat_fx(model.train(), ACTIVATIONS[activations], (x[:64],))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps):
        j = (i * 64) % (len(x) - 64)
        loss = torch.nn.functional.cross_entropy(qat(x[j : j + 64]), y[j : j + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sq.convert(qat), x_test, y_test


def _kib(path: Path) -> float:
    """The file and its external data (torch.onnx.export writes fp32 weights beside it)."""
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1024


def latencies(paths: list[Path], x: torch.Tensor, runs: int, threads: int) -> list[float]:
    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(20):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--activations", default="int8", choices=list(ACTIVATIONS),
                        help="int8: symmetric INT8 activations; uint8: asymmetric UINT8")  # fmt: skip
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model, converted, x_test, y_test = trained(name, args.steps, args.size, args.activations)
            with torch.no_grad():
                accuracy = float((converted(x_test).argmax(1) == y_test).float().mean())
            fp32, w8a8 = Path(folder) / f"{name}_fp32.onnx", Path(folder) / f"{name}_w8a8.onnx"
            torch.onnx.export(model, (x_test[:1],), str(fp32), dynamo=True, verbose=False)
            with warnings.catch_warnings(record=True):
                report = onnx_backend.export(converted, (x_test[:64],), w8a8)
            ops = [Counter(onnx_backend.kernel_ops(p)) for p in (fp32, w8a8)]
            times = latencies([fp32, w8a8], x_test[:1], args.runs, args.threads)
            flipped = sum(layer.differing for layer in report.layers)
            total = sum(layer.codes for layer in report.layers)
            for kind, path, op, t in zip(("fp32", "W8A8"), (fp32, w8a8), ops, times, strict=True):
                integer = f"{op['QLinearConv']}" + (f" + {op['MatMulInteger']} MatMulInteger" if op["MatMulInteger"] else "")
                rows.append(
                    f"| {name} | {kind} | {_kib(path):.0f} | {integer} / {op['Conv'] + op['FusedConv']} | "
                    f"{1e3 * t:.3f} | {t / times[0]:.2f}x | "
                    + (f"acc {accuracy:.3f}; end to end {report.max_error:.3g}; {flipped} of {total} codes at ties |"
                       if kind == "W8A8" else " |")  # fmt: skip
                )
            print(rows[-2], rows[-1], sep="\n", flush=True)
    print("| model | file | KiB | integer / float convs | batch-1 ms | vs fp32 | W8A8 parity (64 test images) |")
    print("|---|---|---:|---|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
