"""``vbd``: the command line, a thin shell over the library.

Every command accepts ``--json``: it then prints one JSON object as the last
line of stdout. Bad arguments give a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import format_demo, run_demo

    results = run_demo(epochs=args.epochs, seed=args.seed, lr=args.lr, progress=not args.json)
    if not args.json:
        print(format_demo(results))
    results.pop("report")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vbd", description="Variational Bayesian Dropout: train, compress, reproduce."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="VBD vs no dropout on the bundled 8×8 digits (no download, < 1 minute)",
        description="Train a LeNet-300-100-shaped MLP with VBD and without dropout on "
        "scikit-learn's bundled digits; print test errors, sparsity and compression.",
    )
    demo.add_argument("--epochs", type=_positive_int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lr", type=_positive_float, default=3e-3)
    demo.add_argument("--json", action="store_true", help="print one JSON object as last line")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"vbd {args.command}: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
