"""The ``statqat`` command line.

Example:
    $ statqat formats          # every format: levels, max value, Gaussian c_opt and SNR
    $ statqat demo --quick     # the main job: StatQAT vs its peers on sklearn's digits
    $ statqat export statqat_ao.tools.examples:digits_cnn_w8a8 --to onnx --out digits.onnx
"""

from __future__ import annotations

import argparse
import sys

from statqat_ao.numerics.error_model import c_opt, gaussian_snr_db
from statqat_ao.numerics.formats import get_format, known_formats


def _formats(_: argparse.Namespace) -> int:
    print(f"{'format':<13} {'bits':>4} {'levels':>6} {'max':>8} {'block':>6} {'scale':>9} {'c_opt':>7} {'SNR dB':>7}")
    for name in known_formats():
        f = get_format(name)
        c = c_opt(f)
        print(
            f"{name:<13} {f.bits:>4} {f.levels:>6} {f.max_value:>8g} {f.block_size or '-':>6} "
            f"{f.scale_format or '-':>9} {c:>7.3f} {gaussian_snr_db(f, c):>7.2f}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    return _DEMOS[args.which](args)


def _demo_llm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from statqat_ao.models import ModelNotInstalledError

    from .llm_demo import LLMDemoSettings, format_table, run_llm_demo

    granularity = None if args.granularity is None else (args.granularity if args.granularity == "channel" else int(args.granularity))
    settings = LLMDemoSettings.for_run(args.quick, fmt=args.format, granularity=granularity, steps=args.steps, num_layers=args.layers)
    print(
        f"statqat demo: SmolLM2-135M weight-only {settings.fmt} QAT, MinMax against StatQAT, "
        f"{settings.steps} steps of batch {settings.batch} x {settings.window} tokens on pydoc text"
    )
    out = Path(args.out)
    try:
        results = run_llm_demo(out, settings, progress=not args.no_progress)
    except ModelNotInstalledError as err:
        print(f"statqat demo: {err}\n(or run the digits demo: statqat demo digits)", file=sys.stderr)
        return 2
    print("\n" + format_table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'training_curves.png'}, {out / 'layer_snr.png'}, {out / 'run_info.json'}")
    return 0


def _demo_digits(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import DemoSettings, format_table, run_demo

    settings = DemoSettings.for_run(args.quick, args.seeds)
    print(
        f"statqat demo digits: DigitsCNN on sklearn's digits, float then W4A4 QAT (int4, fp4_e2m1) with "
        f"minmax, lsq, octav, analytic, iterative; {settings.seeds} seed(s)"
    )
    out = Path(args.out)
    results = run_demo(out, settings, progress=not args.no_progress, export=not args.no_export)
    print("\n" + format_table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'training_curves.png'}, {out / 'layer_snr.png'}, {out / 'run_info.json'}")
    return 0


_DEMOS = {"llm": _demo_llm, "digits": _demo_digits}


def _export(args: argparse.Namespace) -> int:
    import torch

    from statqat_ao.backends.parity import ParityError, UnsupportedModelError

    from .saved_model import load_model

    model, inputs = load_model(args.model)
    if any(type(m).__name__.endswith("FakeQuantize") or type(m).__name__ == "FakeQuantizer" for m in model.modules()):
        from statqat_ao.passes import convert

        print("the model is QAT-prepared: converting it first (statqat_ao.convert)")
        model = convert(model)
    options = {} if args.tolerance is None else {"tolerance": args.tolerance}
    try:
        if args.to == "torchao":
            from statqat_ao.backends.torchao import lower, weight_bytes

            lowered = lower(model, inputs, **options)
            torch.save(lowered, args.out)
            before, after = weight_bytes(lowered)
            print(
                f"torchao: wrote {args.out}; Linear weights {before / 1024:.1f} KiB -> {after / 1024:.1f} KiB "
                f"({after / max(before, 1):.3f}x): "
                + ", ".join(f"{w.path} {w.tensor_type}" for w in lowered.lowered_weights)
            )
        elif args.to == "onnx":
            from statqat_ao.backends.onnx import export

            print(export(model, inputs, args.out, fp4_form=args.fp4_form, **options))
        else:
            from statqat_ao.backends.executorch import export

            activations = None if args.activations == "static" else args.activations
            print(export(model, inputs, args.out, activations=activations, **options))
    except (UnsupportedModelError, ParityError) as err:
        print(f"statqat export: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statqat", description="StatQAT: statistically optimal QAT for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("formats", help="list the formats with their Gaussian-optimal clip and SNR").set_defaults(func=_formats)
    demo = sub.add_parser(
        "demo",
        help="llm (default): SmolLM2-135M weight-only FP4 QAT, MinMax vs StatQAT, then torchao lowering; "
        "digits: W4A4 QAT on sklearn's digits against LSQ and OCTAV, then export",
    )
    demo.add_argument("which", nargs="?", default="llm", choices=list(_DEMOS), help="which demo (default llm)")
    demo.add_argument("--quick", action="store_true", help="llm: 4 steps, 2 held-out windows; digits: 1 seed, fewer epochs")
    demo.add_argument("--format", default=None, help="llm: weight format (default nvfp4)")
    demo.add_argument("--granularity", default=None, help="llm: 'channel' or a group size (default 16)")
    demo.add_argument("--steps", type=int, default=None, help="llm: QAT steps per method (default 15)")
    demo.add_argument("--layers", type=int, default=None, help="llm: keep only the first N decoder layers")
    demo.add_argument("--seeds", type=int, default=None, help="digits: number of seeds (default 3, 1 with --quick)")
    demo.add_argument("--out", default="demo_out", help="folder for results.json and the figures (default demo_out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--no-export", action="store_true", help="digits: skip exporting the best model")
    demo.set_defaults(func=_demo)
    from .analyze import add_analyze_parser

    add_analyze_parser(sub)
    export = sub.add_parser(
        "export",
        help="lower a converted model to torchao tensors, ONNX or ExecuTorch, checked against it",
        description="MODEL is a file from statqat_ao.tools.saved_model.save_converted, or package.module:function "
        "returning (converted_model, example_inputs), e.g. statqat_ao.tools.examples:digits_cnn_w8a8.",
    )
    export.add_argument("model", metavar="MODEL")
    export.add_argument("--to", required=True, choices=["torchao", "onnx", "executorch"])
    export.add_argument("--out", required=True, help="file to write (.pt, .onnx or .pte)")
    export.add_argument("--fp4-form", default="ort", choices=["ort", "standard"], help="ONNX: how E2M1 weights are stored")
    export.add_argument(
        "--activations", default="static", choices=["static", "dynamic_int8"], help="ExecuTorch: dynamic_int8 for 8da4w"
    )
    export.add_argument("--tolerance", type=float, default=None, help="parity tolerance (relative to the output's peak)")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
