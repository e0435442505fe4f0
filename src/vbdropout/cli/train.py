"""``vbd train``: its options (grouped, each with its default) and the command."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from .options import count, method_name, positive_float, positive_int

__all__ = ["add_train_parser", "method_list", "train_fields"]


def train_fields() -> set[str]:
    """The :class:`~vbdropout.train.TrainConfig` fields that ``vbd train`` sets from the flag of
    the same name: all of them but ``network``, which ``--width`` and ``--scale`` fill."""
    from ..train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} - {"network"}


def method_list(methods: dict[str, Any]) -> str:
    """One line per method: its name and the first line of its class docstring."""
    return "\n".join(
        f"  {name:<21} {inspect.getdoc(cls).splitlines()[0]}" for name, cls in methods.items()
    )


def _cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    from ..train import TrainConfig, load_config, train
    from ..train.rundir import holds_a_run

    fields = train_fields()
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    saved = Path(args.out) / "config.toml" if args.out else None
    if saved is not None and args.replicas is not None:  # the group's first replica's
        saved = Path(args.out) / f"seed{given.get('seed', _first_seed(Path(args.out)))}"
        saved /= "config.toml"
    if args.config:
        config = dataclasses.replace(load_config(args.config), **given)
    elif args.resume and saved is not None and saved.is_file():
        config = dataclasses.replace(load_config(saved), **given)  # the run's own config
    else:
        config = TrainConfig(**given)
    network = {k: getattr(args, k) for k in ("width", "scale") if getattr(args, k) is not None}
    config.network.update(network)
    if args.replicas is not None:
        return _train_replicas(args, config, set(given))
    if config.out == TrainConfig.out:
        config.out = f"runs/{config.model}-{config.method}-{config.dataset}-seed{config.seed}"
    if args.resume and not holds_a_run(Path(config.out)):
        _starting_anew(config.out)
    summary = train(config, resume=args.resume, progress=not args.json, force=args.force)
    if not summary:  # a torchrun worker other than rank 0: rank 0 reports
        return None
    _report(summary, args.json)
    return summary


def _first_seed(group: Path) -> int:
    """The smallest seed N of the replica run directories ``group/seedN`` that hold a
    config (a group resumed without ``--seed``), else the default seed."""
    from ..train import TrainConfig

    seeds = [
        int(path.parent.name[4:])
        for path in group.glob("seed*/config.toml")
        if path.parent.name[4:].isdigit()
    ]
    return min(seeds, default=TrainConfig.seed)


def _train_replicas(args: argparse.Namespace, config: Any, given: set[str]) -> dict[str, Any]:
    """``vbd train --replicas K``: the K runs, one line (or summary) each; ``given``: the
    settings the command line gives."""
    from ..train import DivergenceError, TrainConfig, replica_configs, train_replicas
    from ..train.rundir import check_replica_folder, holds_a_run

    if config.out == TrainConfig.out:
        last = config.seed + args.replicas - 1
        config.out = (
            f"runs/{config.model}-{config.method}-{config.dataset}-seeds{config.seed}-{last}"
        )
    check_replica_folder(Path(config.out), args.force)
    configs = replica_configs(config, args.replicas)
    if args.resume and not holds_a_run(Path(config.out), replicas=True):
        _starting_anew(config.out)
    elif args.resume:
        _check_replicas_agree([Path(c.out) for c in configs], given)
    try:
        summaries = train_replicas(
            configs, resume=args.resume, progress=not args.json, force=args.force
        )
    except DivergenceError:  # after the others finished: report them, then the error
        written = [Path(c.out) / "summary.json" for c in configs]
        summaries = [json.loads(p.read_text()) for p in written if p.is_file()]
        for summary in summaries:
            if "diverged" not in summary:
                _report(summary, args.json)
        if args.json:
            print(json.dumps({"runs": summaries}, sort_keys=True))
        raise
    for summary in summaries:
        _report(summary, args.json)
    return {"runs": summaries}


def _starting_anew(out: str) -> None:
    """Say that ``--resume`` found nothing to continue (a mistyped ``--out``?): a new run
    starts, as a job that always passes ``--resume`` expects."""
    print(f"vbd train: no run in {out} to resume: starting a new one", file=sys.stderr)


def _check_replicas_agree(outs: list[Path], given: set[str]) -> None:
    """Refuse to resume replicas whose saved settings that a resume may change differ (one
    was resumed alone with another ``--lr``, say) unless the command line sets them: the
    group, resumed with the first replica's, would silently undo the others'."""
    from ..train import load_config
    from ..train.config import ConfigError
    from ..train.state import CHANGEABLE_ON_RESUME

    saved = {
        out.name: load_config(out / "config.toml")
        for out in outs
        if (out / "config.toml").is_file()
    }
    for field in CHANGEABLE_ON_RESUME:
        values = {name: getattr(c, field) for name, c in saved.items()}
        if field not in given and len(set(values.values())) > 1:
            shown = ", ".join(f"{name} {value}" for name, value in values.items())
            flag = "--" + field.replace("_", "-")
            raise ConfigError(
                f"cannot resume the replicas as one group: their {field} differs ({shown}); "
                f"give {flag} to set it for all, or resume each alone (--out OUT/seedN)"
            )


def _report(summary: dict[str, Any], quiet: bool) -> None:
    """A run's warnings (stderr) and, unless ``quiet``, its one-line result."""
    for warning in summary["warnings"]:
        print(f"vbd train: warning: {warning}", file=sys.stderr)
    if not quiet:
        compression = summary["compression"]
        print(
            f"{summary['model']}/{summary['method']} on {summary['dataset']}: test error "
            f"{100 * summary['test_error']:.2f}%, "
            f"|W|/|W≠0| = {compression['compression_ratio']}, sparsity per layer "
            f"{compression['sparsity_per_layer']} %, run dir {summary['run_dir']}"
        )


def add_train_parser(sub: Any) -> None:
    """Add ``vbd train`` to the subcommands ``sub``."""
    from ..data import DATASETS
    from ..models import METHODS, MODELS
    from ..train.config import COMPILE_CHOICES

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
        epilog="methods:\n" + method_list(METHODS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = train.add_argument_group("model and data")
    data.add_argument("--model", choices=sorted(MODELS), help="network (default lenet300_100)")
    data.add_argument("--dataset", choices=sorted(DATASETS), help="dataset (default mnist)")
    data.add_argument(
        "--width",
        type=positive_int,
        help="hidden units per layer of mlp_srivastava (default 1060)",
    )
    data.add_argument(
        "--scale", type=positive_float, help="width multiplier of kingma_cifar (default 1)"
    )
    data.add_argument(
        "--data-dir", help="data folder (default $VBD_DATA_DIR, else ~/.cache/vbdropout)"
    )
    data.add_argument(
        "--train-subset",
        type=positive_int,
        help="train on the first K training examples (default: all)",
    )
    data.add_argument(
        "--input-scaling",
        choices=["standardize", "unit"],
        help="pixels standardized per channel, or only scaled to [0, 1] (default standardize)",
    )
    method = train.add_argument_group("method (see the list below and docs/METHODS.md)")
    method.add_argument("--method", type=method_name, help="method (default vbd)")
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
        "--epochs", type=positive_int, help="passes over the training set (default 200 or 50/100)"
    )
    schedule.add_argument(
        "--batch-size",
        type=positive_int,
        help="examples per step, summed over --nproc workers (default 100)",
    )
    schedule.add_argument(
        "--lr", type=positive_float, help="Adam learning rate, per step (default 1e-3)"
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
    schedule.add_argument(
        "--kl-scale",
        type=positive_float,
        help="multiply the KL term by this: N·E[CE] + S·β·KL (default 1, the ELBO; above 1 "
        "prunes more, below 1 less)",
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
    run.add_argument(
        "--seed", type=count, help="random seed of weights, noise and order (default 0)"
    )
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where to train (default auto: cuda if any)",
    )
    run.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        help="run each step's objective, forward and backward, as a torch.compile graph "
        "(CUDA graphs on a GPU), training eagerly if compilation fails (default auto: on "
        "with --device cuda, and for --replicas)",
    )
    run.add_argument(
        "--replicas",
        type=positive_int,
        metavar="K",
        help="train seeds S..S+K-1 at once as one batched model, each into OUT/seedN, an "
        "ordinary run directory (default: one run); not with --nproc",
    )
    run.add_argument(
        "--nproc",
        type=positive_int,
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
