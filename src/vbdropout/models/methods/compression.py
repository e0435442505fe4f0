"""The compression baselines of Tables 4–5: pruning, DNS, soft weight-sharing, SSL.

``pruning`` (Han et al. 2015), ``dns`` (Guo et al. 2016), ``sws`` (Ullrich et
al. 2017) and ``ssl`` (Wen et al. 2016) train plain weights with a penalty; their
training events (pruning steps, surgery, quantization, group removal) are their
layers' ``on_epoch_end`` hooks, run by :meth:`~.base.Method.epoch_end`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ...nn.dns import DNS_C_RATE, Conv2dDNS, LinearDNS, check_c_rate
from ...nn.penalized import check_nonnegative
from ...nn.pruning import (
    HAN_PRUNE_AT,
    HAN_SPARSITY,
    Conv2dPruning,
    LinearPruning,
    check_prune_at,
    check_sparsity,
)
from ...nn.ssl import Conv2dSSL, LinearSSL
from ...nn.sws import Conv2dSWS, LinearSWS, MixturePrior
from .base import Method, Position, register

__all__ = [
    "DNS",
    "POSITION_KEYS",
    "PerLayerMethod",
    "Pruning",
    "SoftWeightSharing",
    "StructuredSparsity",
]

POSITION_KEYS = ("input", "hidden", "output", "conv_input", "conv_hidden", "conv_output")
"""The layer positions by which a :class:`PerLayerMethod`'s option may be given."""


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
            dataset_size = self.require_dataset_size(dataset_size, "L2 weight decay")
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


@register
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


@register
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
    no_replicas_reason = (
        "its forward pass decides on the host, at random steps, whether to update the mask, "
        "and updates it in place: each replica would need its own draw and surgery"
    )
    no_compile_reason = (
        "its forward pass reads on the host, at every step, whether to update the mask "
        "(a graph break and retracing per surgery)"
    )
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


@register
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
    no_compile_reason = (
        "its prior reads on the host, at every step, whether it acts yet (a graph break "
        "and retracing when it starts)"
    )

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


@register
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
            dataset_size = self.require_dataset_size(dataset_size, "group lasso")
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
