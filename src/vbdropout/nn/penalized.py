"""Plain weight layers with a training penalty: the base of the pruning baselines.

The compression baselines of Tables 4–5 (Han et al.'s pruning, dynamic network
surgery, soft weight-sharing, SSL) train ordinary weights; what makes each of
them is a term of the training objective and a rule that zeroes weights. Their
layers subclass ``nn.Linear`` / ``nn.Conv2d`` (a plain ``state_dict`` loads
into them, and :func:`~vbdropout.compress.compression_report` counts their
``weight``) and this mixin:

- :meth:`~PenalizedWeight.kl` — the layer's term of the objective for the
  whole training set, N·(λ/2)·‖W‖² for an L2 weight decay λ (Caffe's
  ``weight_decay``, which all four papers train with, is λ per example) plus
  the method's :meth:`~PenalizedWeight.penalty`;
- :meth:`~PenalizedWeight.masked_weight` — the weight evaluation uses;
  :meth:`~PenalizedWeight.deterministic` returns the plain layer holding it.

:class:`MaskedWeight` adds a fixed binary mask whose zeros stay exactly zero
in ``weight`` through the steps of the run's optimizer (see its docstring).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import VariationalModule, check_dataset_size
from .prunable import PrunableWeight, Threshold

__all__ = [
    "LearnedMask",
    "MaskedWeight",
    "PenalizedWeight",
    "check_nonnegative",
    "needs_dataset_size",
]


def check_nonnegative(value: float, name: str) -> float:
    """``value`` as a finite float >= 0, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def needs_dataset_size(term: str) -> str:
    """The error message for a layer whose ``term`` needs dataset_size but has none."""
    return (
        f"{term} is scaled to the training set and needs dataset_size "
        f"(N, the number of training examples)"
    )


class PenalizedWeight(PrunableWeight, VariationalModule):
    """Mixin for a torch ``Linear``/``ConvNd`` trained with a penalty; see the module docstring.

    Subclasses combine it with the torch layer (``class L(Mixin, nn.Linear)``) and
    override :meth:`penalty`, :meth:`masked_weight` and, for a training forward
    that differs from evaluation, :meth:`training_weight`. ``optional_state``
    lists the state_dict entries a plain layer's state lacks: a plain
    ``state_dict`` (e.g. a pretrained ``nn.Linear``) loads and leaves them as built.
    """

    weight: Tensor
    bias: Tensor | None
    optional_state: tuple[str, ...] = ()

    def __init__(
        self,
        *args: Any,
        weight_decay: float = 0.0,
        dataset_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged.

        weight_decay: λ of the L2 term (λ/2)·‖W‖² per training example.
        dataset_size: N, the number of training examples (needed when λ > 0).
        """
        super().__init__(*args, **kwargs)
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.dataset_size = check_dataset_size(
            dataset_size, needs_dataset_size("weight_decay"), optional=self.weight_decay == 0
        )

    # ----------------------------------------------------------- the objective

    def penalty(self) -> Tensor:
        """The method's own term of the objective (whole training set, nats); none here."""
        return self.weight.new_zeros(())

    def kl(self) -> Tensor:
        """N·(λ/2)·‖W‖² plus :meth:`penalty` (biases are not penalized)."""
        total = self.penalty()
        if self.weight_decay > 0:
            assert self.dataset_size is not None
            l2 = self.weight.square().sum()
            total = total + self.dataset_size * self.weight_decay / 2 * l2
        return total

    # ----------------------------------------------------------- the weights

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """The weights evaluation keeps: all of them here. A learned mask has no
        threshold to ask at, so only ``"own"`` and ``None`` (keep all) are accepted."""
        self._no_threshold(threshold)
        return torch.ones_like(self.weight, dtype=torch.bool)

    def masked_weight(self, threshold: Threshold = "own") -> Tensor:
        """The weight the evaluation forward uses (``weight`` itself here)."""
        self._no_threshold(threshold)
        return self.weight

    def training_weight(self) -> Tensor:
        """The weight the training forward uses (by default the evaluation one)."""
        return self.masked_weight()

    def forward(self, x: Tensor) -> Tensor:
        weight = self.training_weight() if self.training else self.masked_weight()
        return self._apply_weight(x, weight, self.bias)

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if isinstance(self, nn.modules.conv._ConvNd):
            return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_decay={self.weight_decay}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Also accept a plain layer's state_dict: the optional entries keep their values."""
        plain = self._is_plain_state(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if plain:
            for key in (prefix + n for n in self.optional_state):
                if key in missing_keys:
                    missing_keys.remove(key)
        self._after_load(plain)

    def _is_plain_state(self, state_dict: dict[str, Any], prefix: str) -> bool:
        """Whether ``state_dict`` holds a plain layer's state: the weight, no optional entry."""
        optional = (prefix + n for n in self.optional_state)
        return prefix + "weight" in state_dict and not any(k in state_dict for k in optional)

    def _after_load(self, plain: bool) -> None:
        """Restore the layer's invariants after a state_dict (a plain one if ``plain``) loaded."""


class LearnedMask(PenalizedWeight):
    """A :class:`PenalizedWeight` whose evaluation uses ``weight · mask`` for a binary
    ``mask`` buffer (1 = kept) that training sets; subclasses register the buffer."""

    mask: Tensor

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """``mask`` as booleans ("own"), or every weight (``None``)."""
        self._no_threshold(threshold)
        if threshold is None:
            return torch.ones_like(self.weight, dtype=torch.bool)
        return self.mask != 0

    def masked_weight(self, threshold: Threshold = "own") -> Tensor:
        """``weight · mask`` ("own"), or ``weight`` itself (``None``)."""
        self._no_threshold(threshold)
        return self.weight if threshold is None else self.weight * self.mask


class MaskedWeight(LearnedMask):
    """A :class:`PenalizedWeight` with a binary ``mask`` buffer (1 = kept, 0 = pruned).

    The forward pass uses ``weight · mask``, so the gradient of a pruned weight
    is zero; and the pruned entries of ``weight`` are kept exactly zero: after
    the mask changes, after a state_dict is loaded, and after every step of an
    optimizer hooked to the model with :func:`~vbdropout.nn.base.attach_optimizer`
    (as the trainer, the demo and the Lightning callback do; an optimizer with
    momentum or Adam's moments would otherwise move a pruned weight away from
    zero with a zero gradient). Plain code that reads
    ``weight`` (the compression report, export) therefore sees the pruned network.
    """

    optional_state: tuple[str, ...] = ("mask",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight))

    def after_optimizer_step(self) -> None:
        """Keep the pruned weights exactly zero after a step of the run's optimizer."""
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Set the pruned entries of ``weight`` to exactly zero."""
        self.weight.mul_(self.mask)

    @torch.no_grad()
    def set_mask_(self, keep: Tensor) -> None:
        """Replace the mask by ``keep`` (bool or 0/1, shaped like ``weight``) and apply it."""
        if keep.shape != self.weight.shape:
            raise ValueError(
                f"mask of shape {tuple(keep.shape)} for a weight of shape "
                f"{tuple(self.weight.shape)}"
            )
        self.mask.copy_(keep.to(self.mask.dtype))
        self.apply_mask_()

    def kept(self) -> int:
        """Number of weights the mask keeps."""
        return int(self.mask.count_nonzero())

    def _after_load(self, plain: bool) -> None:
        self.apply_mask_()
