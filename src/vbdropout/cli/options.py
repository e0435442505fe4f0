"""Argument types and shared options of the ``vbd`` commands (one-line argparse errors)."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

__all__ = [
    "Parser",
    "add_cut_options",
    "count",
    "method_name",
    "numbers",
    "positive_float",
    "positive_int",
    "seeds",
    "shape",
    "thresholds_of",
]


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``vbd CMD: error: ...`` (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def method_name(text: str) -> str:
    """A registered method's name (the registry's check, as an argparse error)."""
    from ..models.methods import method_class

    try:
        return method_class(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def seeds(text: str) -> int | range:
    """``N`` (a count: seeds 0..N-1) or ``A-B`` (seeds A..B inclusive, 0 <= A <= B)."""
    first, dash, last = text.partition("-")
    if not dash:
        return positive_int(text)
    try:
        start, stop = int(first), int(last)
    except ValueError:
        start, stop = -1, -1
    if not 0 <= start <= stop:
        raise argparse.ArgumentTypeError(
            f"expected N or a seed range A-B with 0 <= A <= B, got {text!r}"
        )
    return range(start, stop + 1)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def numbers(text: str, kind: type = float) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None
    return values


def finite_numbers(text: str) -> tuple[float, ...]:
    """Comma-separated finite floats (an input mean per channel)."""
    values = numbers(text)
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def positive_numbers(text: str) -> tuple[float, ...]:
    """Comma-separated positive finite floats (an input std per channel)."""
    values = finite_numbers(text)
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def shape(text: str) -> tuple[int, ...]:
    shape = numbers(text, int)
    if any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3,32,32, got {text!r}")
    return shape


def add_cut_options(parser: argparse.ArgumentParser) -> None:
    """``--log-alpha-threshold``/``--unit-threshold`` of a command that reads a trained run."""
    parser.add_argument(
        "--log-alpha-threshold",
        "--threshold",
        dest="log_alpha_threshold",
        type=float,
        help="cut the weights at this log α instead of the run's own (its trained cut)",
    )
    parser.add_argument(
        "--unit-threshold",
        type=float,
        help="structured VBD: cut the units at this log α instead of the run's own",
    )


def thresholds_of(args: argparse.Namespace) -> dict[str, float | str]:
    """The cuts of ``add_cut_options`` as keyword arguments ("own" where not given)."""
    return {
        name: "own" if getattr(args, name) is None else getattr(args, name)
        for name in ("log_alpha_threshold", "unit_threshold")
    }
