"""Weight sparsity exactly as Table 4 of the paper defines it.

Only the weights of linear and convolutional layers count; biases do not (as
in Molchanov et al. 2017 and the paper's Table 4). A weight counts as nonzero
when it survives pruning (log α ≤ threshold) and its posterior mean is not
exactly zero. Per layer: sparsity % = zero weights / weights · 100; the
compression ratio of the whole network is |W| / |W≠0|.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn.deterministic import Scale
from ..nn.gaussian import GaussianWeight
from ..nn.geometry import WEIGHT_LAYERS
from ..nn.prunable import PrunableWeight, Threshold, check_thresholds, threshold_for
from ..nn.structured import UnitNoise

__all__ = ["CompressionReport", "LayerCompression", "compression_report"]


@dataclass(frozen=True)
class LayerCompression:
    """Counts for one layer's weight tensor."""

    name: str
    kind: str
    weights: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        """Percentage of weights that are zero."""
        return 100.0 * (self.weights - self.nonzero) / self.weights

    @property
    def ratio(self) -> float:
        """|W| / |W≠0| (infinite when every weight is pruned)."""
        return self.weights / self.nonzero if self.nonzero else math.inf


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer and total weight sparsity of a model."""

    layers: tuple[LayerCompression, ...]
    # the log α cut: "per-layer" when the layers' own differ, None when none applies
    threshold: float | str | None

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(layer.nonzero for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 100.0 * (self.weights - self.nonzero) / self.weights if self.weights else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio |W| / |W≠0| of the whole network."""
        return self.weights / self.nonzero if self.nonzero else math.inf

    def sparsity_per_layer(self) -> str:
        """Sparsity per layer the way Table 4 prints it, e.g. ``98.9-97.2-62.0``."""
        return "-".join(f"{layer.sparsity:.1f}" for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; an infinite ratio becomes ``None``."""

        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "threshold": self.threshold,
            "weights": self.weights,
            "nonzero": self.nonzero,
            "sparsity": self.sparsity,
            "compression_ratio": finite(self.ratio),
            "sparsity_per_layer": self.sparsity_per_layer(),
            "layers": [
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "weights": layer.weights,
                    "nonzero": layer.nonzero,
                    "sparsity": layer.sparsity,
                    "compression_ratio": finite(layer.ratio),
                }
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        header = (
            f"{'layer':<24} {'kind':<12} {'|W|':>10} {'|W≠0|':>10} "
            f"{'sparsity %':>11} {'|W|/|W≠0|':>10}"
        )
        rows = [header, "-" * len(header)]
        for item in (*self.layers, self):
            name = item.name if isinstance(item, LayerCompression) else "total"
            kind = item.kind if isinstance(item, LayerCompression) else ""
            rows.append(
                f"{name:<24} {kind:<12} {item.weights:>10} {item.nonzero:>10} "
                f"{item.sparsity:>11.2f} {item.ratio:>10.1f}"
            )
        return "\n".join(rows)


_UNSET: Any = object()


@torch.no_grad()
def compression_report(
    model: nn.Module,
    threshold: Threshold = _UNSET,
    *,
    log_alpha_threshold: Threshold = "own",
    unit_threshold: Threshold = "own",
) -> CompressionReport:
    """Count weights and surviving weights of every linear/conv layer of ``model``.

    log_alpha_threshold: the log α cut of the Gaussian-weight layers (a weight
    survives while log α ≤ it); ``"own"`` (the default) uses each layer's own
    ``threshold`` (3.0 unless set), ``None`` prunes nothing. unit_threshold: the
    same for the structured units. ``threshold`` is the former name of
    ``log_alpha_threshold`` (deprecated). The model is not changed.
    Plain layers count their exactly-nonzero weights.
    Models with unit-noise layers (structured methods) are counted after their
    unit multipliers are folded into the weights, so a pruned unit's weights
    count as zero.
    """
    if threshold is not _UNSET:
        warnings.warn(
            "compression_report(threshold=...) is deprecated: use log_alpha_threshold=...",
            DeprecationWarning,
            stacklevel=3,  # the caller, above torch.no_grad's wrapper
        )
        log_alpha_threshold = threshold
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    check_thresholds(model, thresholds)
    shown = _common_threshold(model) if log_alpha_threshold == "own" else log_alpha_threshold
    if any(isinstance(m, UnitNoise) for m in model.modules()):
        from .shrink import fold_scales

        named = list(fold_scales(model, **thresholds).named_modules())
        unfolded = [name for name, m in named if isinstance(m, Scale)]
        if unfolded:
            warnings.warn(
                f"unit-noise layers {unfolded} sit outside a chain of layers that their "
                "multipliers can be folded into: the weights of their pruned units are not "
                "counted as zero",
                stacklevel=2,
            )
    else:
        named = list(model.named_modules())
    layers = []
    for name, module in named:
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        if isinstance(module, PrunableWeight):
            weight = module.masked_weight(threshold_for(module, thresholds))
        else:
            weight = module.weight
        layers.append(
            LayerCompression(
                name=name or type(module).__name__,
                kind=type(module).__name__,
                weights=weight.numel(),
                nonzero=int(torch.count_nonzero(weight)),
            )
        )
    return CompressionReport(layers=tuple(layers), threshold=shown)


def _common_threshold(model: nn.Module) -> float | str | None:
    """The Gaussian-weight layers' own log α cut: one value, ``"per-layer"`` when they
    differ, ``None`` without such layers."""
    values = {m.threshold for m in model.modules() if isinstance(m, GaussianWeight)}
    if not values:
        return None
    return values.pop() if len(values) == 1 else "per-layer"
