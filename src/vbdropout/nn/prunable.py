"""The pruning contract: which elements of a layer survive, asked at a threshold.

Every layer that drops weights or units at evaluation is a :class:`Prunable`:
``keep_mask(threshold)`` answers which of its elements survive. The threshold is
a query argument, so code that reports, exports or shrinks a model at another
operating point passes it down instead of changing the layers:

- ``"own"`` (the default) — the cut the layer was built with (its ``threshold``);
- a number — that cut, in the layer's own unit (log α for the Gaussian layers);
- ``None`` — keep everything.

Layers whose mask is learned in training (pruning, DNS, SSL) have no threshold
to ask at: they answer ``"own"`` and ``None`` and refuse a number.

A model mixes layers whose thresholds mean different things (a weight's log α,
a unit's log α). Functions that take a whole model (:func:`~vbdropout.compress.
compression_report`, :func:`~vbdropout.nn.deterministic.to_deterministic`,
:func:`~vbdropout.compress.shrink`, export) take one keyword per meaning,
named as in the run configuration: ``log_alpha_threshold`` and
``unit_threshold``; :func:`threshold_for` picks a layer's own from them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..priors import LOG_ALPHA_RANGE
from .base import state_key
from .geometry import layer_like

__all__ = [
    "LOG_ALPHA_THRESHOLD",
    "UNIT_THRESHOLD",
    "Prunable",
    "PrunableWeight",
    "Threshold",
    "check_log_alpha_threshold",
    "check_thresholds",
    "check_unit_threshold",
    "eval_cached",
    "threshold_for",
    "with_thresholds",
]

#: A weight is pruned when its log α exceeds this (the sparse VD default: α > e³ ≈ 20).
LOG_ALPHA_THRESHOLD = 3.0
#: A structured VBD unit is kept while its log α is at most this (the authors' cut, α ≤ 1).
UNIT_THRESHOLD = 0.0

Threshold = float | None | Literal["own"]


def _number_or_none(threshold: float | None, name: str) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(threshold).__name__}")
    return float(threshold)


def check_log_alpha_threshold(threshold: float | None, name: str = "threshold") -> float | None:
    """``threshold`` as a float inside :data:`~vbdropout.priors.LOG_ALPHA_RANGE`, or ``None``."""
    cut = _number_or_none(threshold, name)
    low, high = LOG_ALPHA_RANGE
    if cut is not None and not low <= cut <= high:  # also rejects NaN
        raise ValueError(
            f"{name} is a log α value and must lie in the clip range [{low}, {high}], "
            f"got {threshold} (in Python, None keeps every weight)"
        )
    return cut


def check_unit_threshold(threshold: float | None, name: str = "threshold") -> float | None:
    """``threshold`` as a finite float, or ``None``: a unit's log α is not clipped, so any
    finite cut is meaningful (a structured unit starts near log α = −9)."""
    cut = _number_or_none(threshold, name)
    if cut is not None and not math.isfinite(cut):
        raise ValueError(f"{name} is a log α value and must be finite, got {threshold}")
    return cut


_CHECKS = {"log_alpha_threshold": check_log_alpha_threshold, "unit_threshold": check_unit_threshold}


def check_thresholds(model: nn.Module, thresholds: Mapping[str, Threshold]) -> None:
    """Refuse an unknown keyword, a bad value, or a number for a kind of layer ``model``
    does not have (it would change nothing, while the output said it was used) among
    whole-model ``thresholds``."""
    unknown = set(thresholds) - set(_CHECKS)
    if unknown:
        raise TypeError(f"unknown threshold keyword(s): {', '.join(sorted(unknown))}")
    options = {m.threshold_option for m in model.modules() if isinstance(m, Prunable)}
    for name, value in thresholds.items():
        if value == "own":
            continue
        _CHECKS[name](value, name)  # type: ignore[arg-type]
        if value is not None and name not in options:  # None (keep everything) always holds
            raise ValueError(
                f"{name} {value} cuts no layer of this model: it has no layer pruned at a {name}"
            )


class Prunable:
    """Mixin declared by every layer that drops elements (weights or units) at evaluation.

    ``threshold_option`` names the keyword (:func:`threshold_for`) by which
    whole-model functions pass this kind of layer a threshold; ``None`` when the
    layer has no threshold to ask at.
    """

    threshold_option: ClassVar[str | None] = None

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """Boolean mask of the elements that survive at ``threshold`` (see the module doc)."""
        raise NotImplementedError

    def deterministic(self, threshold: Threshold = "own") -> nn.Module:
        """The plain module computing this layer's evaluation output with the elements
        pruned at ``threshold`` dropped."""
        raise NotImplementedError

    def _no_threshold(self, threshold: Threshold) -> None:
        """Refuse a numeric threshold: this layer's mask is learned, not cut."""
        if threshold not in ("own", None):
            raise ValueError(
                f"{type(self).__name__} learns its mask in training and has no threshold; "
                f"got threshold={threshold!r} (use 'own' or None)"
            )


class PrunableWeight(Prunable):
    """A :class:`Prunable` masking its ``weight``; evaluation uses :meth:`masked_weight`."""

    weight: Tensor
    bias: Tensor | None

    def masked_weight(self, threshold: Threshold = "own") -> Tensor:
        """The weight evaluation uses, with the weights pruned at ``threshold`` set to zero."""
        return self.weight * self.keep_mask(threshold)

    @torch.no_grad()
    def deterministic(self, threshold: Threshold = "own") -> nn.Module:
        """The plain torch layer (same geometry) holding :meth:`masked_weight` and the bias."""
        plain = layer_like(self)  # type: ignore[arg-type]
        plain.weight.copy_(self.masked_weight(threshold))
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain.eval()


def threshold_for(module: Prunable, thresholds: Mapping[str, Threshold]) -> Threshold:
    """The threshold ``thresholds`` gives ``module`` by its ``threshold_option`` ("own" if none).

    ``thresholds`` is checked once by the whole-model function that takes it
    (:func:`check_thresholds`), not here for every module.
    """
    if module.threshold_option is None:
        return "own"
    return thresholds.get(module.threshold_option, "own")


def with_thresholds(
    model: nn.Module,
    *,
    log_alpha_threshold: Threshold = "own",
    unit_threshold: Threshold = "own",
) -> nn.Module:
    """A deep copy of ``model`` whose layers are built with the given cuts as their own.

    For what needs the stochastic model at another operating point (MC evaluation);
    deterministic uses pass the thresholds down instead
    (:func:`~vbdropout.nn.deterministic.to_deterministic`). ``model`` is not changed.
    """
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    check_thresholds(model, thresholds)
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, Prunable) and (cut := threshold_for(m, thresholds)) != "own":
            m.threshold = cut  # type: ignore[attr-defined]  # the layers with a threshold_option
    return copied


def eval_cached(
    module: nn.Module, compute: Callable[[], Tensor], tensors: Iterable[Tensor], *extra: object
) -> Tensor:
    """``compute()``, reused across evaluation forwards while nothing it reads has changed.

    With autograd on it is always recomputed. Otherwise the value is kept on the
    module under the key of ``tensors``' state (:func:`~.base.state_key`: an
    optimizer step or ``load_state_dict`` changes it) and ``extra`` (e.g. the
    layer's thresholds).
    """
    if torch.is_grad_enabled():
        return compute()
    key = (*state_key(tensors), *extra)
    cached = module.__dict__.get("_eval_cache")
    if cached is None or cached[0] != key:
        cached = (key, compute())
        module.__dict__["_eval_cache"] = cached
    return cached[1]
