"""From a trained stochastic model to the plain network it computes in evaluation.

Every vbdropout module knows its evaluation-time equivalent through
``deterministic()``: a Gaussian-weight layer becomes the torch layer with the
pruned posterior mean, a unit-noise layer a fixed per-unit :class:`Scale`, a
dropout layer nothing. :func:`to_deterministic` applies that to a whole model
(any nesting); the result gives the same outputs as ``model.eval()``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

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
    """Keep only the input features ``index`` of a flattened input (pruned input pixels)."""

    def __init__(self, index: Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("index", index.detach().clone().long())

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.index.numel()}"


@torch.no_grad()
def to_deterministic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` made of plain modules that computes ``model.eval()``'s output.

    Modules with a ``deterministic()`` method are replaced by what it returns
    (``None`` removes the module, i.e. identity); the rest are copied.
    """
    if hasattr(model, "deterministic"):
        replacement = model.deterministic()
        return nn.Identity() if replacement is None else replacement
    clone = copy.copy(model)
    clone._modules = {}
    for name, child in model._modules.items():
        clone._modules[name] = None if child is None else to_deterministic(child)
    clone._parameters = {k: _clone(v) for k, v in model._parameters.items()}
    clone._buffers = {
        k: None if v is None else v.detach().clone() for k, v in model._buffers.items()
    }
    return clone.eval()


def _clone(p: nn.Parameter | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
