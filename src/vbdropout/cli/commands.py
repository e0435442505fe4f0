"""The ``vbd`` commands other than ``train``: demo, download, eval, compress, reproduce."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..experiments.executors import EXECUTORS
from .options import (
    add_cut_options,
    count,
    finite_numbers,
    positive_float,
    positive_int,
    positive_numbers,
    seeds,
    shape,
    thresholds_of,
)

__all__ = [
    "add_compress_parser",
    "add_demo_parser",
    "add_download_parser",
    "add_eval_parser",
    "add_reproduce_parser",
]


def add_demo_parser(sub: Any) -> None:
    """Add ``vbd demo`` to the subcommands ``sub``."""
    demo = sub.add_parser(
        "demo",
        help="train, then compress with VBD, on the bundled 8×8 digits (no download, ~12 s)",
        description="Train a LeNet-300-100-shaped MLP without dropout on scikit-learn's "
        "bundled digits, then compress it with VBD from the trained weights (KL warm-up, "
        "the sparse VD protocol); print the test error before and after and the compression, "
        "and draw the learned log α per layer and the first layer's 8×8 input mask.",
    )
    demo.add_argument(
        "--pretrain-epochs",
        type=positive_int,
        default=60,
        help="epochs of the plain network (default 60)",
    )
    demo.add_argument(
        "--epochs",
        type=positive_int,
        default=60,
        help="epochs of VBD from the trained weights (default 60)",
    )
    demo.add_argument(
        "--kl-warmup",
        type=positive_int,
        default=None,
        metavar="EPOCHS",
        help="epochs over which the KL weight β rises linearly from 0 to 1 "
        "(default: all of --epochs)",
    )
    demo.add_argument(
        "--seed", type=count, default=0, help="seed of weights, noise and order (default 0)"
    )
    demo.add_argument(
        "--lr",
        type=positive_float,
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


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from ..demo import check_plot_path, format_demo, plot_demo, run_demo

    check_plot_path(Path(args.plot))
    results = run_demo(
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        lr=args.lr,
        kl_warmup=args.kl_warmup,
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


def add_download_parser(sub: Any) -> None:
    """Add ``vbd download`` to the subcommands ``sub``."""
    from ..data import DATASETS

    download = sub.add_parser(
        "download",
        help="download and check a dataset (md5-checked, atomic)",
        description="Download DATASET's files from their canonical URLs into the data folder.",
    )
    download.add_argument("dataset", choices=sorted(DATASETS))
    download.add_argument(
        "--data-dir", help="data folder (default $VBD_DATA_DIR, else ~/.cache/vbdropout)"
    )
    download.add_argument("--json", action="store_true", help="print one JSON object as last line")
    download.set_defaults(run_command=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> dict[str, Any]:
    from ..data import PACKAGED, load_dataset, resolve_data_dir

    data = load_dataset(args.dataset, args.data_dir, download=True)
    packaged = args.dataset in PACKAGED
    folder = None if packaged else resolve_data_dir(args.data_dir) / args.dataset
    if not args.json:
        where = "in scikit-learn (no files)" if packaged else f"in {folder}"
        print(
            f"{args.dataset}: {data.train_x.shape[0]} training and "
            f"{data.test_x.shape[0]} test examples, checked, {where}"
        )
    return {"dataset": args.dataset, "folder": None if folder is None else str(folder)}


def add_eval_parser(sub: Any) -> None:
    """Add ``vbd eval`` to the subcommands ``sub``."""
    evaluate = sub.add_parser(
        "eval",
        help="test error, NLL and calibration of a trained run",
        description="Evaluate RUN (a run directory or checkpoint.pt) on its dataset's test split.",
    )
    evaluate.add_argument("run")
    evaluate.add_argument(
        "--mc-samples",
        type=count,
        default=0,
        metavar="K",
        help="also average K sampled passes (default 0: the deterministic pass only)",
    )
    evaluate.add_argument(
        "--data-dir",
        help="data folder (default: the run's, else $VBD_DATA_DIR, else ~/.cache/vbdropout)",
    )
    evaluate.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where to evaluate (default auto: cuda if any)",
    )
    add_cut_options(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as last line")
    evaluate.set_defaults(run_command=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.runs import evaluate_run

    result = evaluate_run(
        args.run, args.mc_samples, args.data_dir, args.device, **thresholds_of(args)
    )
    for warning in result["warnings"]:
        print(f"vbd eval: warning: {warning}", file=sys.stderr)
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


def add_compress_parser(sub: Any) -> None:
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
    compress.add_argument(
        "--data-dir",
        help="data folder, for the input normalization (default: the run's, else "
        "$VBD_DATA_DIR, else ~/.cache/vbdropout)",
    )
    compress.add_argument(
        "--factory",
        help="package.module:function returning your model (built as in training, e.g. "
        "with vbdropout.convert); RUN is then its state_dict file",
    )
    compress.add_argument("--input-shape", type=shape, help="with --factory: e.g. 3,32,32")
    compress.add_argument(
        "--mean", type=finite_numbers, help="with --factory: input mean per channel (recorded)"
    )
    compress.add_argument(
        "--std", type=positive_numbers, help="with --factory: input std per channel (recorded)"
    )
    add_cut_options(compress)
    compress.add_argument("--json", action="store_true", help="print one JSON object as last line")
    compress.set_defaults(run_command=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> dict[str, Any]:
    from ..compress.custom import load_custom_model
    from ..compress.export import export_compressed, format_report
    from ..train.runs import load_run

    if args.factory:
        if args.input_shape is None:
            raise ValueError("--factory needs --input-shape (one example's shape, e.g. 3,32,32)")
        model = load_custom_model(args.run, args.factory)
        source = {"checkpoint": str(args.run), "factory": args.factory}
        shape, mean, std = args.input_shape, args.mean, args.std
        warnings: list[str] = []
    else:
        if any(v is not None for v in (args.input_shape, args.mean, args.std)):
            raise ValueError("--input-shape, --mean and --std go with --factory (a run knows them)")
        run = load_run(args.run, args.data_dir)
        model, data, config = run.model, run.data, run.config
        source = {
            "run": str(args.run),
            "model": config.model,
            "method": config.method,
            "epochs": config.epochs,
            "epochs_done": run.epochs_done,
        }
        shape, mean, std = data.input_shape, data.mean, data.std
        warnings = run.warnings()
    report = export_compressed(model, args.out, shape, mean, std, source, **thresholds_of(args))
    if report["compression_ratio"] is None:
        warnings.append("every weight is pruned at these cuts: the network's output is constant")
    for warning in warnings:
        print(f"vbd compress: warning: {warning}", file=sys.stderr)
    report = report | {"warnings": warnings}
    if not args.json:
        print(format_report(report), end="")
        print(f"files written to {args.out}")
    return report


def add_reproduce_parser(sub: Any) -> None:
    """Add ``vbd reproduce`` to the subcommands ``sub``."""
    from ..train.config import COMPILE_CHOICES

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
        type=seeds,
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
        "--epochs", type=positive_int, help="override the budget's epochs (default: the budget's)"
    )
    repro.add_argument(
        "--train-subset",
        type=positive_int,
        help="override the training size, in examples (default: the budget's)",
    )
    repro.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: here, one cell after another; processes: cells in worker processes on "
        "this machine, --workers at once; ray: every cell a task on a Ray cluster "
        '(pip install "vbdropout[ray]"; --out on storage the workers share) (default local)',
    )
    repro.add_argument(
        "--workers",
        type=positive_int,
        help="worker processes of --executor processes, the cores shared out among them "
        "(default: one per core)",
    )
    repro.add_argument(
        "--replicas",
        choices=["auto", "on", "off"],
        default="auto",
        help="train the seeds of a row at once as replicas of one batched model where the "
        "method can (local executor only); auto: on a GPU, off on a CPU, where single runs "
        "are faster (default auto)",
    )
    repro.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="run the objective of the cells' training steps as torch.compile graphs "
        "(default auto: on a GPU, and for replicas)",
    )
    repro.add_argument(
        "--address",
        help="the Ray cluster's HOST:PORT for --executor ray (default: $RAY_ADDRESS, else a "
        "local Ray instance on this machine's cores)",
    )
    repro.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line (default: off)"
    )
    repro.set_defaults(run_command=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> dict[str, Any]:
    from ..experiments import reproduce

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
        executor=args.executor,
        address=args.address,
        workers=args.workers,
        replicas=args.replicas,
        compile=args.compile,
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
