"""From a trained stochastic model to the plain network it computes in evaluation.

Every vbdropout module declares its evaluation-time equivalent,
``deterministic()`` (:class:`~vbdropout.nn.base.StochasticModule`): a
Gaussian-weight layer becomes the torch layer with the pruned posterior mean, a
unit-noise layer a fixed per-unit :class:`Scale`, a dropout layer nothing.
:func:`to_deterministic` applies that to a whole model (any nesting); the result
gives the same outputs as ``model.eval()``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import StochasticModule
from .prunable import Prunable, Threshold, check_thresholds, threshold_for

__all__ = ["InputSelect", "Scale", "to_deterministic"]


class Scale(nn.Module):
    """Multiply unit ``c`` (dim 1) of the input by ``scale[c]``: a folded noise layer."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view((-1,) + (1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"num_units={self.scale.numel()}"


class InputSelect(nn.Module):
    """Flatten the input and keep only its features ``index`` (the ones the next linear
    layer reads: not pruned input pixels, or not pruned positions of a feature map)."""

    def __init__(self, index: Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("index", index.detach().clone().long())

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.index.numel()}"


@torch.no_grad()
def to_deterministic(
    model: nn.Module,
    *,
    log_alpha_threshold: Threshold = "own",
    unit_threshold: Threshold = "own",
) -> nn.Module:
    """A copy of ``model`` made of plain modules that computes ``model.eval()``'s output.

    Every stochastic module is replaced by its ``deterministic()`` (``None``
    removes it, i.e. identity); the rest are copied. The thresholds are those of
    :mod:`~vbdropout.nn.prunable`: ``"own"`` keeps each layer's own cut, a number
    prunes the Gaussian-weight layers (``log_alpha_threshold``) or the structured
    units (``unit_threshold``) at that log α, ``None`` keeps everything.
    """
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    check_thresholds(model, thresholds)
    return _deterministic(model, thresholds)


def _deterministic(model: nn.Module, thresholds: Mapping[str, Threshold]) -> nn.Module:
    if isinstance(model, StochasticModule):
        if isinstance(model, Prunable):
            replacement = model.deterministic(threshold_for(model, thresholds))
        else:
            replacement = model.deterministic()
        return nn.Identity() if replacement is None else replacement
    clone = copy.copy(model)
    clone._modules = {}
    for name, child in model._modules.items():
        clone._modules[name] = None if child is None else _deterministic(child, thresholds)
    clone._parameters = {k: _clone(v) for k, v in model._parameters.items()}
    clone._buffers = {
        k: None if v is None else v.detach().clone() for k, v in model._buffers.items()
    }
    return clone.eval()


def _clone(p: nn.Parameter | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
