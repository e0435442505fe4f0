"""Variational layers: drop-in replacements for torch layers that learn their dropout rates."""

from .base import VariationalModule, mc_sampling
from .gaussian import (
    LOG_ALPHA_RANGE,
    Conv1dVBD,
    Conv2dVBD,
    Conv3dVBD,
    GaussianWeight,
    LinearVBD,
)

__all__ = [
    "LOG_ALPHA_RANGE",
    "Conv1dVBD",
    "Conv2dVBD",
    "Conv3dVBD",
    "GaussianWeight",
    "LinearVBD",
    "VariationalModule",
    "mc_sampling",
]
