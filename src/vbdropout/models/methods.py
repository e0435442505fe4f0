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
``sparse_vd_structured`` and ``sbp`` (Neklyudov et al. 2017); the compression
baselines ``pruning`` (Han et al. 2015), ``dns`` (Guo et al. 2016), ``sws``
(Ullrich et al. 2017) and ``ssl`` (Wen et al. 2016), whose training events
run through :func:`vbdropout.nn.epoch_hooks.epoch_end`. Methods that
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
from ..nn.dns import DNS_C_RATE, Conv2dDNS, LinearDNS, check_c_rate
from ..nn.dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout, check_rate
from ..nn.fast_dropout import Conv2dFastDropout, LinearFastDropout
from ..nn.gaussian import Conv2dVBD, LinearVBD
from ..nn.penalized import check_nonnegative
from ..nn.pruning import (
    HAN_PRUNE_AT,
    HAN_SPARSITY,
    Conv2dPruning,
    LinearPruning,
    check_prune_at,
    check_sparsity,
)
from ..nn.ssl import Conv2dSSL, LinearSSL
from ..nn.structured import StructuredBayesianPruning, StructuredVBD
from ..nn.sws import Conv2dSWS, LinearSWS, MixturePrior

__all__ = [
    "DNS",
    "METHODS",
    "POSITION_KEYS",
    "RUN_OPTIONS",
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
    "PerLayerMethod",
    "Pruning",
    "SoftWeightSharing",
    "StructuredSparseVD",
    "StructuredSparsity",
    "StructuredVBDMethod",
    "UnitNoiseMethod",
    "VariationalDropoutA",
    "VariationalDropoutB",
    "get_method",
]

Position = Literal["input", "hidden", "output"]

RUN_OPTIONS: dict[str, str] = {
    "log_alpha_threshold": "weight layers: a weight is pruned when its log α exceeds this",
    "unit_threshold": "unit-noise layers: a unit is kept while its log α is at most this",
    "train_clip": "pruned weights or units are also dropped in training",
    "dataset_size": "N, the number of training examples",
}
"""The settings a training run can hand to a method, by the option name the method takes."""


class Method:
    """Builds the weight layers of a network for one regularization method.

    ``position`` tells a layer's place: ``input`` (reads the network input),
    ``hidden`` or ``output`` (the classifier); methods that drop inputs use it
    to pick their rate.

    ``run_options`` declares which settings of a training run the method takes as
    constructor options of the same name (see :data:`RUN_OPTIONS`); a run passes
    exactly those, so no run setting reaches a method that means something else
    by the name.
    """

    name: ClassVar[str]
    run_options: ClassVar[tuple[str, ...]] = ()

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
    """A Gaussian posterior on every weight; the prior is what defines the method.

    ``log_alpha_threshold``: a weight is pruned when its log α exceeds it (3, the
    sparse VD cut); ``train_clip``: pruned weights are dropped in training too.
    """

    prior: ClassVar[str]
    run_options = ("log_alpha_threshold", "train_clip")

    def __init__(self, log_alpha_threshold: float | None = 3.0, train_clip: bool = False) -> None:
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
    run_options = ("dataset_size",)

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
    run_options = ("dataset_size",)

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
    """Structured VBD (Section 4.2): W' ~ N(θ, αθ²) per unit, KL ½·log(1 + 1/α).

    ``unit_threshold``: a unit is kept while its log α is at most this (0, the
    authors' cut); ``train_clip``: pruned units are dropped in training too (the
    authors' hard mask).
    """

    name = "vbd_structured"
    prior = "hierarchical"
    run_options = ("unit_threshold", "train_clip")

    def __init__(self, unit_threshold: float | None = 0.0, train_clip: bool = False) -> None:
        self.options = {"prior": self.prior, "threshold": unit_threshold, "train_clip": train_clip}

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
    """A :class:`Method` from its name and options (e.g. ``log_alpha_threshold`` for vbd)."""
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


# ---------------------------------------------------------------- pruning baselines (Tables 4–5)

POSITION_KEYS = ("input", "hidden", "output", "conv_input", "conv_hidden", "conv_output")


def _needs_dataset_size(method: str, dataset_size: int | None, term: str) -> int:
    if dataset_size is None:
        raise ValueError(
            f"method {method!r} needs the option dataset_size (N, the number of training "
            f"examples) for its {term}, e.g. method_options={{'dataset_size': 60000}}"
        )
    return _require_dataset_size(method, dataset_size)


class PerLayerMethod(Method):
    """A method with one option that differs by layer (``per_layer`` names it).

    The option is given as one number (every layer), a dict by layer position
    (keys :data:`POSITION_KEYS`: ``input``, ``hidden``, ``output`` for fully
    connected layers, ``conv_input``, ``conv_hidden``, ``conv_output`` for
    convolutions; missing keys keep their defaults), a list with one value per
    weight layer in the order the network builds them, or None (the defaults).
    ``defaults`` holds two tables by position, one for networks of fully connected
    layers (``"fc"``) and one for networks with convolutions (``"conv"``); which one
    applies is known when the network is complete, so :meth:`wrap` sets the values.
    """

    per_layer: ClassVar[str]
    layer_classes: ClassVar[tuple[type[nn.Module], type[nn.Module]]]  # (linear, conv2d)
    defaults: ClassVar[dict[str, dict[str, float]]]
    options: dict[str, Any]
    _built: list[tuple[nn.Module, str]]

    def _check_per_layer(self, spec: Any, check: Any) -> Any:
        """``spec`` validated value by value with ``check(value, name)``."""
        name = self.per_layer
        if spec is None:
            return None
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(POSITION_KEYS))
            if unknown:
                raise ValueError(
                    f"unknown layer positions {unknown} in {name}; "
                    f"known: {', '.join(POSITION_KEYS)}"
                )
            return {k: check(v, f"{name}[{k!r}]") for k, v in spec.items()}
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError(f"{name} must not be an empty list")
            return [check(v, f"{name}[{i}]") for i, v in enumerate(spec)]
        return check(spec, name)

    def _l2_options(self, weight_decay: float, dataset_size: int | None) -> dict[str, Any]:
        """``weight_decay`` (λ ≥ 0 per example) and ``dataset_size``, which λ > 0 requires."""
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if weight_decay > 0 or dataset_size is not None:
            dataset_size = _needs_dataset_size(self.name, dataset_size, "L2 weight decay")
        return {"weight_decay": weight_decay, "dataset_size": dataset_size}

    def _value(self, key: str, index: int, kind: str) -> float:
        spec = self.options[self.per_layer]
        if isinstance(spec, list):  # a length mismatch is reported by wrap()
            return spec[min(index, len(spec) - 1)]
        if isinstance(spec, dict) and key in spec:
            return spec[key]
        if spec is None or isinstance(spec, dict):
            return self.defaults[kind][key]
        return spec

    def _layer_options(self) -> dict[str, Any]:
        """The options every layer gets (all but the per-layer one, set by ``_track``)."""
        return {k: v for k, v in self.options.items() if k != self.per_layer}

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        layer = self.layer_classes[0](in_features, out_features, **self._layer_options())
        return self._track(layer, position, conv=False)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        conv = self.layer_classes[1]
        layer = conv(in_channels, out_channels, kernel_size, **kw, **self._layer_options())
        return self._track(layer, position, conv=True)

    def _track(self, layer: nn.Module, position: Position, conv: bool) -> nn.Module:
        key = f"conv_{position}" if conv else position
        setattr(layer, self.per_layer, self._value(key, len(self._built), "conv" if conv else "fc"))
        self._built.append((layer, key))
        return layer

    def wrap(self, network: nn.Module) -> nn.Module:
        built, self._built = self._built, []
        spec = self.options[self.per_layer]
        if isinstance(spec, list) and len(spec) != len(built):
            raise ValueError(
                f"{self.per_layer} gives {len(spec)} values for a network of "
                f"{len(built)} weight layers"
            )
        kind = "conv" if any(key.startswith("conv_") for _, key in built) else "fc"
        for index, (layer, key) in enumerate(built):
            setattr(layer, self.per_layer, self._value(key, index, kind))
        return network


def _c_rate(value: Any, name: str) -> float:
    try:
        return check_c_rate(value)
    except ValueError:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None


class Pruning(PerLayerMethod):
    """Han et al. (2015): magnitude pruning per layer, retraining with the mask fixed.

    ``sparsity``: the final fraction of pruned weights per layer (see
    :class:`PerLayerMethod` for the forms); default :data:`~vbdropout.nn.pruning.HAN_SPARSITY`,
    Han et al.'s rates by position (LeNet-300-100: 92/91/74 %; with convolutions,
    LeNet-5: 34/88 % on the convolutions, 92/81 % on the fully connected layers).
    ``prune_at``: the pruning epochs as fractions of the run (iterative pruning,
    default after 25 %, 37.5 % and 50 %). ``weight_decay``: the L2 λ per example
    (5e-4); with λ > 0, ``dataset_size`` is required (the trainer passes it).
    """

    name = "pruning"
    run_options = ("dataset_size",)
    per_layer = "sparsity"
    layer_classes = (LinearPruning, Conv2dPruning)
    defaults = HAN_SPARSITY

    def __init__(
        self,
        sparsity: float | dict[str, float] | list[float] | None = None,
        prune_at: tuple[float, ...] = HAN_PRUNE_AT,
        weight_decay: float = 5e-4,
        dataset_size: int | None = None,
    ) -> None:
        self._built = []
        self.options = {
            "sparsity": self._check_per_layer(sparsity, check_sparsity),
            "prune_at": check_prune_at(prune_at),
            **self._l2_options(weight_decay, dataset_size),
        }


class DNS(PerLayerMethod):
    """Dynamic network surgery (Guo et al. 2016): pruning and splicing during training.

    ``c_rate``: c of each layer's thresholds (forms as in :class:`PerLayerMethod`;
    default :data:`~vbdropout.nn.dns.DNS_C_RATE`). ``gamma``, ``power``: the mask
    update probability (1 + γ·iter)^(−power). ``start``, ``stop``: surgery runs between
    these fractions of the run (dense training before ``start``; 0 when starting
    from a trained network). ``weight_decay``: the L2 λ per example on W (5e-4);
    with λ > 0, ``dataset_size`` is required.
    """

    name = "dns"
    run_options = ("dataset_size",)
    per_layer = "c_rate"
    layer_classes = (LinearDNS, Conv2dDNS)
    defaults = DNS_C_RATE

    def __init__(
        self,
        c_rate: float | dict[str, float] | list[float] | None = None,
        gamma: float = 1e-4,
        power: float = 1.0,
        start: float = 0.25,
        stop: float = 1.0,
        weight_decay: float = 5e-4,
        dataset_size: int | None = None,
    ) -> None:
        self._built = []
        self.options = {
            "c_rate": self._check_per_layer(c_rate, _c_rate),
            "gamma": gamma,
            "power": power,
            "start": start,
            "stop": stop,
            **self._l2_options(weight_decay, dataset_size),
        }
        LinearDNS(1, 1, **self._layer_options())  # validates the options


class SoftWeightSharing(Method):
    """Soft weight-sharing (Ullrich et al. 2017): a learned mixture prior, then quantization.

    One :class:`~vbdropout.nn.sws.MixturePrior` of ``components`` components (the
    zero one included, mixing proportion ``pi_zero``), weighted by ``tau``, shared by
    every weight layer of the network (``per_layer=True``: one prior per layer). The
    means start evenly spread over [−m, m], m the largest |w| of the built network
    (of the layer with ``per_layer``). Ullrich et al. retrain a trained network:
    the prior acts from the end of a fraction ``start`` of the run on (0.25: the
    first quarter trains the plain network; 0 to retrain a network loaded with
    ``--init`` at once), widening its means to the trained weights then. The
    weights are quantized to the component means after the last epoch
    (``quantize_at_end``).
    """

    name = "sws"

    def __init__(
        self,
        components: int = 16,
        pi_zero: float = 0.99,
        tau: float = 0.03,
        init_std: float = 0.25,
        per_layer: bool = False,
        quantize_at_end: bool = True,
        start: float = 0.25,
    ) -> None:
        self.options = {
            "components": components,
            "pi_zero": pi_zero,
            "tau": tau,
            "init_std": init_std,
            "start": start,
            "per_layer": bool(per_layer),
            "quantize_at_end": bool(quantize_at_end),
        }
        self._new_prior()  # validates the prior's options
        self._prior: MixturePrior | None = None
        self._built: list[nn.Module] = []

    def _new_prior(self) -> MixturePrior:
        keys = ("components", "pi_zero", "tau", "init_std", "start")
        return MixturePrior(**{k: self.options[k] for k in keys})

    def _layer_prior(self) -> MixturePrior:
        if self.options["per_layer"]:
            return self._new_prior()
        if self._prior is None:
            self._prior = self._new_prior()
        return self._prior

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        layer = LinearSWS(
            in_features,
            out_features,
            prior=self._layer_prior(),
            quantize_at_end=self.options["quantize_at_end"],
        )
        self._built.append(layer)
        return layer

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        layer = Conv2dSWS(
            in_channels,
            out_channels,
            kernel_size,
            **kw,
            prior=self._layer_prior(),
            quantize_at_end=self.options["quantize_at_end"],
        )
        self._built.append(layer)
        return layer

    def wrap(self, network: nn.Module) -> nn.Module:
        """Spread each prior's means over its weights' range; the next build gets new priors."""
        built, self._built, self._prior = self._built, [], None
        spread: dict[int, tuple[MixturePrior, float]] = {}
        for layer in built:
            prior, m = spread.get(id(layer.prior), (layer.prior, 0.0))
            spread[id(prior)] = (prior, max(m, float(layer.weight.detach().abs().max())))
        for prior, m in spread.values():
            if m > 0:
                prior.init_means(m)
        return network


class StructuredSparsity(Method):
    """Structured sparsity learning (Wen et al. 2016): group lasso on neurons, filters, channels.

    ``group_decay``: λ_g per example of the group lasso over the rows and columns of
    fully connected layers and the filters and input channels of convolutions;
    ``weight_decay``: the L2 λ per example (5e-4); ``rms_threshold``: a group is removed
    once its RMS weight is at most this (checked after every epoch). ``dataset_size``
    is required (the trainer passes it).
    """

    name = "ssl"
    run_options = ("dataset_size",)

    def __init__(
        self,
        group_decay: float = 1e-4,
        rms_threshold: float = 1e-3,
        weight_decay: float = 5e-4,
        dataset_size: int | None = None,
    ) -> None:
        group_decay = check_nonnegative(group_decay, "group_decay")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if group_decay > 0 or weight_decay > 0 or dataset_size is not None:
            dataset_size = _needs_dataset_size(self.name, dataset_size, "group lasso")
        self.options = {
            "group_decay": group_decay,
            "rms_threshold": check_nonnegative(rms_threshold, "rms_threshold"),
            "weight_decay": weight_decay,
            "dataset_size": dataset_size,
        }

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearSSL(in_features, out_features, **self.options)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dSSL(in_channels, out_channels, kernel_size, **kw, **self.options)


METHODS.update({cls.name: cls for cls in (Pruning, DNS, SoftWeightSharing, StructuredSparsity)})
