"""Dynamic network surgery (Guo, Yao & Chen 2016).

The layer keeps every weight W and a binary mask T and computes with W ⊙ T.
Pruning is not final: during training the mask is updated by

    T = 0 where |W| < a,   T = 1 where |W| > b,   T unchanged where a ≤ |W| ≤ b,

(pruning, and splicing a pruned connection back when it regains magnitude),
with a < b derived from the layer's weights when surgery starts, as Guo et
al.'s code does: t = max(μ + c·σ, 0) over the kept |W| (mean μ, std σ), a =
0.9·t, b = 1.1·t, c the layer's ``c_rate``. The gradient reaches every
weight, masked or not (straight-through: ∂L/∂W = ∂L/∂(W ⊙ T)), so a pruned
weight keeps learning and can be spliced back. The mask is updated at a
training step with probability (1 + γ·iter)^(−power), iter counting the
training steps since surgery started; the layer counts them in its forward.

Guo et al. start surgery from a pretrained network. From scratch, statistics
of the random initialization would prune nearly everything at once, so surgery
starts after a fraction ``start`` of the run (dense training before it; set
``start=0`` when starting from a trained net) and stops after ``stop``
(Guo's ``iter_stop``); both are applied by :meth:`NetworkSurgery.on_epoch_end`.
After the last epoch the hidden values of the pruned weights are dropped
(W ← W ⊙ T): the result is Guo et al.'s final network and ``weight`` itself
holds the zeros that the compression report counts. Before that, ``weight``
holds the hidden values and :meth:`masked_weight` gives W ⊙ T. Biases are not
pruned (the compression ratio counts weights only). The ``dns`` method adds
Caffe's L2 weight decay 5·10⁻⁴ on W.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .epoch_hooks import check_fraction, epoch_at
from .penalized import LearnedMask, check_nonnegative

__all__ = ["DNS_C_RATE", "Conv2dDNS", "LinearDNS", "NetworkSurgery"]

#: Default ``c_rate`` by layer position, for networks of fully connected layers
#: (``"fc"``) and networks with convolutions (``"conv"``). Measured so that the
#: threshold t = μ + c·σ of a trained layer sits at Guo et al.'s final sparsity of that
#: layer (LeNet-300-100: 98.2 / 98.2 / 94.5 % pruned; LeNet-5: 86 / 97 / 99.3 / 96 %),
#: on plain nets trained with Adam on MNIST (LeNet-300-100 10 epochs, LeNet-5 3 epochs
#: on 20k images): c = (quantile(|W|, s) − μ) / σ gave 2.99 / 2.87 / 1.87 and
#: 1.19 / 2.22 / 3.21 / 1.85.
DNS_C_RATE: dict[str, dict[str, float]] = {
    "fc": {
        "input": 3.0,
        "hidden": 2.9,
        "output": 1.9,
        "conv_input": 1.2,
        "conv_hidden": 2.2,
        "conv_output": 1.9,
    },
    "conv": {
        "input": 3.2,
        "hidden": 3.2,
        "output": 1.9,
        "conv_input": 1.2,
        "conv_hidden": 2.2,
        "conv_output": 1.9,
    },
}


def check_c_rate(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"c_rate must be a finite number, got {value!r}")
    return float(value)


class NetworkSurgery(LearnedMask):
    """Mixin: Guo et al.'s pruning and splicing of ``weight``; see the module docstring."""

    optional_state: tuple[str, ...] = ("mask", "iteration", "active", "stats")

    def __init__(
        self,
        *args: Any,
        c_rate: float = 2.0,
        gamma: float = 1e-4,
        power: float = 1.0,
        start: float = 0.25,
        stop: float = 1.0,
        weight_decay: float = 0.0,
        dataset_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged.

        c_rate: c in the threshold t = max(μ + c·σ, 0) of the kept |W|.
        gamma, power: the mask update probability (1 + γ·iter)^(−power).
        start, stop: surgery runs from the end of a fraction ``start`` of the run
            (0: from the first step) to the end of a fraction ``stop`` (> start).
        weight_decay, dataset_size: the L2 term on W (see :class:`PenalizedWeight`).
        """
        super().__init__(*args, weight_decay=weight_decay, dataset_size=dataset_size, **kwargs)
        self.c_rate = c_rate
        self.gamma = check_nonnegative(gamma, "gamma")
        self.power = check_nonnegative(power, "power")
        self.start = check_fraction(start, "start", allow_zero=True)
        self.stop = check_fraction(stop, "stop")
        if self.stop <= self.start:
            raise ValueError(f"stop must come after start, got start={start}, stop={stop}")
        self.register_buffer("mask", torch.ones_like(self.weight))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("active", torch.tensor(self.start == 0))
        # μ and σ of the kept |W| when surgery started (NaN before)
        self.register_buffer("stats", torch.full((2,), math.nan, dtype=self.weight.dtype))

    @property
    def c_rate(self) -> float:
        return self._c_rate

    @c_rate.setter
    def c_rate(self, value: float) -> None:
        self._c_rate = check_c_rate(value)

    def thresholds(self) -> tuple[float, float]:
        """(a, b): weights below a are pruned, above b spliced (NaN before surgery starts)."""
        mu, sigma = self.stats.tolist()
        t = max(mu + self.c_rate * sigma, 0.0)
        return 0.9 * t, 1.1 * t

    def update_probability(self) -> float:
        """The probability that this training step updates the mask."""
        return (1.0 + self.gamma * int(self.iteration)) ** (-self.power)

    @torch.no_grad()
    def surgery_(self) -> None:
        """Update the mask: prune |W| < a, splice |W| > b (computing a, b the first time)."""
        magnitude = self.weight.abs()
        if torch.isnan(self.stats).any():
            kept = magnitude[(self.mask != 0) & (self.weight != 0)]
            if kept.numel() == 0:
                return
            std = kept.std(unbiased=False) if kept.numel() > 1 else kept.new_zeros(())
            self.stats.copy_(torch.stack([kept.mean(), std]))
        a, b = self.thresholds()
        self.mask.masked_fill_(magnitude < a, 0).masked_fill_(magnitude > b, 1)

    @torch.no_grad()
    def _training_step(self) -> None:
        if not bool(self.active):
            return
        if torch.rand(()).item() < self.update_probability():
            self.surgery_()
        self.iteration += 1

    def training_weight(self) -> Tensor:
        """W ⊙ T in value, with the gradient passed to every entry of W (straight-through)."""
        self._training_step()
        w = self.weight
        return w * self.mask + (w - w.detach()) * (1 - self.mask)

    @torch.no_grad()
    def finalize_(self) -> None:
        """Drop the hidden values of the pruned weights (W ← W ⊙ T) and stop surgery."""
        self.weight.mul_(self.mask)
        self.active.fill_(False)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Switch surgery on/off for the next epoch; finalize after the last one."""
        if epoch == epochs - 1:
            self.finalize_()
            return
        first = 0 if self.start == 0 else epoch_at(self.start, epochs) + 1
        end = epoch_at(self.stop, epochs) + 1
        self.active.fill_(first <= epoch + 1 < end)

    def kept(self) -> int:
        return int(self.mask.count_nonzero())

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, c_rate={self.c_rate}, gamma={self.gamma}, "
            f"power={self.power}, start={self.start}, stop={self.stop}"
        )


class LinearDNS(NetworkSurgery, torch.nn.Linear):
    """``nn.Linear`` with dynamic network surgery (Guo et al. 2016).

    ``LinearDNS(in_features, out_features, bias=True, *, c_rate=2.0, gamma=1e-4, power=1.0,
    start=0.25, stop=1.0, weight_decay=0.0, dataset_size=None)``.
    """


class Conv2dDNS(NetworkSurgery, torch.nn.Conv2d):
    """``nn.Conv2d`` with dynamic network surgery (same signature + surgery options)."""
