"""The ``statqat`` command line.

Example:
    $ statqat formats          # every format: levels, max value, Gaussian c_opt and SNR
    $ statqat demo             # the main job (arrives with the main-job issue)
"""

from __future__ import annotations

import argparse
import sys

from .error_model import c_opt, gaussian_snr_db
from .formats import get_format, known_formats


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


def _demo(_: argparse.Namespace) -> int:
    print(
        "statqat demo: QAT on sklearn's digits with every method arrives with the main-job issue.\n"
        "Until then, try `statqat formats`, or see README.md for the Python API."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="statqat", description="StatQAT: statistically optimal QAT for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("formats", help="list the formats with their Gaussian-optimal clip and SNR").set_defaults(func=_formats)
    sub.add_parser("demo", help="the main job on sklearn's digits").set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
