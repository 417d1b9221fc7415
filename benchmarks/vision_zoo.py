"""The vision zoo through every entry point: which stage works, and how exactly convert matches.

Each torchvision / timm classifier (random init, 10 classes, 64x64 inputs, batch 4) goes
through three entry points with StatQAT's default quantizers (INT4 weights per channel,
INT8 activations):

* ``sq``: ``sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))``;
* ``torch.ao``: torch's ``prepare_qat_fx(model, sq.statqat_qconfig, (x,),
  prepare_custom_config=sq.torch_ao_prepare_custom_config(model))`` (a QConfigMapping), then
  ``sq.torch_ao_finish_prepare`` on the prepared model (the README's recipe;
  ``--plain-torch-ao``: torch's call alone);
* ``pt2e``: ``prepare_qat_pt2e(torch.export.export(model, (x,)).module(), sq.StatQATQuantizer())``,
  then torchao's ``move_exported_model_to_eval``.

Stages: prepare; train (3 SGD steps, outputs and gradients finite); eval (two eval runs
equal); convert (``sq.convert`` against the prepared model in eval: the max abs difference,
0 is bit-identical; and how many of the model's weight matrices the converted model stores
as codes); for ``sq`` also compile (two ``torch.compile(backend=aot_eager)``
training steps finite; ``--compile``). A stage that raises shows the error's type and the
start of its message.

Usage: python benchmarks/vision_zoo.py [--models ...|--wide] [--entries sq torch.ao pt2e] [--compile] [--out zoo.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import statqat_ao as sq
from statqat_ao.models.vision import build_classifier, import_vision

MODELS = [
    "torchvision:resnet18",
    "timm:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:convnext_tiny",
    "torchvision:regnet_y_400mf",
    "timm:efficientnet_b0",
    "torchvision:swin_t",
    "torchvision:vit",
    "timm:ghostnet_100",
]


# --wide: 38 more torchvision / timm classifiers, as a user would try them. "name@img_size=64":
# a timm model built for another input size gets 64 (its position tables are sized by it).
WIDE = [
    *(f"torchvision:{a}" for a in ("resnet50", "densenet121", "vgg11_bn", "squeezenet1_0", "efficientnet_v2_s",
                                   "mnasnet0_5", "resnext50_32x4d", "mobilenet_v3_large", "regnet_x_400mf",
                                   "alexnet", "swin_v2_t")),
    *(f"timm:{a}" for a in ("vit_tiny_patch16_224@img_size=64", "deit_tiny_patch16_224@img_size=64", "convnext_atto",
                            "mobilenetv3_small_050", "resnet50d", "regnetx_002", "mobilevit_xxs", "ghostnet_100",
                            "repvgg_a0", "rexnet_100", "cspdarknet53", "dla34", "lcnet_050", "poolformer_s12",
                            "edgenext_xx_small", "tiny_vit_5m_224", "fastvit_t8", "mobileone_s0",
                            "res2net50_26w_4s", "levit_128s@img_size=64", "hgnetv2_b0",
                            "mixer_s16_224@img_size=64", "resmlp_12_224@img_size=64",
                            "coatnet_nano_rw_224@img_size=64", "maxvit_nano_rw_256@img_size=64", "efficientvit_b0",
                            "seresnext26d_32x4d")),
]  # fmt: skip

PLAIN_TORCH_AO = False  # --plain-torch-ao


def _build(name: str):
    if "@" not in name:
        return build_classifier(name, num_classes=10)
    name, setting = name.split("@")
    key, value = setting.split("=")
    _, timm = import_vision()
    return timm.create_model(name.split(":")[1], pretrained=False, num_classes=10, **{key: int(value)})


def _prepare(entry: str, model, x):
    if entry == "sq":
        return sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    if entry == "torch.ao":
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        if PLAIN_TORCH_AO:
            return prepare_qat_fx(model, sq.statqat_qconfig, (x,))
        qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,), prepare_custom_config=sq.torch_ao_prepare_custom_config(model))
        sq.torch_ao_finish_prepare(qat)
        return qat
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    return prepare_qat_pt2e(torch.export.export(model, (x,)).module(), sq.StatQATQuantizer())


def _eval(entry: str, model) -> None:
    if entry == "pt2e":
        from torchao.quantization.pt2e import move_exported_model_to_eval

        move_exported_model_to_eval(model)
    else:
        model.eval()


def _train(model, x, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(steps):
        out = model(x)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("non-finite output")
        loss = torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % out.shape[1])
        optimizer.zero_grad()
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            raise FloatingPointError(f"non-finite gradients in {len(bad)} parameters ({bad[0]}, ...)")
        optimizer.step()


def run(name: str, entry: str, compile_step: bool) -> dict:
    """One (model, entry point): each stage's outcome."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    row: dict = {"model": name, "entry": entry}
    stage = "prepare"
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build(name).train()
            weight_matrices = sum(n.endswith("weight") and p.dim() >= 2 for n, p in model.named_parameters())
            qat = _prepare(entry, model, x)
        row[stage] = "ok"
        stage = "train"
        _train(qat, x, 3)
        row[stage] = "ok"
        stage = "eval"
        _eval(entry, qat)
        with torch.no_grad():
            reference = qat(x)
            row[stage] = "ok" if torch.equal(qat(x), reference) else "differs between runs"
        stage = "convert"
        converted = sq.convert(qat)
        with torch.no_grad():
            row[stage] = float((converted(x) - reference).abs().max())
        stored = sum(isinstance(m, sq.QuantizedParams) and m.codes is not None for m in converted.modules())
        row["weights"] = f"{stored}/{weight_matrices}"
        if compile_step and entry == "sq":
            stage = "compile"
            qat.train()
            _train(torch.compile(qat, backend="aot_eager"), x, 2)
            row[stage] = "ok"
    except Exception as exc:  # a row of the table: the stage that failed and why
        row[stage] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | entry point | prepare | train | eval | convert (max abs vs eval) | weights stored as codes | compile | s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        convert = r.get("convert", "")
        convert = ("0 (bit-identical)" if convert == 0 else f"{convert:.3g}") if isinstance(convert, float) else convert
        cells = [r.get(k, "") for k in ("prepare", "train", "eval")]
        lines.append(f"| {r['model']} | {r['entry']} | {' | '.join(cells)} | {convert} | {r.get('weights', '')} | {r.get('compile', '')} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--wide", action="store_true", help=f"the {len(WIDE)} models of the wider probe instead")
    parser.add_argument("--entries", nargs="+", default=["sq", "torch.ao", "pt2e"], choices=["sq", "torch.ao", "pt2e"])
    parser.add_argument("--compile", action="store_true", help="also two aot_eager-compiled steps (sq entry point)")
    parser.add_argument("--plain-torch-ao", action="store_true", help="torch.ao: torch's prepare_qat_fx call alone")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    global PLAIN_TORCH_AO
    PLAIN_TORCH_AO = args.plain_torch_ao
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name in WIDE if args.wide else args.models:
        for entry in args.entries:
            rows.append(run(name, entry, args.compile))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
