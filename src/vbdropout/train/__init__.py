"""Training: the SGVLB loop, schedules, protocols, resumable runs."""

from .config import ConfigError, TrainConfig, load_config, resolve_config
from .loop import DivergenceError, evaluate, train_epoch
from .replicas import replica_configs, train_replicas
from .rundir import RunLockedError
from .trainer import train

__all__ = [
    "ConfigError",
    "DivergenceError",
    "RunLockedError",
    "TrainConfig",
    "evaluate",
    "load_config",
    "replica_configs",
    "resolve_config",
    "train",
    "train_epoch",
    "train_replicas",
]
