"""``vbd``: the command line, a thin shell over the library.

Every command accepts ``--json``: it then prints one JSON object as the last
line of stdout. Bad arguments give a one-line error and exit status 2. One
module per part: :mod:`.options` (argument types), :mod:`.train` (``vbd train``),
:mod:`.commands` (the others); this one builds the parser and runs a command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..data import DataError
from .commands import (
    add_compress_parser,
    add_demo_parser,
    add_download_parser,
    add_eval_parser,
    add_reproduce_parser,
)
from .options import Parser
from .train import add_train_parser, method_list

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vbd`` argument parser with every command."""
    from ..models import METHODS

    parser = Parser(
        prog="vbd",
        description="Variational Bayesian Dropout: train, compress, reproduce. "
        "`vbd COMMAND --help` lists a command's options with their defaults.",
        epilog="methods (vbd train --method):\n" + method_list(METHODS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_demo_parser,
        add_train_parser,
        add_download_parser,
        add_eval_parser,
        add_compress_parser,
        add_reproduce_parser,
    ):
        add(sub)
    return parser


# What the commands raise for bad input, bad files and failed runs: one line each.
_EXPECTED_ERRORS = (ValueError, OSError, ImportError, RuntimeError, ArithmeticError, DataError)


DEBUG_ENV = "VBD_DEBUG"  # set to 1 for the traceback of an unexpected error


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM interrupts like Ctrl-C (so that locks are released)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _our_warnings_in_one_line(name: str) -> Iterator[None]:
    """Within the block, a warning raised by vbdropout's own code is formatted as one line,
    ``NAME: warning: MESSAGE`` (others keep Python's format; recording warnings, as tests
    do, is not affected)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    original = warnings.formatwarning

    def one_line(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        line: str | None = None,
    ) -> str:
        if not os.path.abspath(filename).startswith(package + os.sep):
            return original(message, category, filename, lineno, line)
        return f"{name}: warning: {_one_line(message)}\n"

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vbd``; returns the exit status: 0, 1 (error), 2 (bad arguments) or 130
    (interrupted by Ctrl-C or SIGTERM). Every error is one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"vbd {args.command}"
    try:
        with _sigterm_interrupts(), _our_warnings_in_one_line(name):
            result = args.run_command(args)
    except KeyboardInterrupt as err:
        print(f"{name}: {err if str(err) else 'interrupted'}", file=sys.stderr)
        return 130
    except _EXPECTED_ERRORS as err:
        print(f"{name}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"{name}: error: unexpected {type(err).__name__}: {_one_line(err)} "
            f"(set {DEBUG_ENV}=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    if args.json and result is not None:
        print(json.dumps(result, sort_keys=True))
    return 0


def _one_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
