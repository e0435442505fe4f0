"""Magnitude pruning with retraining (Han et al. 2015, "Learning both weights and connections").

Han et al. train the network, remove the connections of smallest magnitude in
each layer, and retrain the rest with the removed ones held at zero; pruning
and retraining alternate a few times (iterative pruning). Here:

- a layer trains densely until its first pruning epoch;
- at the end of the epochs given by ``prune_at`` (fractions of the run, see
  :func:`~vbdropout.nn.epoch_hooks.epoch_at`) step k of n prunes the layer to
  sparsity 1 − (1 − s)^(k/n) — each step removes the same fraction of the
  surviving weights, reaching the target s at the last step. A step removes
  the kept weights of smallest |w| (per layer; once pruned, a weight stays
  pruned), so the count is exact rather than Han's threshold "quality × std";
- between and after the steps the network retrains with the mask fixed
  (:class:`~vbdropout.nn.penalized.MaskedWeight`: the pruned weights stay
  exactly zero through the optimizer's steps, Adam included);
- an L2 weight decay (Han et al. found L2 better than L1 when retraining):
  the ``pruning`` method uses λ = 5·10⁻⁴ per example, Caffe's LeNet solvers'.

The default schedule prunes after 25 %, 37.5 % and 50 % of the run, so that
the second half (the learning-rate decay of the compression protocol) retrains
the final sparse network. Default per-layer targets, :data:`HAN_SPARSITY`:
Han et al.'s Tables 1–2 by layer position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .epoch_hooks import check_fraction, epoch_at
from .penalized import MaskedWeight

__all__ = [
    "HAN_PRUNE_AT",
    "HAN_SPARSITY",
    "Conv2dPruning",
    "LinearPruning",
    "MagnitudePruning",
    "check_sparsity",
]

#: Fraction of each layer's weights pruned, by layer position (Han et al. 2015). Networks of
#: fully connected layers use ``"fc"`` (LeNet-300-100, Table 1: 92 / 91 / 74 % pruned);
#: networks with convolutions ``"conv"`` (LeNet-5, Table 2: conv 34 / 88 %, fc 92 / 81 %).
HAN_SPARSITY: dict[str, dict[str, float]] = {
    "fc": {
        "input": 0.92,
        "hidden": 0.91,
        "output": 0.74,
        "conv_input": 0.34,
        "conv_hidden": 0.88,
        "conv_output": 0.88,
    },
    "conv": {
        "input": 0.92,
        "hidden": 0.92,
        "output": 0.81,
        "conv_input": 0.34,
        "conv_hidden": 0.88,
        "conv_output": 0.88,
    },
}
#: The default pruning epochs, as fractions of the run.
HAN_PRUNE_AT: tuple[float, ...] = (0.25, 0.375, 0.5)


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """A fraction of pruned weights in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction of pruned weights in [0, 1), got {value!r}")
    return float(value)


def check_prune_at(prune_at: Sequence[float]) -> tuple[float, ...]:
    if isinstance(prune_at, (str, bytes)) or not isinstance(prune_at, Sequence) or not prune_at:
        raise ValueError(f"prune_at must be a non-empty sequence of fractions, got {prune_at!r}")
    steps = tuple(check_fraction(f, "every prune_at entry") for f in prune_at)
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"prune_at must be strictly increasing, got {prune_at!r}")
    return steps


class MagnitudePruning(MaskedWeight):
    """Mixin: Han et al.'s prune-and-retrain on ``weight``; see the module docstring."""

    def __init__(
        self,
        *args: Any,
        sparsity: float = 0.9,
        prune_at: Sequence[float] = HAN_PRUNE_AT,
        weight_decay: float = 0.0,
        dataset_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged.

        sparsity: the fraction of this layer's weights pruned in the end, in [0, 1).
        prune_at: the pruning epochs as increasing fractions of the run in (0, 1].
        weight_decay, dataset_size: the L2 term (see :class:`PenalizedWeight`); the
            ``pruning`` method passes Han's λ = 5·10⁻⁴.
        """
        super().__init__(*args, weight_decay=weight_decay, dataset_size=dataset_size, **kwargs)
        self.sparsity = sparsity
        self.prune_at = check_prune_at(prune_at)

    @property
    def sparsity(self) -> float:
        """The final fraction of pruned weights."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self._sparsity = check_sparsity(value)

    def step_sparsity(self, step: int) -> float:
        """The sparsity after pruning step ``step`` (1-based) of ``len(prune_at)``."""
        return 1.0 - (1.0 - self.sparsity) ** (step / len(self.prune_at))

    @torch.no_grad()
    def prune_(self, sparsity: float) -> None:
        """Prune the kept weights of smallest |w| until ``round(sparsity · |W|)`` are pruned."""
        sparsity = check_sparsity(sparsity)
        total = self.weight.numel()
        extra = round(sparsity * total) - (total - self.kept())
        if extra <= 0:
            return
        score = self.weight.abs().masked_fill(self.mask == 0, float("inf")).flatten()
        drop = torch.topk(score, extra, largest=False, sorted=False).indices
        keep = self.mask.flatten().clone()
        keep[drop] = 0
        self.set_mask_(keep.view_as(self.mask))

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Prune at the scheduled epochs (the last step due at this epoch wins)."""
        due = [k for k, f in enumerate(self.prune_at, 1) if epoch_at(f, epochs) == epoch]
        if due:
            self.prune_(self.step_sparsity(max(due)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity}, prune_at={self.prune_at}"


class LinearPruning(MagnitudePruning, torch.nn.Linear):
    """``nn.Linear`` pruned by magnitude and retrained (Han et al. 2015).

    ``LinearPruning(in_features, out_features, bias=True, *, sparsity=0.9, prune_at=...,
    weight_decay=0.0, dataset_size=None)``.
    """


class Conv2dPruning(MagnitudePruning, torch.nn.Conv2d):
    """``nn.Conv2d`` pruned by magnitude and retrained (same signature + pruning options)."""
