"""Layers: variational drop-in replacements for torch layers, noise layers, plain equivalents,
and the pruning baselines' layers (with :func:`epoch_end`, their training-event hook)."""

from .adversarial import AdversarialDropout, AdversarialDropoutNet
from .base import StochasticModule, VariationalModule, attach_optimizer, mc_sampling
from .concrete import ConcreteDropout
from .deterministic import InputSelect, Scale, to_deterministic
from .dns import Conv2dDNS, LinearDNS, NetworkSurgery
from .dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout
from .epoch_hooks import epoch_end
from .fast_dropout import Conv2dFastDropout, LinearFastDropout
from .gaussian import (
    LOG_ALPHA_RANGE,
    Conv1dVBD,
    Conv2dVBD,
    Conv3dVBD,
    GaussianWeight,
    LinearVBD,
)
from .penalized import MaskedWeight, PenalizedWeight
from .pruning import Conv2dPruning, LinearPruning, MagnitudePruning
from .ssl import Conv2dSSL, GroupLasso, LinearSSL
from .structured import StructuredBayesianPruning, StructuredVBD, UnitNoise
from .sws import Conv2dSWS, LinearSWS, MixturePrior, SoftSharedWeight, quantize

__all__ = [
    "LOG_ALPHA_RANGE",
    "AdversarialDropout",
    "AdversarialDropoutNet",
    "BernoulliDropout",
    "ConcreteDropout",
    "Conv1dVBD",
    "Conv2dDNS",
    "Conv2dFastDropout",
    "Conv2dPruning",
    "Conv2dSSL",
    "Conv2dSWS",
    "Conv2dVBD",
    "Conv3dVBD",
    "GaussianDropout",
    "GaussianWeight",
    "GroupLasso",
    "InputSelect",
    "LinearDNS",
    "LinearFastDropout",
    "LinearPruning",
    "LinearSSL",
    "LinearSWS",
    "LinearVBD",
    "MagnitudePruning",
    "MaskedWeight",
    "MixturePrior",
    "NetworkSurgery",
    "PenalizedWeight",
    "Scale",
    "SoftSharedWeight",
    "StochasticModule",
    "StructuredBayesianPruning",
    "StructuredVBD",
    "UnitNoise",
    "VariationalGaussianDropout",
    "VariationalModule",
    "attach_optimizer",
    "epoch_end",
    "mc_sampling",
    "quantize",
    "to_deterministic",
]
