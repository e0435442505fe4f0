"""``vbd train``: a resumable training run in its own directory.

The run directory holds ``config.toml`` (the fully resolved config),
``tensorboard/`` (the per-epoch metrics, when tensorboard is installed),
``checkpoint.pt`` (model, optimizer, scheduler, RNG states, epoch, history;
rewritten atomically after every epoch), ``metrics.jsonl`` and ``metrics.csv``
(one row per epoch) and, at the end, ``summary.json``. A killed run continues
with ``resume=True`` from its last finished epoch and ends with the same
numbers as an uninterrupted run on CPU: every random state is restored.

Only one process trains into a directory at a time (``.lock``, see
:func:`run_lock`); the holder removes temp files left by a killed writer. A
diverging run (NaN/inf loss, KL, gradient or parameter) stops before anything
of the failing epoch is saved. See docs/RELIABILITY.md for the measured faults.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from .. import __version__, kernels
from ..compress import compression_report
from ..data import Dataset, load_dataset
from ..models import METHODS, build_model
from ..nn.gaussian import GaussianWeight
from ..nn.geometry import WEIGHT_LAYERS
from ..nn.schedule import epoch_end
from . import distributed
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from .config import (
    ConfigError,
    TrainConfig,
    check_types,
    resolve_config,
    to_toml,
    upgrade_saved,
)
from .loop import DivergenceError, evaluate, make_adam, train_epoch
from .progress import ProgressBar
from .schedules import kl_weight, lr_factor

__all__ = ["RunLockedError", "build_run_model", "evaluate_run", "load_run", "train"]

# Config fields that may differ when a run is resumed (they do not change its results).
_RESUMABLE = {"out", "device", "data_dir"}
# Settings a resumed run may change (continue a diverged run with a smaller lr, train
# longer); each change is recorded in the checkpoint's and the summary's "resume_changes".
CHANGEABLE_ON_RESUME = ("lr", "epochs", "lr_decay_start")
# The files of a run directory, all written with atomic_write_bytes.
RUN_FILES = ("checkpoint.pt", "config.toml", "metrics.jsonl", "metrics.csv", "summary.json")
# Written first into every run directory: it marks the directory as one of ours.
RUN_MARKER = ".vbdropout-run"
# What a checkpoint must hold to be resumed from, or to be evaluated.
_RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "elapsed", "history", "config")
_RUN_KEYS = ("model", "config")


class RunLockedError(RuntimeError):
    """Another live process is training into the same run directory."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); the message says what is kept and how
    to continue. A :class:`KeyboardInterrupt`, so that it ends a program as one would."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def build_run_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The network of a (resolved) config, for training or for loading a checkpoint.

    The method gets the run settings it declares in its ``run_options``
    (:data:`~vbdropout.models.methods.RUN_OPTIONS`): the pruning thresholds,
    ``train_clip`` and ``dataset_size`` (the training set's size).
    """
    run_values = {
        "log_alpha_threshold": config.log_alpha_threshold,
        "unit_threshold": config.unit_threshold,
        "train_clip": config.train_clip,
        "dataset_size": data.train_x.shape[0],
    }
    method = METHODS[config.method]
    return build_model(
        config.model,
        config.method,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        method_options={k: run_values[k] for k in method.run_options},
        **config.network,
    )


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run: refuse if another live process holds it.

    The lock is an exclusive ``flock`` on ``out/.lock`` (released by the kernel
    even when the holder is SIGKILLed), and the file names the holder's pid. A
    file naming a live pid whose holder has no flock (a writer without flock
    support) also refuses; a file left by a dead process is taken over.
    """
    lock = out / ".lock"
    while True:
        try:  # O_NOFOLLOW: a planted symlink must not make us truncate its target
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise ConfigError(f"cannot open the run lock {lock}: {_why(err, lock)}") from None
        try:
            held = _try_flock(fd)
            if held and not _same_file(fd, lock):
                os.close(fd)  # its previous holder unlinked it after we opened it: retry
                continue
            pid = _read_pid(fd) if held else _holder_pid(fd)
            if not held or (pid and _alive(pid)):
                raise RunLockedError(
                    f"{out} is in use by another training process (pid {pid or 'unknown'}); "
                    f"wait for it or choose another --out (if no such process is running, "
                    f"delete {lock})"
                )
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _try_flock(fd: int) -> bool:
    """Take an exclusive non-blocking flock on ``fd``; False if someone else holds one."""
    if fcntl is None:  # pragma: no cover - platforms without flock: pid check only
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int:
    """The pid written in the lock file (0 when empty or unreadable)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def _holder_pid(fd: int, patience: float = 1.0) -> int:
    """The pid of a lock's live holder, which writes it just after taking the flock:
    wait up to ``patience`` seconds for it to appear (0 if it never does)."""
    deadline = time.monotonic() + patience
    while not (pid := _read_pid(fd)) and time.monotonic() < deadline:
        time.sleep(0.005)
    return pid


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie — dead, not yet reaped, which happens to
    the workers of a killed multi-process run until init collects them — does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux), or it just exited
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the state follows "(comm)"


def _why(err: OSError, path: Path) -> str:
    """``err``'s reason in words; a symlink (loop) where a file belongs is named as such."""
    if path.is_symlink():
        return "it is a symbolic link (refused: writing through it would change another file)"
    return err.strerror or str(err)


def _prepare_out(out: Path, force: bool = False) -> None:
    """Create (or accept) the run directory ``out``, check that it is writable and mark it.

    Refused: a directory holding files that is not one of our run directories (no
    :data:`RUN_MARKER`, no checkpoint), unless ``force``; and one whose lock or run
    files are symbolic links (we would write or read through them).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass  # a unique name: concurrent runs must not trip over each other's probe
    except OSError as err:
        raise ConfigError(
            f"cannot write to output directory {out}: {err.strerror or err}"
        ) from None
    links = [out / name for name in (".lock", RUN_MARKER, *RUN_FILES) if (out / name).is_symlink()]
    if links:
        raise ConfigError(
            f"{links[0]} is a symbolic link; a run directory's files must be its own "
            f"(remove the link or choose another --out)"
        )
    if (out / RUN_MARKER).is_file() or (out / "checkpoint.pt").is_file():
        return  # ours (a checkpoint: a run of an earlier version, or one to be refused)
    foreign = sorted(p.name for p in out.iterdir() if not _in_the_making(p.name))
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"{out} is not empty ({shown}) and is not a vbd run directory; choose an empty "
            f"or new --out, or pass --force to train into it (its {', '.join(RUN_FILES)} "
            f"and .lock would be replaced)"
        )
    atomic_write_bytes(out / RUN_MARKER, b"vbdropout run directory (written by vbd train)\n")


def _in_the_making(name: str) -> bool:
    """Whether ``name`` is a transient file of a run starting at the same moment in the same
    directory (its write probe, or its marker before the rename): such a directory is ours
    (the run lock then decides which of the two runs)."""
    return name.startswith(".write-test-") or fnmatch.fnmatch(name, f".{RUN_MARKER}.*.tmp")


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer into ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _versions() -> dict[str, str]:
    return {
        "vbdropout": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


_VARIANCE_NAMES = ("log_sigma2", "log_alpha_param")  # the variational entries of GaussianWeight


@torch.no_grad()
def _load_init(model: nn.Module, path: str) -> None:
    """Initialize from a run, a checkpoint or a plain state_dict file.

    When the keys match, the state is loaded as is (a plain net's state_dict
    loads into its VBD twin). Otherwise the weights and biases of the linear
    and convolutional layers are matched in order, which lets a plain network
    initialize a structured one (whose layers sit inside noise blocks). A
    variational state_dict (one with log σ² or log α entries) must fit exactly.
    """
    state = load_checkpoint(path, required=())
    state = state.get("model", state)
    try:
        load_model_state(model, state, path)
        return
    except CheckpointError:
        if not _is_state_dict(state) or any(k.endswith(_VARIANCE_NAMES) for k in state):
            raise  # not weights, or a variational state_dict that does not fit: no guessing
    weights = [(k, v) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]
    layers = [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    shapes = [tuple(v.shape) for _, v in weights]
    wanted = [tuple(m.weight.shape) for m in layers]
    if shapes != wanted:
        raise ConfigError(
            f"--init {path}: its weight layers {shapes} do not match the model's {wanted}"
        )
    for layer, (key, weight) in zip(layers, weights, strict=True):
        layer.weight.copy_(weight)
        bias = state.get(key[: -len("weight")] + "bias")
        if layer.bias is not None and bias is not None:
            layer.bias.copy_(bias)
        if isinstance(layer, GaussianWeight):
            layer.reset_variational_parameters()


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False
) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary written to ``summary.json``.

    ``config.out`` must be new, empty or a run directory; ``force=True`` also
    accepts a directory holding other files (its run files are then replaced).

    With ``config.nproc > 1`` the run is data-parallel over that many local
    processes (see :mod:`vbdropout.train.distributed`); under torchrun the
    process group comes from the environment.

    Denormal floats are flushed to zero (``torch.set_flush_denormal(True)``, left
    on afterwards): weights that a penalty or a pruning mask drives towards zero,
    and Adam's moments of weights that no longer get gradients, otherwise sink into
    the denormal range, where CPU arithmetic is tens of times slower (a 200-epoch
    LeNet-300-100 pruning run went from 2 s to 30 s per epoch by epoch 20). The
    setting is per thread and torch's worker threads copy it when they start, so
    it covers all of them when no parallel torch work ran before (as with
    ``vbd train``); a program that already computed in parallel should call
    ``torch.set_flush_denormal(True)`` at its start.
    """
    config = resolve_config(config)
    device = resolve_device(config.device)
    torch.set_flush_denormal(True)
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ and not distributed.current().size > 1:
        _prepare_out(Path(config.out), force)
        distributed.spawn(config.nproc, device, _train_worker, config, resume)
        return json.loads((Path(config.out) / "summary.json").read_text())
    world = distributed.init_from_env(device)
    if world.size > 1:
        config = dataclasses.replace(config, nproc=world.size)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    out = Path(config.out)
    if not world.is_main:
        distributed.barrier()  # rank 0 holds the lock and has prepared the directory
        return _train_locked(config, device, out, resume, progress=False)
    _prepare_out(out, force)
    with run_lock(out):
        remove_stale_temp_files(out, (RUN_MARKER, *RUN_FILES))  # left by a killed writer
        distributed.barrier()
        try:
            return _train_locked(config, device, out, resume, progress)
        except KeyboardInterrupt as err:
            raise TrainingInterrupted(_interrupted(err, out)) from None


def _interrupted(err: KeyboardInterrupt, out: Path) -> str:
    """What an interrupted run left: its last checkpoint and how to continue from it."""
    how = f" by {err.args[0]}" if err.args else ""
    try:
        epoch = load_checkpoint(out, required=("epoch",))["epoch"]
    except CheckpointError:
        return f"interrupted{how}; no checkpoint was written to {out}"
    return (
        f"interrupted{how}; the last checkpoint (epoch {epoch}) is in {out}: continue with "
        f"vbd train --resume --out {out}"
    )


def _train_worker(config: TrainConfig, resume: bool) -> None:
    train(config, resume=resume, progress=False)


def _saved_config(state: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config dict stored in a checkpoint (a :class:`CheckpointError` if it is not one)."""
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a vbdropout checkpoint (its config is not a dict)")
    # fields renamed since the checkpoint was written take their new names; fields added
    # since then take their defaults
    saved = upgrade_saved(state["config"])
    defaults = TrainConfig().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def _check_resumable(
    state: dict[str, Any], config: TrainConfig, path: Path
) -> dict[str, list[Any]]:
    """Refuse to resume a checkpoint whose config differs from ``config`` in a result field.

    Returns the changes of :data:`CHANGEABLE_ON_RESUME` settings, as ``{name: [old, new]}``.
    """
    saved = {k: v for k, v in _saved_config(state, path).items() if k not in _RESUMABLE}
    current = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}
    current["kl_warmup"] = list(current["kl_warmup"])
    if isinstance(saved.get("kl_warmup"), (list, tuple)):
        saved["kl_warmup"] = list(saved["kl_warmup"])
    diff = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
    fixed = [k for k in diff if k not in CHANGEABLE_ON_RESUME]
    if fixed:
        raise ConfigError(
            f"cannot resume {path.parent}: the config differs in {fixed} (only "
            f"{', '.join(CHANGEABLE_ON_RESUME)} may change on resume)"
        )
    if config.epochs < state["epoch"]:
        raise ConfigError(
            f"cannot resume {path.parent} with epochs={config.epochs}: it has already "
            f"trained {state['epoch']} epochs"
        )
    return {k: [saved.get(k), current[k]] for k in diff}


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _check_resume_state(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose entries do not have the structure that resuming needs
    (before anything in the run directory is written)."""
    rng = state["rng"]
    ranks = rng.get("torch_ranks") if isinstance(rng, dict) else None
    epoch, history = state["epoch"], state["history"]
    problems = {
        "model": _is_state_dict(state["model"]),
        "optimizer": isinstance(state["optimizer"], dict)
        and isinstance(state["optimizer"].get("state"), dict)
        and isinstance(state["optimizer"].get("param_groups"), list),
        "scheduler": isinstance(state["scheduler"], dict),
        "rng": isinstance(rng, dict)
        and all(isinstance(rng.get(k), torch.Tensor) for k in ("torch", "shuffle"))
        and (ranks is None or all(isinstance(r, torch.Tensor) for r in ranks)),
        "epoch": isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0,
        "elapsed": isinstance(state["elapsed"], (int, float)),
        "history": isinstance(history, list)
        and all(isinstance(row, dict) for row in history)
        and (not isinstance(epoch, int) or len(history) == epoch),
        "resume_changes": isinstance(state.get("resume_changes", []), list),
    }
    bad = [name for name, ok in problems.items() if not ok]
    if bad:
        raise CheckpointError(
            f"{path} is not a resumable vbdropout checkpoint: its {bad[0]} entry is malformed"
        )


def load_model_state(model: nn.Module, state: Any, path: str | os.PathLike[str]) -> None:
    """Load the state_dict ``state`` (read from ``path``) into ``model``, or raise a one-line
    :class:`CheckpointError` naming the file and the first tensor that does not fit."""
    if not _is_state_dict(state):
        raise CheckpointError(f"{path}: its model entry is not a state_dict (names → tensors)")
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{path} does not fit this model: {key} has shape {tuple(value.shape)} in the "
                f"file but {tuple(own[key].shape)} in the model (another model, width or method?)"
            )
    result = model.load_state_dict(state, strict=False)
    for kind, keys in (("lacks", result.missing_keys), ("has unknown", result.unexpected_keys)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise CheckpointError(
                f"{path} does not fit this model: it {kind} entry {keys[0]}{more}"
            )


def _load_resume_state(
    state: dict[str, Any],
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load the model, optimizer and scheduler states of a checked checkpoint (one-line
    :class:`CheckpointError` if one does not fit)."""
    load_model_state(model, state["model"], path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        try:
            target.load_state_dict(state[name])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: its {name} state does not fit ({first})") from None


def _train_locked(
    config: TrainConfig, device: torch.device, out: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    checkpoint_path = out / "checkpoint.pt"
    state = None
    if checkpoint_path.exists():
        if not resume:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        state = load_checkpoint(checkpoint_path, required=_RESUME_KEYS)
        _check_resume_state(state, checkpoint_path)
        changes = _check_resumable(state, config, checkpoint_path)

    world = distributed.current()
    torch.manual_seed(config.seed)
    data = load_dataset(
        config.dataset,
        config.data_dir,
        train_subset=config.train_subset,
        input_scaling=config.input_scaling,
    )
    model = build_run_model(config, data).to(device)
    if config.init and state is None:
        _load_init(model, config.init)
    trained = model
    if world.size > 1:
        torch.manual_seed(config.seed + world.rank)  # independent noise in every worker
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = make_adam(model.parameters(), config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, config.epochs, config.lr_decay_start)
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    command = " ".join(sys.argv)  # the command that started the run, kept by resumes
    undone: str | None = None  # what _final_epoch_end undid
    resume_changes: list[dict[str, Any]] = []
    if state is not None:
        _load_resume_state(state, checkpoint_path, model, optimizer, scheduler)
        for group in optimizer.param_groups:  # keep this torch's choice, not the saved one
            group["fused"] = optimizer.defaults["fused"]
        ranks = state["rng"].get("torch_ranks")
        try:
            torch.set_rng_state(ranks[world.rank] if ranks else state["rng"]["torch"])
            generator.set_state(state["rng"]["shuffle"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
        except (RuntimeError, IndexError, TypeError) as err:
            raise CheckpointError(
                f"{checkpoint_path}: its rng state does not fit ({err})"
            ) from None
        history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
        command = state.get("command", command)
        undone = state.get("final_step_undone")
        resume_changes = list(state.get("resume_changes", []))
        if changes:
            _apply_lr_changes(optimizer, scheduler, config, start_epoch)
            resume_changes.append({"epoch": start_epoch, "changed": changes})
        if world.is_main:
            _write_metrics(out, history)  # a kill may have landed between checkpoint and metrics
    elif world.is_main:
        atomic_write_bytes(out / "config.toml", to_toml(config).encode())

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    steps = -(-train_x.shape[0] // config.batch_size)
    bar = ProgressBar(
        config.epochs * steps,
        f"{config.model}/{config.method}",
        enabled=None if progress else False,
    )
    status = ""
    board = _tensorboard(out) if world.is_main else None
    for epoch in range(start_epoch, config.epochs):
        beta = kl_weight(epoch, *config.kl_warmup)
        lr = optimizer.param_groups[0]["lr"]

        def on_batch(
            step: int, running: dict[str, float], epoch: int = epoch, status: str = status
        ) -> None:
            bar.update(
                epoch * steps + step,
                f"ep {epoch + 1} loss {running['loss']:.4f} err {running['error']:.4f} {status}",
            )

        try:
            stats = train_epoch(
                trained,
                optimizer,
                train_x,
                train_y,
                batch_size=config.batch_size,
                kl_weight=beta,
                generator=generator,
                on_batch=on_batch,
                shard=(world.rank, world.size),
            )
        except DivergenceError as err:
            bar.close()
            kept = (
                f"the last good checkpoint (epoch {epoch}) in {out} is kept unchanged"
                if epoch
                else f"no checkpoint was written to {out}"
            )
            raise DivergenceError(
                f"training diverged in epoch {epoch + 1}, {err}; {kept}"
            ) from None
        if epoch < config.epochs - 1:
            epoch_end(model, epoch, config.epochs)  # schedules of methods that have them
        else:
            undone = _final_epoch_end(model, train_x, train_y, epoch, config, data.num_classes)
        scheduler.step()
        stats.update(distributed.all_mean({k: stats[k] for k in ("loss", "nll", "train_error")}))
        rng_ranks = distributed.all_gather_rng_state()
        if not world.is_main:
            continue
        test = evaluate(model, test_x, test_y)
        report = compression_report(model)
        elapsed += stats["seconds"]
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "kl_weight": beta,
            **{k: stats[k] for k in ("loss", "nll", "kl", "train_error", "seconds")},
            "test_error": test["error"],
            "test_nll": test["nll"],
            "sparsity": report.sparsity,
            "compression_ratio": report.to_dict()["compression_ratio"],
        }
        history.append(row)
        if board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, epoch + 1)
            board.flush()
        status = (
            f"kl {stats['kl']:.3g} test err {test['error']:.4f} sparsity {report.sparsity:.1f}%"
        )
        rng = {
            "torch": torch.get_rng_state(),
            "torch_ranks": rng_ranks,
            "shuffle": generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        }
        save_checkpoint(
            out / "checkpoint.pt",
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "epoch": epoch + 1,
                "elapsed": elapsed,
                "history": history,
                "config": config.to_dict(),
                "command": command,
                "resume_changes": resume_changes,
                "final_step_undone": undone,
            },
        )
        if epoch == start_epoch and resume_changes:  # the changed settings are now the run's
            atomic_write_bytes(out / "config.toml", to_toml(config).encode())
        _write_metrics(out, history)
    bar.close(status)
    if board is not None:
        board.close()
    if not world.is_main:
        distributed.barrier()
        return {}

    test = evaluate(model, test_x, test_y)
    report = compression_report(model)
    summary = {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "seed": config.seed,
        "device": str(device),
        "cpu_kernels": kernels.status() if device.type == "cpu" else f"unused on {device}",
        "test_error": test["error"],
        "test_nll": test["nll"],
        "compression": report.to_dict(),
        "train_seconds": elapsed,
        "versions": _versions(),
        "config": config.to_dict(),
        "command": command,
        "resume_changes": resume_changes,
        "final_step_undone": undone,
        "warnings": ([undone] if undone else [])
        + run_warnings(history, test["error"], data.num_classes),
        "run_dir": str(out),
    }
    atomic_write_json(out / "summary.json", summary)
    distributed.barrier()
    return summary


@torch.no_grad()
def _final_epoch_end(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    config: TrainConfig,
    classes: int,
) -> str | None:
    """The last epoch's :func:`epoch_end`, undone if it breaks the network.

    A method's end-of-run step taken before its state has settled can destroy the
    network: soft weight-sharing's quantization after 1 epoch put every weight in
    the zero component (89.9% test error). If the step loses more than half of the
    network's margin over chance on (up to 10000) training examples, the state from
    before it is restored; returns what was done then (``None``: the step was kept).
    """
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    sample = slice(0, min(x.shape[0], 10000))
    before = evaluate(model, x[sample], y[sample])["error"]
    epoch_end(model, epoch, config.epochs)
    after = evaluate(model, x[sample], y[sample])["error"]
    chance = 1 - 1 / classes
    if before >= chance or after - before <= 0.5 * (chance - before):
        return None
    model.load_state_dict(before_state)
    return (
        f"the end-of-run step of --method {config.method} (for sws: quantizing the weights) "
        f"raised the training error from {100 * before:.1f}% to {100 * after:.1f}%, so it was "
        f"undone: the network keeps its weights from before it (train longer for it to apply)"
    )


def _apply_lr_changes(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: TrainConfig,
    epoch: int,
) -> None:
    """Make the restored optimizer and scheduler follow ``config``'s lr schedule from ``epoch``
    (its lambda already reads ``config.epochs`` and ``config.lr_decay_start``)."""
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    lr = config.lr * lr_factor(epoch, config.epochs, config.lr_decay_start)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = config.lr, lr


def run_warnings(history: list[dict[str, Any]], test_error: float, classes: int) -> list[str]:
    """Signs of a broken run that did not diverge: a final training NLL far above its best
    (more than twice it and 0.5 nats above) or above 2·log(classes) (far worse than a
    uniform guess, whose NLL is log(classes)); a test error near chance (≥ 1 − 2/classes)."""
    found = []
    if history:
        best = min(history, key=lambda row: row["nll"])
        last = history[-1]["nll"]
        if last > 2 * best["nll"] and last > best["nll"] + 0.5:
            found.append(
                f"the final training NLL {last:.4g} is far above its best {best['nll']:.4g} "
                f"(epoch {best['epoch']}): training went wrong (learning rate too large?)"
            )
        elif last > 2 * math.log(classes):
            found.append(
                f"the final training NLL {last:.4g} is far above that of a uniform guess "
                f"({math.log(classes):.3g}): training went wrong (learning rate too large?)"
            )
    if test_error >= 1 - 2 / classes:
        found.append(
            f"test error {100 * test_error:.1f}% is near chance ({100 * (1 - 1 / classes):.0f}% "
            f"for {classes} classes): the network is not working"
        )
    return found


def load_run(
    path: str | os.PathLike[str], data_dir: str | None = None
) -> tuple[nn.Module, Dataset, TrainConfig]:
    """The trained model of a run directory or checkpoint, with its dataset and config."""
    state = load_checkpoint(path, required=_RUN_KEYS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in _saved_config(state, path).items() if k in fields})
    try:
        check_types(config)
    except ConfigError as err:
        raise CheckpointError(f"{_checkpoint_file(path)}: its config is malformed: {err}") from None
    if data_dir is not None:
        config.data_dir = data_dir
    data = load_dataset(
        config.dataset,
        config.data_dir,
        train_subset=config.train_subset,
        input_scaling=config.input_scaling,
    )
    model = build_run_model(config, data)
    load_model_state(model, state["model"], _checkpoint_file(path))
    return model.eval(), data, config


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file that ``path`` (a run directory or a checkpoint) names."""
    return Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)


def evaluate_run(
    path: str | os.PathLike[str],
    mc_samples: int = 0,
    data_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Deterministic (and MC-averaged) test error, NLL and ECE of a trained run.

    The keys are those of every command's JSON (docs/JSON.md): ``test_error``,
    ``test_nll``, ``test_ece`` and, with ``mc_samples``, ``mc_test_error``,
    ``mc_test_nll``, ``mc_test_ece``.
    """
    model, data, config = load_run(path, data_dir)
    target = resolve_device(device)
    result = evaluate(
        model.to(target), data.test_x.to(target), data.test_y.to(target), mc_samples=mc_samples
    )
    scores = {
        (f"mc_test_{k[3:]}" if k.startswith("mc_") else f"test_{k}"): v for k, v in result.items()
    }
    return {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "mc_samples": mc_samples,
        **scores,
    }
