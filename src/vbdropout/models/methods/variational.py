"""The Gaussian-weight and unit-noise methods: VBD (this paper), sparse VD, SBP.

``vbd`` and ``sparse_vd`` put a Gaussian posterior on every weight and differ
only in the prior (hierarchical vs log-uniform, Molchanov et al. 2017); the
structured ``vbd_structured``, ``sparse_vd_structured`` and ``sbp`` (Neklyudov
et al. 2017) put one noise variable on each unit, where SBP places it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ...nn.gaussian import Conv1dVBD, Conv2dVBD, Conv3dVBD, LinearVBD
from ...nn.geometry import layer_like
from ...nn.prunable import LOG_ALPHA_THRESHOLD, UNIT_THRESHOLD
from ...nn.structured import StructuredBayesianPruning, StructuredVBD
from .base import Method, Position, register

__all__ = [
    "SBP",
    "VBD",
    "GaussianWeightMethod",
    "SparseVD",
    "StructuredSparseVD",
    "StructuredVBDMethod",
    "UnitNoiseMethod",
]

# The Gaussian-weight layer of each plain torch layer (GaussianWeightMethod.twin).
_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: LinearVBD,
    nn.Conv1d: Conv1dVBD,
    nn.Conv2d: Conv2dVBD,
    nn.Conv3d: Conv3dVBD,
}


class GaussianWeightMethod(Method):
    """A Gaussian posterior on every weight; the prior is what defines the method.

    ``log_alpha_threshold``: a weight is pruned when its log α exceeds it (3, the
    sparse VD cut); ``train_clip``: pruned weights are dropped in training too.
    """

    prior: ClassVar[str]
    run_options = ("log_alpha_threshold", "train_clip")

    def __init__(
        self, log_alpha_threshold: float | None = LOG_ALPHA_THRESHOLD, train_clip: bool = False
    ) -> None:
        self.options = {
            "prior": self.prior,
            "threshold": log_alpha_threshold,
            "train_clip": train_clip,
        }

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearVBD(in_features, out_features, **self.options)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dVBD(in_channels, out_channels, kernel_size, **kw, **self.options)

    def twin(self, layer: nn.Module, **layer_options: Any) -> nn.Module | None:
        """The Gaussian-weight layer with ``layer``'s geometry and weights, for :func:`convert`.

        ``layer``: an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (exactly; None for any other
        module); ``layer_options`` override the method's options (``threshold``, …).
        """
        cls = _TWINS.get(type(layer))
        if cls is None:
            return None
        new = layer_like(layer, cls, **{**self.options, **layer_options})
        new.load_state_dict(layer.state_dict())
        return new.train(layer.training)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "prior")
        return f"{type(self).__name__}({args})"


@register
class VBD(GaussianWeightMethod):
    """Variational Bayesian dropout (this paper): hierarchical prior, KL = ½·log(1 + 1/α)."""

    name = "vbd"
    prior = "hierarchical"


@register
class SparseVD(GaussianWeightMethod):
    """Sparse variational dropout (Molchanov et al. 2017): log-uniform prior."""

    name = "sparse_vd"
    prior = "log_uniform"


class UnitNoiseMethod(Method):
    """Structured methods: one noise variable per unit, placed where SBP places it.

    On the input of every fully connected layer (the 784 pixels included) and on
    the output channels of every convolution; pruning a variable removes a unit.
    """

    def unit_noise(self, num_units: int) -> nn.Module:
        raise NotImplementedError

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return nn.Sequential(self.unit_noise(in_features), nn.Linear(in_features, out_features))

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, **kw)
        return nn.Sequential(conv, self.unit_noise(out_channels))


@register
class StructuredVBDMethod(UnitNoiseMethod):
    """Structured VBD (Section 4.2): W' ~ N(θ, αθ²) per unit, KL ½·log(1 + 1/α).

    ``unit_threshold``: a unit is kept while its log α is at most this (0, the
    authors' cut); ``train_clip``: pruned units are dropped in training too (the
    authors' hard mask).
    """

    name = "vbd_structured"
    prior = "hierarchical"
    run_options = ("unit_threshold", "train_clip")

    def __init__(
        self, unit_threshold: float | None = UNIT_THRESHOLD, train_clip: bool = False
    ) -> None:
        self.options = {"prior": self.prior, "threshold": unit_threshold, "train_clip": train_clip}

    def unit_noise(self, num_units: int) -> nn.Module:
        return StructuredVBD(num_units, **self.options)


@register
class StructuredSparseVD(StructuredVBDMethod):
    """The same per-unit layer with sparse VD's log-uniform prior (ours; no row of the paper)."""

    name = "sparse_vd_structured"
    prior = "log_uniform"


@register
class SBP(UnitNoiseMethod):
    """Structured Bayesian pruning (Neklyudov et al. 2017): truncated log-normal unit noise."""

    name = "sbp"

    def __init__(self, snr_threshold: float = 1.0) -> None:
        self.options = {"snr_threshold": snr_threshold}

    def unit_noise(self, num_units: int) -> nn.Module:
        return StructuredBayesianPruning(num_units, **self.options)
