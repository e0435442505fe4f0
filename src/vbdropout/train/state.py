"""A run's checkpoint: what it must hold, the checks before resuming, and how its states
are put back into a freshly built run (model, optimizer, scheduler, random states).

Checkpoints of earlier versions load: config fields renamed since then take their new
names and fields added since then their defaults (:func:`saved_config`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import CheckpointError, load_checkpoint
from ..nn.gaussian import GaussianWeight
from ..nn.geometry import WEIGHT_LAYERS
from .config import ConfigError, TrainConfig, upgrade_saved
from .schedules import lr_factor

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "RESUME_KEYS",
    "RUN_KEYS",
    "apply_lr_changes",
    "check_resumable",
    "check_resume_state",
    "checkpoint_file",
    "load_init",
    "load_model_state",
    "restore_training_state",
    "saved_config",
]

# Config fields that may differ when a run is resumed (they change where and how it
# computes, not what it trains).
_RESUMABLE = {"out", "device", "compile", "data_dir"}
# Settings a resumed run may change (continue a diverged run with a smaller lr, train
# longer); each change is recorded in the checkpoint's and the summary's "resume_changes".
CHANGEABLE_ON_RESUME = ("lr", "epochs", "lr_decay_start")
# What a checkpoint must hold to be resumed from, or to be evaluated.
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "elapsed", "history", "config")
RUN_KEYS = ("model", "config")


def saved_config(state: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config dict stored in a checkpoint (a :class:`CheckpointError` if it is not one)."""
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a vbdropout checkpoint (its config is not a dict)")
    # fields renamed since the checkpoint was written take their new names; fields added
    # since then take their defaults
    saved = upgrade_saved(state["config"])
    defaults = TrainConfig().to_dict()
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def check_resumable(state: dict[str, Any], config: TrainConfig, path: Path) -> dict[str, list[Any]]:
    """Refuse to resume a checkpoint whose config differs from ``config`` in a result field.

    Returns the changes of :data:`CHANGEABLE_ON_RESUME` settings, as ``{name: [old, new]}``.
    """
    saved = {k: v for k, v in saved_config(state, path).items() if k not in _RESUMABLE}
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
    """Whether ``value`` maps names to tensors."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def check_resume_state(state: dict[str, Any], path: Path) -> None:
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


def restore_training_state(
    state: dict[str, Any],
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
    rank: int = 0,
) -> None:
    """Load the model, optimizer, scheduler and random states of a checked checkpoint into a
    freshly built run (one-line :class:`CheckpointError` if one does not fit). ``rank``: this
    process's rank in a data-parallel run, which takes its own saved torch random state."""
    load_model_state(model, state["model"], path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        try:
            target.load_state_dict(state[name])
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: its {name} state does not fit ({first})") from None
    for group in optimizer.param_groups:  # keep this torch's choice, not the saved one
        group["fused"] = optimizer.defaults["fused"]
    _match_param_layouts(optimizer)
    ranks = state["rng"].get("torch_ranks")
    try:
        torch.set_rng_state(ranks[rank] if ranks else state["rng"]["torch"])
        generator.set_state(state["rng"]["shuffle"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    except (RuntimeError, IndexError, TypeError) as err:
        raise CheckpointError(f"{path}: its rng state does not fit ({err})") from None


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimizer state tensor its parameter's memory layout.

    A checkpoint's Adam moments keep the strides they were saved with, and torch's fused
    CPU Adam pairs parameter, gradient and moments element by element in memory order:
    moments saved in another layout than the parameter's (a run written before
    convolutions trained channels-last, :func:`~.runs.to_run_device`) would be silently
    paired with the wrong weights.
    """
    for param, saved in optimizer.state.items():
        for key, value in saved.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                saved[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def apply_lr_changes(
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


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file that ``path`` (a run directory or a checkpoint) names."""
    return Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)


_VARIANCE_NAMES = ("log_sigma2", "log_alpha_param")  # the variational entries of GaussianWeight


@torch.no_grad()
def load_init(model: nn.Module, path: str) -> None:
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
