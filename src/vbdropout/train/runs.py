"""A run as a model: the network of a config, and the trained network, dataset and test
scores of a run directory or checkpoint (``vbd eval``, ``vbd compress``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..io import CheckpointError, load_checkpoint
from ..models import build_model
from ..models.methods import Method, method_class
from ..nn.prunable import Threshold, with_thresholds
from .checks import chance_warning
from .config import ConfigError, TrainConfig, check_types
from .loop import evaluate
from .state import RUN_KEYS, checkpoint_file, load_model_state, saved_config

__all__ = [
    "TrainedRun",
    "build_run_model",
    "evaluate_run",
    "load_run",
    "resolve_device",
    "run_method",
    "to_run_device",
]


def resolve_device(name: str) -> torch.device:
    """The torch device that ``--device`` ``name`` (auto, cpu, cuda) stands for here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def to_run_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``, on a CPU with its 4-d tensors (convolution weights) in
    channels-last order.

    oneDNN's convolutions and max-pooling run faster on a CPU in that layout, and every
    later activation follows the weights' layout (a LeNet-5 training step 1.3–1.6× faster
    over the methods, ``benchmarks/bench_layout.py``). The function computed is the
    same up to float rounding; a sampled method's noise, drawn in memory order, differs
    from a contiguous model's draw of the same seed. Networks without 4-d tensors are
    unchanged.
    """
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def run_data(config: TrainConfig) -> Dataset:
    """The data set of a run: its dataset, data folder, training subset and input scaling."""
    return load_dataset(
        config.dataset,
        config.data_dir,
        train_subset=config.train_subset,
        input_scaling=config.input_scaling,
    )


def build_run_model(config: TrainConfig, data: Dataset, method: Method | None = None) -> nn.Module:
    """The network of a (resolved) config, for training or for loading a checkpoint.

    ``method``: the run's :func:`run_method` (made here when not given).
    """
    return build_model(
        config.model,
        run_method(config, data) if method is None else method,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        **config.network,
    )


def run_method(config: TrainConfig, data: Dataset) -> Method:
    """The :class:`~vbdropout.models.methods.Method` of a (resolved) config's run.

    The method gets the run settings it declares in its ``run_options``
    (:meth:`~vbdropout.models.methods.Method.from_run`): the pruning thresholds,
    ``train_clip`` and ``dataset_size`` (the training set's size).
    """
    run = {
        "log_alpha_threshold": config.log_alpha_threshold,
        "unit_threshold": config.unit_threshold,
        "train_clip": config.train_clip,
        "dataset_size": data.train_x.shape[0],
    }
    return method_class(config.method).from_run(run)


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run directory's (or checkpoint's) trained model, in eval mode, with its data set,
    its config and the epochs it trained (``None``: not recorded); unpacks as
    ``model, data, config``."""

    model: nn.Module
    data: Dataset
    config: TrainConfig
    epochs_done: int | None
    run_dir: Path  # the directory of its checkpoint

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.data, self.config))

    def warnings(self, test_error: float | None = None) -> list[str]:
        """Signs that the model is not a finished run's working network: training stopped
        before its last epoch; a ``test_error`` near chance (≥ 1 − 2/classes)."""
        found = []
        if self.epochs_done is not None and self.epochs_done < self.config.epochs:
            found.append(
                f"the run stopped after epoch {self.epochs_done} of {self.config.epochs}: "
                f"this is not its final model (continue it with vbd train --resume --out "
                f"{self.run_dir})"
            )
        if test_error is not None:
            found += chance_warning(test_error, self.data.num_classes)
        return found


def load_run(path: str | os.PathLike[str], data_dir: str | None = None) -> TrainedRun:
    """The trained model of a run directory or checkpoint, with its dataset and config."""
    state = load_checkpoint(path, required=RUN_KEYS)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved_config(state, path).items() if k in fields})
    try:
        check_types(config)
    except ConfigError as err:
        raise CheckpointError(f"{checkpoint_file(path)}: its config is malformed: {err}") from None
    if data_dir is not None:
        config.data_dir = data_dir
    data = run_data(config)
    model = build_run_model(config, data)
    load_model_state(model, state["model"], checkpoint_file(path))
    epochs = state.get("epoch")
    done = epochs if isinstance(epochs, int) else None
    return TrainedRun(model.eval(), data, config, done, checkpoint_file(path).parent)


def evaluate_run(
    path: str | os.PathLike[str],
    mc_samples: int = 0,
    data_dir: str | None = None,
    device: str = "auto",
    *,
    log_alpha_threshold: Threshold = "own",
    unit_threshold: Threshold = "own",
) -> dict[str, Any]:
    """Deterministic (and MC-averaged) test error, NLL and ECE of a trained run.

    The keys are those of every command's JSON (docs/JSON.md): ``test_error``,
    ``test_nll``, ``test_ece`` and, with ``mc_samples``, ``mc_test_error``,
    ``mc_test_nll``, ``mc_test_ece``; the thresholds (``"own"``: the run's) say
    where the weights and units are cut (:mod:`~vbdropout.nn.prunable`).
    """
    run = load_run(path, data_dir)
    model, data, config = run.model, run.data, run.config
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    if any(value != "own" for value in thresholds.values()):
        model = with_thresholds(model, **thresholds)
    target = resolve_device(device)
    result = evaluate(
        to_run_device(model, target),
        data.test_x.to(target),
        data.test_y.to(target),
        mc_samples=mc_samples,
    )
    scores = {
        (f"mc_test_{k[3:]}" if k.startswith("mc_") else f"test_{k}"): v for k, v in result.items()
    }
    return {
        "model": config.model,
        "method": config.method,
        "dataset": config.dataset,
        "epochs": config.epochs,
        "epochs_done": run.epochs_done,
        "mc_samples": mc_samples,
        **thresholds,
        **scores,
        "warnings": run.warnings(scores["test_error"]),
    }
