"""Where dropout goes: each method says how to build a network's weight layers.

A network (see :mod:`vbdropout.models.networks`) asks its method for every
weight layer with ``method.linear(...)`` / ``method.conv2d(...)``; the method
returns the plain torch layer, a variational layer, or a noise module followed
by the layer, and may wrap the finished network (``method.wrap``). Adding a
method is one small class plus a registry entry: no network is copied.

Methods (``METHODS``): ``none``; the fixed-rate baselines ``bernoulli``,
``gaussian`` (Srivastava et al. 2014) and ``fast_dropout`` (Wang & Manning
2013); Kingma et al.'s (2015) variational dropout ``vd_a`` (noise on units) and
``vd_b`` (independent weight noise); ``concrete`` (Gal et al. 2017);
``adversarial`` (Park et al. 2018); ``vbd`` (this paper) and ``sparse_vd``
(Molchanov et al. 2017); the structured ``vbd_structured``,
``sparse_vd_structured`` and ``sbp`` (Neklyudov et al. 2017). Methods that
drop a layer's inputs default to the rates of Srivastava et al.: p = 0.2 on
the network input, 0.5 on hidden units;
on a convolution's input the noise is drawn per element (per channel and
position).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from torch import nn

from ..nn.adversarial import AdversarialDropout, AdversarialDropoutNet
from ..nn.concrete import ConcreteDropout
from ..nn.dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout, check_rate
from ..nn.fast_dropout import Conv2dFastDropout, LinearFastDropout
from ..nn.gaussian import Conv2dVBD, LinearVBD
from ..nn.structured import StructuredBayesianPruning, StructuredVBD

__all__ = [
    "METHODS",
    "SBP",
    "Adversarial",
    "Bernoulli",
    "Concrete",
    "FastDropout",
    "Gaussian",
    "GaussianWeightMethod",
    "InputNoiseMethod",
    "Method",
    "NoDropout",
    "StructuredSparseVD",
    "StructuredVBDMethod",
    "UnitNoiseMethod",
    "VariationalDropoutA",
    "VariationalDropoutB",
    "get_method",
]

Position = Literal["input", "hidden", "output"]


class Method:
    """Builds the weight layers of a network for one regularization method.

    ``position`` tells a layer's place: ``input`` (reads the network input),
    ``hidden`` or ``output`` (the classifier); methods that drop inputs use it
    to pick their rate.
    """

    name: ClassVar[str]

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        raise NotImplementedError

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        raise NotImplementedError

    def wrap(self, network: nn.Module) -> nn.Module:
        """What :func:`~vbdropout.models.build_model` returns; the network itself by default."""
        return network

    def __repr__(self) -> str:
        options = getattr(self, "options", {})
        args = ", ".join(f"{k}={v!r}" for k, v in options.items())
        return f"{type(self).__name__}({args})"


def _weights_per_input_unit(layer: nn.Linear | nn.Conv2d) -> int:
    """How many weights of ``layer`` one input unit (feature or channel) multiplies."""
    weight = layer.weight
    return weight.shape[0] * math.prod(weight.shape[2:])


class NoDropout(Method):
    """Plain torch layers: the no-dropout baseline."""

    name = "none"

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return nn.Linear(in_features, out_features)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size, **kw)


class GaussianWeightMethod(Method):
    """A Gaussian posterior on every weight; the prior is what defines the method."""

    prior: ClassVar[str]

    def __init__(self, threshold: float | None = 3.0, train_clip: bool = False) -> None:
        self.options = {"prior": self.prior, "threshold": threshold, "train_clip": train_clip}

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearVBD(in_features, out_features, **self.options)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dVBD(in_channels, out_channels, kernel_size, **kw, **self.options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "prior")
        return f"{type(self).__name__}({args})"


class VBD(GaussianWeightMethod):
    """Variational Bayesian dropout (this paper): hierarchical prior, KL = ½·log(1 + 1/α)."""

    name = "vbd"
    prior = "hierarchical"


class SparseVD(GaussianWeightMethod):
    """Sparse variational dropout (Molchanov et al. 2017): log-uniform prior."""

    name = "sparse_vd"
    prior = "log_uniform"


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


class Bernoulli(InputNoiseMethod):
    """Dropout with Bernoulli noise (Srivastava et al. 2014), inverted scaling."""

    name = "bernoulli"

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        return BernoulliDropout(self.rate(position))


class Gaussian(InputNoiseMethod):
    """Dropout with multiplicative Gaussian noise N(1, p/(1 − p)) (Srivastava et al. 2014)."""

    name = "gaussian"

    def noise(self, layer: nn.Linear | nn.Conv2d, position: Position) -> nn.Module:
        return GaussianDropout(self.rate(position))


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
            weights_per_unit=_weights_per_input_unit(layer),
            p=self.rate(position),
            alpha_per=self.options["alpha_per"],
        )


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


def _require_dataset_size(method: str, dataset_size: int | None) -> int:
    if dataset_size is None:
        raise ValueError(
            f"method {method!r} needs the option dataset_size (N, the number of training "
            f"examples), e.g. method_options={{'dataset_size': 60000}}"
        )
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    return dataset_size


class Concrete(Method):
    """Concrete dropout (Gal et al. 2017): a learned rate per layer on the layer's inputs.

    Every weight layer is wrapped in :class:`~vbdropout.nn.concrete.ConcreteDropout`;
    ``dataset_size`` is required.
    """

    name = "concrete"

    def __init__(
        self,
        dataset_size: int | None = None,
        length_scale: float = 1e-4,
        init_p: float = 0.1,
        temperature: float = 0.1,
    ) -> None:
        self.options = {
            "dataset_size": _require_dataset_size(self.name, dataset_size),
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


class Adversarial(InputNoiseMethod):
    """Adversarial dropout (Park et al. 2018) on the classifier's input, Bernoulli elsewhere.

    The output layer's input (the last hidden layer) gets an
    :class:`~vbdropout.nn.adversarial.AdversarialDropout`, the other weight
    layers :class:`~vbdropout.nn.dropout.BernoulliDropout`; :meth:`wrap` puts
    the network in :class:`~vbdropout.nn.adversarial.AdversarialDropoutNet`.
    ``dataset_size`` is required; δ = 0.05 and λ = 1 follow Park et al.
    """

    name = "adversarial"

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
            dataset_size=_require_dataset_size(self.name, dataset_size), delta=delta, lam=lam
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


class StructuredVBDMethod(UnitNoiseMethod):
    """Structured VBD (Section 4.2): W' ~ N(θ, αθ²) per unit, KL ½·log(1 + 1/α)."""

    name = "vbd_structured"
    prior = "hierarchical"

    def __init__(self, threshold: float | None = 0.0) -> None:
        self.options = {"prior": self.prior, "threshold": threshold}

    def unit_noise(self, num_units: int) -> nn.Module:
        return StructuredVBD(num_units, **self.options)


class StructuredSparseVD(StructuredVBDMethod):
    """The same per-unit layer with sparse VD's log-uniform prior (Table 5's "VD" row)."""

    name = "sparse_vd_structured"
    prior = "log_uniform"


class SBP(UnitNoiseMethod):
    """Structured Bayesian pruning (Neklyudov et al. 2017): truncated log-normal unit noise."""

    name = "sbp"

    def __init__(self, snr_threshold: float = 1.0) -> None:
        self.options = {"snr_threshold": snr_threshold}

    def unit_noise(self, num_units: int) -> nn.Module:
        return StructuredBayesianPruning(num_units, **self.options)


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        NoDropout,
        Bernoulli,
        Gaussian,
        FastDropout,
        VariationalDropoutA,
        VariationalDropoutB,
        Concrete,
        Adversarial,
        VBD,
        SparseVD,
        StructuredVBDMethod,
        StructuredSparseVD,
        SBP,
    )
}


def get_method(method: str | Method, **options: Any) -> Method:
    """A :class:`Method` from its name and options (e.g. ``threshold`` for vbd)."""
    if isinstance(method, Method):
        if options:
            raise ValueError("options can only be given with a method name")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise ValueError(f"bad options for method {method!r}: {err}") from None
