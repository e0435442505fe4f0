"""``vbd train``: a resumable training run in its own directory.

The run directory holds ``config.toml`` (the fully resolved config),
``checkpoint.pt`` (model, optimizer, scheduler, RNG states, epoch, history;
rewritten atomically after every epoch), ``metrics.jsonl`` and ``metrics.csv``
(one row per epoch) and, at the end, ``summary.json``. A killed run continues
with ``resume=True`` from its last finished epoch and ends with the same
numbers as an uninterrupted run on CPU: every random state is restored.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..compress import compression_report
from ..data import Dataset, load_dataset
from ..models import build_model
from .checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, resolve_config, to_toml
from .loop import DivergenceError, evaluate, train_epoch
from .progress import ProgressBar
from .schedules import kl_weight, lr_factor

__all__ = ["RunLockedError", "build_run_model", "evaluate_run", "load_run", "train"]

# Config fields that may differ when a run is resumed (they do not change its results).
_RESUMABLE = {"out", "device", "data_dir"}


class RunLockedError(RuntimeError):
    """Another live process is training into the same run directory."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def build_run_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The network of a (resolved) config, for training or for loading a checkpoint."""
    return build_model(
        config.model,
        config.method,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        method_options={"threshold": config.threshold, "train_clip": config.train_clip}
        if config.method != "none"
        else None,
        **config.network,
    )


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run; a lock left by a dead process is taken over."""
    lock = out / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise RunLockedError(
                    f"{out} is in use by another training process (pid {pid}); "
                    f"wait for it or choose another --out"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to output directory {out}: {err.strerror or err}"
        ) from None


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())


def _versions() -> dict[str, str]:
    return {
        "vbdropout": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _load_init(model: nn.Module, path: str) -> None:
    """Initialize from a checkpoint or state_dict (e.g. a pretrained deterministic net)."""
    state = load_checkpoint(path)["model"]
    model.load_state_dict(state)


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary written to ``summary.json``."""
    config = resolve_config(config)
    device = resolve_device(config.device)
    out = Path(config.out)
    _prepare_out(out)
    with run_lock(out):
        return _train_locked(config, device, out, resume, progress)


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
        state = load_checkpoint(checkpoint_path)
        saved = {k: v for k, v in state["config"].items() if k not in _RESUMABLE}
        current = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE}
        current["kl_warmup"] = list(current["kl_warmup"])
        saved["kl_warmup"] = list(saved["kl_warmup"])
        if saved != current:
            diff = sorted(k for k in current if current[k] != saved.get(k))
            raise ConfigError(f"cannot resume {out}: the config differs in {diff}")

    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data_dir, train_subset=config.train_subset)
    model = build_run_model(config, data).to(device)
    if config.init and state is None:
        _load_init(model, config.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, config.epochs, config.lr_decay_start)
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["shuffle"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        history, start_epoch, elapsed = state["history"], state["epoch"], state["elapsed"]
    else:
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
                model,
                optimizer,
                train_x,
                train_y,
                batch_size=config.batch_size,
                kl_weight=beta,
                generator=generator,
                on_batch=on_batch,
            )
        except DivergenceError as err:
            bar.close()
            raise DivergenceError(
                f"training diverged in epoch {epoch + 1} ({err}); the last good checkpoint "
                f"({'epoch ' + str(epoch) if epoch else 'none'}) is kept in {out}"
            ) from None
        scheduler.step()
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
        status = (
            f"kl {stats['kl']:.3g} test err {test['error']:.4f} sparsity {report.sparsity:.1f}%"
        )
        rng = {
            "torch": torch.get_rng_state(),
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
            },
        )
        _write_metrics(out, history)
    bar.close(status)

    test = evaluate(model, test_x, test_y)
    report = compression_report(model)
    summary = {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "seed": config.seed,
        "device": str(device),
        "test_error": test["error"],
        "test_nll": test["nll"],
        "compression": report.to_dict(),
        "train_seconds": elapsed,
        "versions": _versions(),
        "config": config.to_dict(),
        "command": " ".join(sys.argv),
        "run_dir": str(out),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def load_run(
    path: str | os.PathLike[str], data_dir: str | None = None
) -> tuple[nn.Module, Dataset, TrainConfig]:
    """The trained model of a run directory or checkpoint, with its dataset and config."""
    state = load_checkpoint(path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    if data_dir is not None:
        config.data_dir = data_dir
    data = load_dataset(config.dataset, config.data_dir, train_subset=config.train_subset)
    model = build_run_model(config, data)
    model.load_state_dict(state["model"])
    return model.eval(), data, config


def evaluate_run(
    path: str | os.PathLike[str],
    mc_samples: int = 0,
    data_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Deterministic (and MC-averaged) test error, NLL and ECE of a trained run."""
    model, data, config = load_run(path, data_dir)
    target = resolve_device(device)
    result = evaluate(
        model.to(target), data.test_x.to(target), data.test_y.to(target), mc_samples=mc_samples
    )
    return {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "mc_samples": mc_samples,
        **result,
    }
