"""Layers: variational drop-in replacements for torch layers, noise layers, plain equivalents."""

from .adversarial import AdversarialDropout, AdversarialDropoutNet
from .base import StochasticModule, VariationalModule, mc_sampling
from .concrete import ConcreteDropout
from .deterministic import InputSelect, Scale, to_deterministic
from .dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout
from .fast_dropout import Conv2dFastDropout, LinearFastDropout
from .gaussian import (
    LOG_ALPHA_RANGE,
    Conv1dVBD,
    Conv2dVBD,
    Conv3dVBD,
    GaussianWeight,
    LinearVBD,
)
from .structured import StructuredBayesianPruning, StructuredVBD, UnitNoise

__all__ = [
    "LOG_ALPHA_RANGE",
    "AdversarialDropout",
    "AdversarialDropoutNet",
    "BernoulliDropout",
    "ConcreteDropout",
    "Conv1dVBD",
    "Conv2dFastDropout",
    "Conv2dVBD",
    "Conv3dVBD",
    "GaussianDropout",
    "GaussianWeight",
    "InputSelect",
    "LinearFastDropout",
    "LinearVBD",
    "Scale",
    "StochasticModule",
    "StructuredBayesianPruning",
    "StructuredVBD",
    "UnitNoise",
    "VariationalGaussianDropout",
    "VariationalModule",
    "mc_sampling",
    "to_deterministic",
]
