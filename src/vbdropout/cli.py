"""``vbd``: the command line, a thin shell over the library.

Every command accepts ``--json``: it then prints one JSON object as the last
line of stdout. Bad arguments give a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from .data import DataError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``vbd CMD: error: ...`` (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _method(text: str) -> str:
    """A registered method's name (the registry's check, as an argparse error)."""
    from .models.methods import method_class

    try:
        return method_class(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seeds(text: str) -> int | range:
    """``N`` (a count: seeds 0..N-1) or ``A-B`` (seeds A..B inclusive, 0 <= A <= B)."""
    first, dash, last = text.partition("-")
    if not dash:
        return _positive_int(text)
    try:
        start, stop = int(first), int(last)
    except ValueError:
        start, stop = -1, -1
    if not 0 <= start <= stop:
        raise argparse.ArgumentTypeError(
            f"expected N or a seed range A-B with 0 <= A <= B, got {text!r}"
        )
    return range(start, stop + 1)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import format_demo, plot_demo, run_demo

    results = run_demo(
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        lr=args.lr,
        progress=not args.json,
    )
    if not args.json:
        print(format_demo(results))
    try:
        results["plot"] = str(plot_demo(results, args.plot))
        print(f"picture of the learned dropout rates: {results['plot']}")
    except ImportError:
        results["plot"] = None
        print('no picture: matplotlib is missing (pip install "vbdropout[demo]")', file=sys.stderr)
    results.pop("report")
    results.pop("model_object")
    return results


def _cmd_download(args: argparse.Namespace) -> dict[str, Any]:
    from .data import load_dataset, resolve_data_dir

    data = load_dataset(args.dataset, args.data_dir, download=True)
    folder = resolve_data_dir(args.data_dir) / args.dataset
    if not args.json:
        print(
            f"{args.dataset}: {data.train_x.shape[0]} training and "
            f"{data.test_x.shape[0]} test examples, checked, in {folder}"
        )
    return {"dataset": args.dataset, "folder": str(folder)}


def _cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    from .train import TrainConfig, load_config, train

    fields = _train_fields()
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    saved = Path(args.out) / "config.toml" if args.out else None
    if args.config:
        config = dataclasses.replace(load_config(args.config), **given)
    elif args.resume and saved is not None and saved.is_file():
        config = dataclasses.replace(load_config(saved), **given)  # the run's own config
    else:
        config = TrainConfig(**given)
    network = {k: getattr(args, k) for k in ("width", "scale") if getattr(args, k) is not None}
    config.network.update(network)
    if config.out == TrainConfig.out:
        config.out = f"runs/{config.model}-{config.method}-{config.dataset}-seed{config.seed}"
    summary = train(config, resume=args.resume, progress=not args.json, force=args.force)
    if not summary:  # a torchrun worker other than rank 0: rank 0 reports
        return None
    for warning in summary["warnings"]:
        print(f"vbd train: warning: {warning}", file=sys.stderr)
    if not args.json:
        compression = summary["compression"]
        print(
            f"{config.model}/{config.method} on {config.dataset}: test error "
            f"{100 * summary['test_error']:.2f}%, |W|/|W≠0| = {compression['compression_ratio']}, "
            f"sparsity per layer {compression['sparsity_per_layer']} %, "
            f"run dir {summary['run_dir']}"
        )
    return summary


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .train.runs import evaluate_run

    result = evaluate_run(
        args.run, args.mc_samples, args.data_dir, args.device, **_thresholds(args)
    )
    if not args.json:
        lines = [f"{result['model']}/{result['method']} on {result['dataset']}"]
        lines.append(
            f"  deterministic: error {100 * result['test_error']:.2f}%  "
            f"NLL {result['test_nll']:.4f}  ECE {result['test_ece']:.4f}"
        )
        if args.mc_samples:
            lines.append(
                f"  MC ({args.mc_samples} samples): error {100 * result['mc_test_error']:.2f}%  "
                f"NLL {result['mc_test_nll']:.4f}  ECE {result['mc_test_ece']:.4f}"
            )
        print("\n".join(lines))
    return result


def _numbers(text: str, kind: type = float) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None
    return values


def _shape(text: str) -> tuple[int, ...]:
    shape = _numbers(text, int)
    if any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3,32,32, got {text!r}")
    return shape


def _cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from .compress.custom import load_custom_model
    from .compress.export import export_compressed, format_report
    from .train.runs import load_run

    if args.factory:
        if args.input_shape is None:
            raise ValueError("--factory needs --input-shape (one example's shape, e.g. 3,32,32)")
        model = load_custom_model(args.run, args.factory)
        source = {"checkpoint": str(args.run), "factory": args.factory}
        shape, mean, std = args.input_shape, args.mean, args.std
    else:
        if any(v is not None for v in (args.input_shape, args.mean, args.std)):
            raise ValueError("--input-shape, --mean and --std go with --factory (a run knows them)")
        model, data, config = load_run(args.run, args.data_dir)
        source = {"run": str(args.run), "model": config.model, "method": config.method}
        shape, mean, std = data.input_shape, data.mean, data.std
    report = export_compressed(model, args.out, shape, mean, std, source, **_thresholds(args))
    if not args.json:
        print(format_report(report), end="")
        print(f"files written to {args.out}")
    return report


def _cmd_reproduce(args: argparse.Namespace) -> dict[str, Any]:
    from .experiments import reproduce

    result = reproduce(
        args.table,
        budget=args.budget,
        only=args.only,
        seeds=args.seeds,
        device=args.device,
        out=args.out,
        data_dir=args.data_dir,
        progress=not args.json,
        epochs=args.epochs,
        train_subset=args.train_subset,
    )
    if not args.json:
        print(Path(result["markdown"]).read_text(), end="")
        print(f"written: {result['markdown']}" + "".join(f", {p}" for p in result["plots"]))
    return {k: v for k, v in result.items() if k != "cells"} | {
        "cells": [
            {k: c[k] for k in ("label", "model", "column", "seed", "test_error", "epochs")}
            for c in result["cells"]
        ]
    }


def _train_fields() -> set[str]:
    """The :class:`~vbdropout.train.TrainConfig` fields that ``vbd train`` sets from the flag of
    the same name: all of them but ``network``, which ``--width`` and ``--scale`` fill."""
    from .train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - {"network"}


def _method_list(methods: dict[str, Any]) -> str:
    """One line per method: its name and the first line of its class docstring."""
    return "\n".join(
        f"  {name:<21} {inspect.getdoc(cls).splitlines()[0]}" for name, cls in methods.items()
    )


def _add_train_parser(sub: Any) -> None:
    """Add ``vbd train`` to the subcommands ``sub``."""
    from .data import DATASETS
    from .models import METHODS, MODELS

    train = sub.add_parser(
        "train",
        help="train a network with a method on a dataset (resumable run directory)",
        description=textwrap.fill(
            "Train MODEL with METHOD on DATASET. Unset schedule options take the "
            "model's protocol defaults (vbdropout/train/protocols.py): for lenet300_100, "
            "lenet500_300 and lenet5_caffe 200 epochs, batch 100, lr 1e-3 decaying linearly "
            "from epoch 100, KL warm-up 5 -> 20; for mlp_srivastava 50 epochs (decay from 25, "
            "warm-up 0 -> 10); for kingma_cifar 100 epochs (decay from 50, warm-up 0 -> 10). "
            "A changed --epochs scales the decay start and the warm-up with it.",
            width=78,
        ),
        epilog="methods:\n" + _method_list(METHODS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = train.add_argument_group("model and data")
    data.add_argument("--model", choices=sorted(MODELS), help="network (default lenet300_100)")
    data.add_argument("--dataset", choices=sorted(DATASETS), help="dataset (default mnist)")
    data.add_argument(
        "--width",
        type=_positive_int,
        help="hidden units per layer of mlp_srivastava (default 1060)",
    )
    data.add_argument(
        "--scale", type=_positive_float, help="width multiplier of kingma_cifar (default 1)"
    )
    data.add_argument(
        "--data-dir", help="data folder (default $VBD_DATA_DIR, else ~/.cache/vbdropout)"
    )
    data.add_argument(
        "--train-subset",
        type=_positive_int,
        help="train on the first K training examples (default: all)",
    )
    data.add_argument(
        "--input-scaling",
        choices=["standardize", "unit"],
        help="pixels standardized per channel, or only scaled to [0, 1] (default standardize)",
    )
    method = train.add_argument_group("method (see the list below and docs/METHODS.md)")
    method.add_argument("--method", type=_method, help="method (default vbd)")
    method.add_argument(
        "--log-alpha-threshold",
        "--threshold",
        dest="log_alpha_threshold",
        type=float,
        help="weight-level methods: prune a weight when its log α (natural log) exceeds this "
        "(default 3)",
    )
    method.add_argument(
        "--unit-threshold",
        type=float,
        help="structured VBD: keep a unit while its log α is at most this (default 0)",
    )
    method.add_argument(
        "--train-clip",
        action="store_true",
        default=None,
        help="also drop pruned weights/units while training (default: off)",
    )
    method.add_argument(
        "--init",
        help="initialize from a run directory or checkpoint, e.g. a trained plain net "
        "(default: random initialization)",
    )
    schedule = train.add_argument_group("schedule (defaults: the model's protocol, above)")
    schedule.add_argument(
        "--epochs", type=_positive_int, help="passes over the training set (default 200 or 50/100)"
    )
    schedule.add_argument(
        "--batch-size",
        type=_positive_int,
        help="examples per step, summed over --nproc workers (default 100)",
    )
    schedule.add_argument(
        "--lr", type=_positive_float, help="Adam learning rate, per step (default 1e-3)"
    )
    schedule.add_argument(
        "--lr-decay-start",
        type=int,
        help="epoch (0-based) from which lr decays linearly to 0 at the last epoch "
        "(default half of --epochs)",
    )
    schedule.add_argument(
        "--kl-warmup",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        help="KL weight 0 before epoch START, linear to 1 at epoch END (default 5 20 for "
        "the LeNets, 0 10 otherwise; scaled with --epochs)",
    )
    run = train.add_argument_group("run")
    run.add_argument("--out", help="run directory (default runs/MODEL-METHOD-DATASET-seedS)")
    run.add_argument(
        "--config", help="TOML config, e.g. a run's config.toml; flags override it (default none)"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved config (default: off)",
    )
    run.add_argument("--seed", type=int, help="random seed of weights, noise and order (default 0)")
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to train (default auto: cuda if any)",
    )
    run.add_argument(
        "--nproc",
        type=_positive_int,
        help="data-parallel worker processes (default 1)",
    )
    run.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line (default: off)"
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="train into an --out that holds files but is no run directory (replacing its "
        "checkpoint.pt, config.toml, metrics.*, summary.json; default: off)",
    )
    train.set_defaults(run_command=_cmd_train)


def _add_download_parser(sub: Any) -> None:
    """Add ``vbd download`` to the subcommands ``sub``."""
    from .data import DATASETS

    download = sub.add_parser(
        "download",
        help="download and check a dataset (md5-checked, atomic)",
        description="Download DATASET's files from their canonical URLs into the data folder.",
    )
    download.add_argument("dataset", choices=sorted(DATASETS))
    download.add_argument(
        "--data-dir", help="data folder (default $VBD_DATA_DIR or the user cache)"
    )
    download.add_argument("--json", action="store_true", help="print one JSON object as last line")
    download.set_defaults(run_command=_cmd_download)


def _add_cut_options(parser: argparse.ArgumentParser) -> None:
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


def _thresholds(args: argparse.Namespace) -> dict[str, float | str]:
    """The cuts of ``_add_cut_options`` as keyword arguments ("own" where not given)."""
    return {
        name: "own" if getattr(args, name) is None else getattr(args, name)
        for name in ("log_alpha_threshold", "unit_threshold")
    }


def _add_eval_parser(sub: Any) -> None:
    """Add ``vbd eval`` to the subcommands ``sub``."""
    evaluate = sub.add_parser(
        "eval",
        help="test error, NLL and calibration of a trained run",
        description="Evaluate RUN (a run directory or checkpoint.pt) on its dataset's test split.",
    )
    evaluate.add_argument("run")
    evaluate.add_argument(
        "--mc-samples", type=_count, default=0, help="also average K sampled passes"
    )
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _add_cut_options(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as last line")
    evaluate.set_defaults(run_command=_cmd_eval)


def _add_compress_parser(sub: Any) -> None:
    """Add ``vbd compress`` to the subcommands ``sub``."""
    compress = sub.add_parser(
        "compress",
        help="export a trained run as smaller models (shrunk, sparse, ONNX) with a report",
        description="Remove pruned weights, neurons and channels from RUN (a run directory or "
        "checkpoint.pt) and write shrunk.pt, shrunk.safetensors, sparse.safetensors, "
        "shrunk.onnx (when onnx is installed), report.json and report.md into --out. "
        "For your own model, RUN is its saved state_dict and --factory names the function "
        "that builds the (converted) model.",
    )
    compress.add_argument("run")
    compress.add_argument("--out", required=True, help="output directory")
    compress.add_argument("--data-dir", help="data folder (for the input normalization)")
    compress.add_argument(
        "--factory",
        help="package.module:function returning your model (built as in training, e.g. "
        "with vbdropout.convert); RUN is then its state_dict file",
    )
    compress.add_argument("--input-shape", type=_shape, help="with --factory: e.g. 3,32,32")
    compress.add_argument(
        "--mean", type=_numbers, help="with --factory: input mean per channel (recorded)"
    )
    compress.add_argument(
        "--std", type=_numbers, help="with --factory: input std per channel (recorded)"
    )
    _add_cut_options(compress)
    compress.add_argument("--json", action="store_true", help="print one JSON object as last line")
    compress.set_defaults(run_command=_cmd_compress)


def _add_reproduce_parser(sub: Any) -> None:
    """Add ``vbd reproduce`` to the subcommands ``sub``."""
    repro = sub.add_parser(
        "reproduce",
        help="rerun one of the paper's tables side by side with its published numbers",
        description="Train every cell of TABLE (resumable; finished cells are skipped) and write "
        "results/TABLE.md (TABLE-quick.md for the quick budget) with plots.",
    )
    repro.add_argument("table", choices=["table1", "table2", "table3", "table4", "table5"])
    repro.add_argument(
        "--budget",
        choices=["quick", "paper"],
        default="quick",
        help="quick: all training data, fewer epochs (schedules scaled), one column, about "
        "10 minutes per table on 2 CPU cores; paper: the full protocol (default quick)",
    )
    repro.add_argument(
        "--only", help="regular expression on 'label method model column' (default: all rows)"
    )
    repro.add_argument(
        "--seeds",
        type=_seeds,
        default=1,
        help="N: seeds 0..N-1; A-B: seeds A..B (inclusive), e.g. to split a table across "
        "processes (default 1)",
    )
    repro.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default auto)"
    )
    repro.add_argument("--out", default="results", help="output folder (default results)")
    repro.add_argument(
        "--data-dir", help="data folder (default $VBD_DATA_DIR, else ~/.cache/vbdropout)"
    )
    repro.add_argument(
        "--epochs", type=_positive_int, help="override the budget's epochs (default: the budget's)"
    )
    repro.add_argument(
        "--train-subset",
        type=_positive_int,
        help="override the training size, in examples (default: the budget's)",
    )
    repro.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line (default: off)"
    )
    repro.set_defaults(run_command=_cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    """The ``vbd`` argument parser with every command."""
    from .models import METHODS

    parser = _Parser(
        prog="vbd",
        description="Variational Bayesian Dropout: train, compress, reproduce. "
        "`vbd COMMAND --help` lists a command's options with their defaults.",
        epilog="methods (vbd train --method):\n" + _method_list(METHODS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo_parser,
        _add_train_parser,
        _add_download_parser,
        _add_eval_parser,
        _add_compress_parser,
        _add_reproduce_parser,
    ):
        add(sub)
    return parser


def _add_demo_parser(sub: Any) -> None:
    """Add ``vbd demo`` to the subcommands ``sub``."""
    demo = sub.add_parser(
        "demo",
        help="train, then compress with VBD, on the bundled 8×8 digits (no download, ~10 s)",
        description="Train a LeNet-300-100-shaped MLP without dropout on scikit-learn's "
        "bundled digits, then compress it with VBD from the trained weights (KL warm-up, "
        "the sparse VD protocol); print the test error before and after and the compression, "
        "and draw the learned log α per layer and the first layer's 8×8 input mask.",
    )
    demo.add_argument(
        "--pretrain-epochs",
        type=_positive_int,
        default=60,
        help="epochs of the plain network (default 60)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=60,
        help="epochs of VBD from the trained weights; KL warm-up over the first half (default 60)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of weights, noise and order (default 0)"
    )
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=3e-3,
        help="Adam learning rate of the VBD phase, decaying linearly to 0 over its second "
        "half (default 3e-3, as the plain phase)",
    )
    demo.add_argument(
        "--plot",
        default="vbd-demo.png",
        help="where to write the picture (PNG; default vbd-demo.png in the current folder)",
    )
    demo.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line (default: off)"
    )
    demo.set_defaults(run_command=_cmd_demo)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vbd``; returns the exit status: 0, 1 (error), 2 (bad arguments) or 130
    (interrupted by Ctrl-C or SIGTERM). Every error is one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"vbd {args.command}"
    try:
        with _sigterm_interrupts():
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


if __name__ == "__main__":
    raise SystemExit(main())
