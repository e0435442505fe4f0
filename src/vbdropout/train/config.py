"""The configuration of one training run, its validation and its TOML form."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DATASETS, INPUT_SCALINGS
from ..models import MODELS
from ..models.methods import METHODS, RUN_OPTIONS, method_class
from ..nn.prunable import LOG_ALPHA_THRESHOLD, UNIT_THRESHOLD
from .protocols import PROTOCOLS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "COMPILE_CHOICES",
    "ConfigError",
    "TrainConfig",
    "check_types",
    "load_config",
    "resolve_config",
    "to_toml",
]


COMPILE_CHOICES = ("auto", "on", "off")  # TrainConfig.compile: auto = GPU or replicas


class ConfigError(ValueError):
    """An invalid training configuration."""


@dataclass
class TrainConfig:
    """Everything that determines a run. ``None`` fields take the model's protocol default."""

    model: str = "lenet300_100"
    method: str = "vbd"
    dataset: str = "mnist"
    out: str = "runs/run"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_decay_start: int | None = None
    kl_warmup: tuple[int, int] | None = None
    kl_scale: float = 1.0  # the objective N·E[CE] + kl_scale·β·KL; 1 is the ELBO
    seed: int = 0
    device: str = "auto"
    compile: str = "auto"  # the step's objective compiled: on, off, auto = GPU or replicas
    data_dir: str | None = None
    train_subset: int | None = None
    log_alpha_threshold: float = LOG_ALPHA_THRESHOLD  # weight layers: prune when log α > this
    unit_threshold: float = UNIT_THRESHOLD  # structured VBD: keep a unit while log α <= this
    train_clip: bool = False
    input_scaling: str = "standardize"  # or "unit": pixels in [0, 1] (blank pixels exactly 0)
    init: str | None = None
    nproc: int = 1
    network: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """The config of a saved dict (a checkpoint's or a config.toml's), written by this or
        an earlier version: renamed fields are read under their new names, fields added
        since take their defaults. Unknown keys are a :class:`ConfigError`."""
        data = upgrade_saved(saved)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown config keys {unknown}; known: {sorted(known)}")
        config = cls(**data)
        check_types(config)
        if isinstance(config.kl_warmup, list):
            config.kl_warmup = tuple(config.kl_warmup)
        return config


_RENAMED = {"threshold": "log_alpha_threshold"}  # old name -> new name (0.1.0 runs)


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the config fields renamed since it was written under their new names."""
    return {_RENAMED.get(k, k): v for k, v in saved.items()}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(hint: Any) -> str:
    """A type annotation of :class:`TrainConfig` in words."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args) + " (or left out)"
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    words = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}
    return words.get(hint) or {str: "a string", dict: "a table"}.get(
        typing.get_origin(hint) or hint, str(hint)
    )


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type annotation ``hint`` (TOML values: lists for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(args)
            and all(_has_type(v, a) for v, a in zip(value, args, strict=True))
        )
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    return isinstance(value, hint)


def check_types(config: TrainConfig) -> None:
    """Raise a :class:`ConfigError` naming the first field whose value has the wrong type.

    The one place where every field's type is checked (from its annotation); the
    ranges are checked by :func:`resolve_config`.
    """
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        _check(
            _has_type(value, hints[f.name]),
            f"{f.name} must be {_describe(hints[f.name])}, got {value!r}",
        )
    for key, value in config.network.items():
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"network option {key} must be a number, got {value!r}",
        )


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Validate ``config`` and fill the protocol defaults; returns a new config."""
    check_types(config)
    _check(config.model in MODELS, f"unknown model {config.model!r}; known: {', '.join(MODELS)}")
    try:
        takes = method_class(config.method).run_options
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for f in dataclasses.fields(TrainConfig):  # a run setting the method ignores is refused
        value = getattr(config, f.name)
        if f.name in RUN_OPTIONS and f.name not in takes and value != f.default:
            users = [name for name, cls in METHODS.items() if f.name in cls.run_options]
            raise ConfigError(
                f"method {config.method} does not use {f.name} (got {value!r}); "
                f"it is for {', '.join(users)}"
            )
    _check(
        config.dataset in DATASETS,
        f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}",
    )
    _check(
        config.device in ("auto", "cpu", "cuda"),
        f"device must be auto, cpu or cuda, got {config.device!r}",
    )
    _check(
        config.compile in COMPILE_CHOICES,
        f"compile must be auto, on or off, got {config.compile!r}",
    )
    _check(
        config.input_scaling in INPUT_SCALINGS,
        f"input_scaling must be one of {', '.join(INPUT_SCALINGS)}, got {config.input_scaling!r}",
    )
    protocol = PROTOCOLS[config.model]
    resolved = dataclasses.replace(
        config,
        epochs=protocol.epochs if config.epochs is None else config.epochs,
        batch_size=protocol.batch_size if config.batch_size is None else config.batch_size,
        lr=protocol.lr if config.lr is None else config.lr,
        kl_warmup=tuple(config.kl_warmup or protocol.kl_warmup),
        network=dict(config.network),
        data_dir=os.path.abspath(os.path.expanduser(config.data_dir)) if config.data_dir else None,
    )
    if config.kl_warmup is None and config.epochs is not None:
        # keep the protocol's proportions (rounded up) when the number of epochs changes,
        # starting before the last epoch and ending by the end of the run (β rises at
        # every step: a 1-epoch run's warm-up spans it, its last step at β = 1 − 1/steps)
        start, end = (-(-e * resolved.epochs // protocol.epochs) for e in protocol.kl_warmup)
        resolved.kl_warmup = (min(start, resolved.epochs - 1), min(end, resolved.epochs))
    if config.lr_decay_start is None and protocol.lr_decay_start is not None:
        resolved.lr_decay_start = resolved.epochs * protocol.lr_decay_start // protocol.epochs
    _check(
        _is_int(resolved.epochs) and resolved.epochs > 0,
        f"epochs must be a positive integer, got {resolved.epochs!r}",
    )
    _check(
        _is_int(resolved.batch_size) and resolved.batch_size > 0,
        f"batch_size must be a positive integer, got {resolved.batch_size!r}",
    )
    _check(
        isinstance(resolved.lr, (int, float)) and math.isfinite(resolved.lr) and resolved.lr > 0,
        f"lr must be a positive finite number, got {resolved.lr!r}",
    )
    _check(  # its type was checked by check_types
        math.isfinite(resolved.kl_scale) and resolved.kl_scale > 0,
        f"kl_scale must be a positive finite number, got {resolved.kl_scale!r}",
    )
    start, end = resolved.kl_warmup
    _check(
        _is_int(start) and _is_int(end) and 0 <= start <= end,
        f"kl_warmup must be 0 <= start <= end, got {resolved.kl_warmup}",
    )
    decay = resolved.lr_decay_start
    _check(
        decay is None or (_is_int(decay) and 0 <= decay < resolved.epochs),
        f"lr_decay_start must be in [0, epochs), got {decay!r}",
    )
    _check(_is_int(resolved.seed), f"seed must be an integer, got {resolved.seed!r}")
    _check(
        _is_int(resolved.nproc) and 1 <= resolved.nproc <= resolved.batch_size,
        f"nproc must be an integer in [1, batch_size], got {resolved.nproc!r}",
    )
    _check(
        resolved.train_subset is None
        or (_is_int(resolved.train_subset) and resolved.train_subset > 0),
        f"train_subset must be a positive integer, got {resolved.train_subset!r}",
    )
    return resolved


def to_toml(config: TrainConfig) -> str:
    """The config as TOML (``None`` values are left out: they mean 'default')."""
    lines, tables = [], []
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML config written by :func:`to_toml`; unknown keys are errors."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    try:
        return TrainConfig.from_saved(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
