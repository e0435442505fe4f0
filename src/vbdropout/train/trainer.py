"""``vbd train``: a resumable training run in its own directory.

The run directory holds ``config.toml`` (the fully resolved config),
``tensorboard/`` (the per-epoch metrics, when tensorboard is installed),
``checkpoint.pt`` (model, optimizer, scheduler, RNG states, epoch, history;
rewritten atomically after every epoch), ``metrics.jsonl`` and ``metrics.csv``
(one row per epoch) and, at the end, ``summary.json``. A killed run continues
with ``resume=True`` from its last finished epoch and ends with the same
numbers as an uninterrupted run on CPU: every random state is restored.

Only one process trains into a directory at a time (``.lock``, see
:func:`~.rundir.run_lock`); the holder removes temp files left by a killed writer. A
diverging run (NaN/inf loss, KL, gradient or parameter) stops before anything
of the failing epoch is saved. See docs/RELIABILITY.md for the measured faults.

A run is built or restored from its checkpoint (``restore_run``, with the checks of
:mod:`.state`), trained epoch by epoch (``run_epoch``: train, then ``end_epoch``: test, log,
checkpoint) and summarized (``run_summary``); its directory's files are :mod:`.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, kernels
from ..compress import compression_report
from ..data import Dataset
from ..io import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from ..models.methods import Method
from ..nn.base import attach_optimizer
from . import distributed, rundir
from .checks import final_epoch_end, run_warnings, warmup_warning
from .compiled import run_objective
from .config import ConfigError, TrainConfig, resolve_config, to_toml
from .loop import BatchObjective, DivergenceError, checks_for, evaluate, make_adam, train_epoch
from .progress import ProgressBar
from .runs import build_run_model, resolve_device, run_data, run_method, to_run_device
from .schedules import kl_weight, lr_factor
from .state import (
    RESUME_KEYS,
    apply_lr_changes,
    check_resumable,
    check_resume_state,
    load_init,
    restore_training_state,
)

__all__ = ["TrainingInterrupted", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, SIGTERM); the message says what is kept and how
    to continue. A :class:`KeyboardInterrupt`, so that it ends a program as one would."""


def _versions() -> dict[str, str]:
    """The versions that produced a run, for its summary."""
    return {
        "vbdropout": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


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
        taken = rundir.claim(Path(config.out), force)
        try:
            distributed.spawn(config.nproc, device, _train_worker, config, resume)
        except BaseException:
            taken.release_if_unused()
            raise
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
    with rundir.claimed(out, force):
        # temp files left by a killed writer; not the marker's: a run starting beside
        # this one writes its marker before it asks for the lock (it is refused then)
        remove_stale_temp_files(out, rundir.RUN_FILES)
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
    """One process of a data-parallel run started by :func:`train`."""
    train(config, resume=resume, progress=False)


@dataclass
class Run:
    """A run in progress: what it trains on and with, and what its checkpoint saves."""

    config: TrainConfig
    device: torch.device
    out: Path
    data: Dataset
    method: Method  # what built the model; runs its training events after every epoch
    model: nn.Module
    trained: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    command: str  # the command that started the run, kept by resumes
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    elapsed: float = 0.0
    undone: str | None = None  # what final_epoch_end undid
    resume_changes: list[dict[str, Any]] = field(default_factory=list)
    # the training and test inputs and labels, on the run's device
    train_x: torch.Tensor = field(init=False)
    train_y: torch.Tensor = field(init=False)
    test_x: torch.Tensor = field(init=False)
    test_y: torch.Tensor = field(init=False)
    objective: BatchObjective = field(init=False)  # of the trained model, compiled or not

    def __post_init__(self) -> None:
        data, device = self.data, self.device
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)
        n = self.train_x.shape[0]
        self.objective = run_objective(self.trained, n, device, self.config.compile, self.method)

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return -(-self.train_x.shape[0] // self.config.batch_size)

    def checkpoint(self, epoch: int, rng_ranks: list[torch.Tensor] | None) -> dict[str, Any]:
        """What ``checkpoint.pt`` holds after ``epoch`` epochs (``rng_ranks``: every
        worker's torch random state in a data-parallel run)."""
        rng = {
            "torch": torch.get_rng_state(),
            "torch_ranks": rng_ranks,
            "shuffle": self.generator.get_state(),
            "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
        }
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "epoch": epoch,
            "elapsed": self.elapsed,
            "history": self.history,
            "config": self.config.to_dict(),
            "command": self.command,
            "resume_changes": self.resume_changes,
            "final_step_undone": self.undone,
        }


def _train_locked(
    config: TrainConfig, device: torch.device, out: Path, resume: bool, progress: bool
) -> dict[str, Any]:
    """Train into ``out`` (held by this process): start or restore, run the epochs, summarize."""
    run = restore_run(config, device, out, resume)
    start_files(run)
    world = distributed.current()
    bar = ProgressBar(
        config.epochs * run.steps,
        f"{config.model}/{config.method}",
        enabled=None if progress else False,
    )
    status = ""
    board = rundir.tensorboard(out) if world.is_main else None
    for epoch in range(run.start_epoch, config.epochs):
        status = run_epoch(run, epoch, bar, board, status)
    bar.close(status)
    if board is not None:
        board.close()
    if not world.is_main:
        distributed.barrier()
        return {}
    summary = write_summary(run, run_summary(run))
    distributed.barrier()
    return summary


def write_summary(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary`` as the run's ``summary.json``; a resume that ran no epoch keeps
    the previous summary's ``step`` (how the run's steps ran). Returns what was written."""
    path = run.out / "summary.json"
    if run.start_epoch >= run.config.epochs and path.is_file():
        summary["step"] = json.loads(path.read_text()).get("step", summary["step"])
    atomic_write_json(path, summary)
    return summary


def restore_run(
    config: TrainConfig,
    device: torch.device,
    out: Path,
    resume: bool,
    data: Dataset | None = None,
    group: bool = False,
) -> Run:
    """The run of ``config``: built afresh and, when ``out`` holds a checkpoint (and
    ``resume``), put back into its saved state, with every check on the checkpoint; writes
    nothing (:func:`start_files` does). ``data``: the config's data set, when loaded.

    ``group``: the run is resumed as a replica of a group (:mod:`.replicas`). The
    replicas of a group draw their noise from torch's one generator, whose state each of
    their checkpoints holds; a replica resumed alone takes a noise stream of its own
    instead (seeded by its seed and epoch), so that replicas continued one by one stay
    independent."""
    path = out / "checkpoint.pt"
    state, changes = None, {}
    if holds_run(out, resume):
        state = load_checkpoint(path, required=RESUME_KEYS)
        check_resume_state(state, path)
        changes = check_resumable(state, config, path)
    run = _build(config, device, out, initialize=state is None, data=data)
    world = distributed.current()
    if state is None:
        return run
    restore_training_state(
        state, path, run.model, run.optimizer, run.scheduler, run.generator, device, world.rank
    )
    if not group and state["history"] and state["history"][-1].get("replicas", 1) > 1:
        torch.manual_seed(replica_stream_seed(config.seed, state["epoch"]))
    run.history, run.start_epoch, run.elapsed = state["history"], state["epoch"], state["elapsed"]
    run.command = state.get("command", run.command)
    run.undone = state.get("final_step_undone")
    run.resume_changes = list(state.get("resume_changes", []))
    if changes:
        apply_lr_changes(run.optimizer, run.scheduler, config, run.start_epoch)
        run.resume_changes.append({"epoch": run.start_epoch, "changed": changes})
    return run


def replica_stream_seed(seed: int, epoch: int) -> int:
    """The seed of the noise a replica of a group draws when resumed alone after ``epoch``
    epochs: 63 bits of a hash of both, unrelated to any run's ``seed``."""
    digest = hashlib.sha256(f"vbdropout replica {seed} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def holds_run(out: Path, resume: bool) -> bool:
    """Whether ``out`` holds a run's checkpoint; refused unless ``resume``."""
    if not (out / "checkpoint.pt").exists():
        return False
    if not resume:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    return True


def start_files(run: Run) -> None:
    """What a run writes before its first epoch: a fresh run its ``config.toml``, a resumed
    one the metrics of its checkpoint's history (a kill may have landed between the
    checkpoint and the metrics)."""
    if not distributed.current().is_main:
        return
    if run.start_epoch == 0:
        atomic_write_bytes(run.out / "config.toml", to_toml(run.config).encode())
    else:
        rundir.write_metrics(run.out, run.history)


def _build(
    config: TrainConfig, device: torch.device, out: Path, initialize: bool, data: Dataset | None
) -> Run:
    """A fresh run of ``config``: data (``data``, else loaded), model (from ``config.init``
    when ``initialize``), optimizer, lr schedule and shuffling generator, seeded by
    ``config.seed``."""
    world = distributed.current()
    torch.manual_seed(config.seed)
    data = run_data(config) if data is None else data
    method = run_method(config, data)
    model = to_run_device(build_run_model(config, data, method), device)
    if config.init and initialize:
        load_init(model, config.init)
    trained = model
    if world.size > 1:
        torch.manual_seed(config.seed + world.rank)  # independent noise in every worker
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = make_adam(model.parameters(), config.lr)
    attach_optimizer(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, config.epochs, config.lr_decay_start)
    )
    return Run(
        config=config,
        device=device,
        out=out,
        data=data,
        method=method,
        model=model,
        trained=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(config.seed),
        command=" ".join(sys.argv),
    )


def run_epoch(run: Run, epoch: int, bar: ProgressBar, board: Any, status: str) -> str:
    """Train epoch ``epoch`` of ``run``; on the main process also test, log (to TensorBoard
    ``board`` when not None) and checkpoint it. Returns the progress bar's new status
    (``status``, the last one, on the other processes)."""
    config, world = run.config, distributed.current()

    def on_batch(step: int, running: dict[str, float]) -> None:
        bar.update(
            epoch * run.steps + step,
            f"ep {epoch + 1} loss {running['loss']:.4f} err {running['error']:.4f} {status}",
        )

    try:
        stats = train_epoch(
            run.trained,
            run.optimizer,
            run.train_x,
            run.train_y,
            batch_size=config.batch_size,
            kl_weight=lambda done: epoch_kl_weight(config, epoch + done),
            generator=run.generator,
            on_batch=on_batch,
            shard=(world.rank, world.size),
            checks=checks_for(run.device, run.optimizer),
            objective=run.objective,
        )
    except DivergenceError as err:
        bar.close()
        raise diverged(run, epoch, err) from None
    return end_epoch(run, epoch, stats, board) or status


def epoch_kl_weight(config: TrainConfig, epoch: float) -> float:
    """The weight of the KL at (fractional) ``epoch``: kl_scale times the warm-up's β."""
    return config.kl_scale * kl_weight(epoch, *config.kl_warmup)


def diverged(run: Run, epoch: int, err: DivergenceError) -> DivergenceError:
    """The error of ``run`` diverging in epoch ``epoch`` (from 0): what and where
    (``err``), and that its last good checkpoint is kept."""
    kept = (
        f"the last good checkpoint (epoch {epoch}) in {run.out} is kept unchanged"
        if epoch
        else f"no checkpoint was written to {run.out}"
    )
    return DivergenceError(f"training diverged in epoch {epoch + 1}, {err}; {kept}")


def end_epoch(run: Run, epoch: int, stats: dict[str, Any], board: Any) -> str:
    """After epoch ``epoch`` of ``run`` trained (``stats``: :func:`train_epoch`'s):
    :func:`record_epoch`, then on the main process :func:`save_epoch`. Returns the
    progress bar's status line ("" on the other processes)."""
    status, rng_ranks = record_epoch(run, epoch, stats, board)
    if distributed.current().is_main:
        save_epoch(run, epoch, rng_ranks)
    return status


def record_epoch(
    run: Run, epoch: int, stats: dict[str, Any], board: Any, replicas: int = 1
) -> tuple[str, list[torch.Tensor] | None]:
    """The method's training events and the lr schedule after epoch ``epoch`` of ``run``;
    on the main process also test and log it (its metrics row in ``run.history``).
    ``replicas``: how many runs trained in the epoch together, ``run`` one of them
    (:mod:`.replicas`; its ``seconds`` are theirs). Returns the progress bar's status line
    ("" on the other processes) and every worker's torch random state (data-parallel)."""
    config, world = run.config, distributed.current()
    lr = run.optimizer.param_groups[0]["lr"]
    if epoch < config.epochs - 1:
        run.method.epoch_end(run.model, epoch, config.epochs)  # the method's training events
    else:
        run.undone = final_epoch_end(
            run.method, run.model, run.train_x, run.train_y, epoch, config, run.data.num_classes
        )
    run.scheduler.step()
    stats.update(distributed.all_mean({k: stats[k] for k in ("loss", "nll", "train_error")}))
    rng_ranks = distributed.all_gather_rng_state()
    if not world.is_main:
        return "", rng_ranks
    test = evaluate(run.model, run.test_x, run.test_y)
    report = compression_report(run.model)
    run.elapsed += stats["seconds"]
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "kl_weight": stats["kl_weight"],  # kl_scale·β of the epoch's last step
        **{k: stats[k] for k in ("loss", "nll", "kl", "train_error", "seconds")},
        "replicas": replicas,
        "test_error": test["error"],
        "test_nll": test["nll"],
        "sparsity": report.sparsity,
        "compression_ratio": report.to_dict()["compression_ratio"],
    }
    run.history.append(row)
    if board is not None:
        rundir.log_scalars(board, row, epoch + 1)
    status = f"kl {stats['kl']:.3g} test err {test['error']:.4f} sparsity {report.sparsity:.1f}%"
    return status, rng_ranks


def save_epoch(run: Run, epoch: int, rng_ranks: list[torch.Tensor] | None) -> None:
    """Checkpoint ``run`` after epoch ``epoch`` (recorded by :func:`record_epoch`) and
    write its metrics (and, after a resume that changed settings, its config)."""
    save_checkpoint(run.out / "checkpoint.pt", run.checkpoint(epoch + 1, rng_ranks))
    if epoch == run.start_epoch and run.resume_changes:  # the changed settings are now the run's
        atomic_write_bytes(run.out / "config.toml", to_toml(run.config).encode())
    rundir.write_metrics(run.out, run.history)


def run_setup(run: Run) -> dict[str, Any]:
    """What a run trained, the part of its summary that does not depend on how it went."""
    config = run.config
    return {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "seed": config.seed,
        "config": config.to_dict(),
        "command": run.command,
        "run_dir": str(run.out),
    }


def run_summary(run: Run) -> dict[str, Any]:
    """What ``summary.json`` holds: the final test scores, compression, warnings and setup."""
    device = run.device
    last = run.history[-1]  # the last epoch's test scores: the model has not changed since
    report = compression_report(run.model)
    return {
        **run_setup(run),
        "device": str(device),
        "cpu_kernels": kernels.status() if device.type == "cpu" else f"unused on {device}",
        "step": run.objective.status,  # how the training step ran: compiled or eager
        "test_error": last["test_error"],
        "test_nll": last["test_nll"],
        "compression": report.to_dict(),
        "train_seconds": run.elapsed,
        "replicas": last.get("replicas", 1),  # trained last as one of this many (1: alone)
        "versions": _versions(),
        "resume_changes": run.resume_changes,
        "final_step_undone": run.undone,
        "warnings": ([run.undone] if run.undone else [])
        + run_warnings(run.history, last["test_error"], run.data.num_classes)
        + warmup_warning(run.config, run.history),
    }
