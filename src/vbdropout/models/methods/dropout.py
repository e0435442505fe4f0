"""Dropout methods with fixed or learned rates: the baselines of Tables 1–3.

``none`` (plain layers); the fixed-rate ``bernoulli``, ``gaussian`` (Srivastava
et al. 2014) and ``fast_dropout`` (Wang & Manning 2013); Kingma et al.'s (2015)
variational dropout ``vd_a`` (noise on units) and ``vd_b`` (independent weight
noise); ``concrete`` (Gal et al. 2017); ``adversarial`` (Park et al. 2018).
Methods that drop a layer's inputs default to the rates of Srivastava et al.:
p = 0.2 on the network input, 0.5 on hidden units; on a convolution's input the
noise is drawn per element (per channel and position).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import nn

from ...nn.adversarial import AdversarialDropout, AdversarialDropoutNet
from ...nn.concrete import ConcreteDropout
from ...nn.dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout, check_rate
from ...nn.fast_dropout import Conv2dFastDropout, LinearFastDropout
from ...nn.gaussian import Conv2dVBD, LinearVBD
from .base import Method, Position, register, weights_per_input_unit

__all__ = [
    "Adversarial",
    "Bernoulli",
    "Concrete",
    "FastDropout",
    "Gaussian",
    "InputNoiseMethod",
    "NoDropout",
    "VariationalDropoutA",
    "VariationalDropoutB",
]


@register
class NoDropout(Method):
    """Plain torch layers: the no-dropout baseline."""

    name = "none"

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return nn.Linear(in_features, out_features)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size, **kw)


class _RateByPosition:
    """Srivastava et al.'s rates: ``p_input`` on the network input, ``p`` elsewhere."""

    options: dict[str, Any]

    def _set_rates(self, p: float, p_input: float) -> None:
        self.options = {"p": check_rate(p, "p"), "p_input": check_rate(p_input, "p_input")}

    def rate(self, position: Position) -> float:
        return self.options["p_input" if position == "input" else "p"]


class InputNoiseMethod(_RateByPosition, Method):
    """Noise on each weight layer's inputs, then the plain layer: ``Sequential(noise, layer)``."""

    def __init__(self, p: float = 0.5, p_input: float = 0.2) -> None:
        self._set_rates(p, p_input)

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        """The noise module in front of ``layer``."""
        raise NotImplementedError

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        layer = nn.Linear(in_features, out_features)
        return nn.Sequential(self.noise(layer, position), layer)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, **kw)
        return nn.Sequential(self.noise(layer, position), layer)


@register
class Bernoulli(InputNoiseMethod):
    """Dropout with Bernoulli noise (Srivastava et al. 2014), inverted scaling."""

    name = "bernoulli"

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        return BernoulliDropout(self.rate(position))


@register
class Gaussian(InputNoiseMethod):
    """Dropout with multiplicative Gaussian noise N(1, p/(1 − p)) (Srivastava et al. 2014)."""

    name = "gaussian"

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        return GaussianDropout(self.rate(position))


@register
class FastDropout(_RateByPosition, Method):
    """Fast dropout (Wang & Manning 2013): the Gaussian of the dropped-out pre-activation."""

    name = "fast_dropout"

    def __init__(self, p: float = 0.5, p_input: float = 0.2) -> None:
        self._set_rates(p, p_input)

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearFastDropout(in_features, out_features, p=self.rate(position))

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dFastDropout(
            in_channels, out_channels, kernel_size, **kw, p=self.rate(position)
        )


@register
class VariationalDropoutA(InputNoiseMethod):
    """Kingma et al.'s (2015) variational dropout A: learned N(1, α) noise on the inputs, α ≤ 1.

    α per input unit/channel (``alpha_per="unit"``) or per layer, initialized at
    p/(1 − p) for the layer's position.
    """

    name = "vd_a"

    def __init__(
        self, p: float = 0.5, p_input: float = 0.2, alpha_per: Literal["unit", "layer"] = "unit"
    ) -> None:
        super().__init__(p, p_input)
        if alpha_per not in ("unit", "layer"):
            raise ValueError(f"alpha_per must be 'unit' or 'layer', got {alpha_per!r}")
        self.options["alpha_per"] = alpha_per

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        return VariationalGaussianDropout(
            layer.weight.shape[1],
            weights_per_unit=weights_per_input_unit(layer),
            p=self.rate(position),
            alpha_per=self.options["alpha_per"],
        )


@register
class VariationalDropoutB(_RateByPosition, Method):
    """Kingma et al.'s (2015) variational dropout B: independent weight noise by the LRT.

    A Gaussian-weight layer with Kingma's prior (α ≤ 1), α tied per output unit
    (``alpha_per="unit"``) or per layer, initialized at p/(1 − p); never prunes.
    """

    name = "vd_b"

    def __init__(
        self, p: float = 0.5, p_input: float = 0.2, alpha_per: Literal["unit", "layer"] = "unit"
    ) -> None:
        self._set_rates(p, p_input)
        if alpha_per not in ("unit", "layer"):
            raise ValueError(f"alpha_per must be 'unit' or 'layer', got {alpha_per!r}")
        self.options["alpha_per"] = alpha_per

    def _layer_options(self, position: Position) -> dict[str, Any]:
        p = self.rate(position)
        return {
            "prior": "kingma",
            "alpha_per": self.options["alpha_per"],
            "threshold": None,
            "init_log_alpha": math.log(p / (1.0 - p)),
        }

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearVBD(in_features, out_features, **self._layer_options(position))

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dVBD(
            in_channels, out_channels, kernel_size, **kw, **self._layer_options(position)
        )


@register
class Concrete(Method):
    """Concrete dropout (Gal et al. 2017): a learned rate per layer on the layer's inputs.

    Every weight layer is wrapped in :class:`~vbdropout.nn.concrete.ConcreteDropout`;
    ``dataset_size`` is required.
    """

    name = "concrete"
    run_options = ("dataset_size",)

    def __init__(
        self,
        dataset_size: int | None = None,
        length_scale: float = 1e-4,
        init_p: float = 0.1,
        temperature: float = 0.1,
    ) -> None:
        self.options = {
            "dataset_size": self.require_dataset_size(dataset_size),
            "length_scale": length_scale,
            "init_p": check_rate(init_p, "init_p"),
            "temperature": temperature,
        }

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return ConcreteDropout(nn.Linear(in_features, out_features), **self.options)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return ConcreteDropout(
            nn.Conv2d(in_channels, out_channels, kernel_size, **kw), **self.options
        )


@register
class Adversarial(InputNoiseMethod):
    """Adversarial dropout (Park et al. 2018) on the classifier's input, Bernoulli elsewhere.

    The output layer's input (the last hidden layer) gets an
    :class:`~vbdropout.nn.adversarial.AdversarialDropout`, the other weight
    layers :class:`~vbdropout.nn.dropout.BernoulliDropout`; :meth:`wrap` puts
    the network in :class:`~vbdropout.nn.adversarial.AdversarialDropoutNet`.
    ``dataset_size`` is required; δ = 0.05 and λ = 1 follow Park et al.
    """

    name = "adversarial"
    run_options = ("dataset_size",)
    no_replicas_reason = (
        "its forward pass differentiates the loss by the dropout mask (a backward pass "
        "inside the forward), which torch.func's vmap cannot batch"
    )
    no_compile_reason = (
        "its forward pass differentiates the loss by the dropout mask (a backward pass "
        "inside the forward), which breaks the graph and retraces at every step"
    )

    def __init__(
        self,
        dataset_size: int | None = None,
        p: float = 0.5,
        p_input: float = 0.2,
        delta: float = 0.05,
        lam: float = 1.0,
    ) -> None:
        super().__init__(p, p_input)
        self.options.update(
            dataset_size=self.require_dataset_size(dataset_size), delta=delta, lam=lam
        )

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        if position == "output":
            return AdversarialDropout(self.rate(position))
        return BernoulliDropout(self.rate(position))

    def wrap(self, network: nn.Module) -> nn.Module:
        return AdversarialDropoutNet(
            network,
            self.options["dataset_size"],
            delta=self.options["delta"],
            lam=self.options["lam"],
        )
