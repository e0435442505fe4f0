"""Adversarial dropout (Park, Park, Shin & Moon, AAAI 2018), virtual variant with KL.

Dropout at one layer is not drawn at random but chosen, within a small Hamming
distance of a random mask, to change the network's prediction the most:

    ε_adv = argmax_{ε : ‖ε − ε_s‖₀ ≤ δ·H} D[f(x; ε_s), f(x; ε)],
    loss  = CE(y, f(x; ε_s)) + λ · D[f(x; ε_s), f(x; ε_adv)],

with ε_s a random Bernoulli mask, H the number of units under the mask and D
the KL divergence between the two predictive distributions (Park et al.'s
"VAdD-KL"). The argmax is approximated in one step (their Algorithm 1): with
the gradient J = ∂D/∂ε, flipping unit i changes D by about J_i·(1 − 2ε_i), so
the ⌊δ·H⌋ flips with the largest positive gain are made, per example.

The gradient of D at ε = ε_s vanishes when both sides share every other noise
(KL is at its minimum there). As in Park et al.'s code, the second branch
therefore draws its own dropout masks in the other layers: it starts from the
same ε_s at the adversarial layer, J is taken there, and the adversarial
forward pass reuses the second branch's other masks. Both sides keep their
gradient in λ·D, as in that code.

Because the mask search needs the whole network, it lives in a wrapper,
:class:`AdversarialDropoutNet`, whose ``kl()`` is λ·N·D of its last training
forward (nats for the whole training set: the trainer divides by N). The
layers only mark where dropout happens: :class:`AdversarialDropout` where the
mask is searched (Park et al. put it on the last hidden layer),
:class:`~vbdropout.nn.dropout.BernoulliDropout` elsewhere. Defaults from Park
et al.'s code and README: rate p = 0.5 at the adversarial layer, δ = 0.05,
λ = 1 (they also ramp λ up over the first 80 epochs — a schedule, not included).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import VariationalModule, check_dataset_size
from .deterministic import to_deterministic
from .dropout import BernoulliDropout

__all__ = ["AdversarialDropout", "AdversarialDropoutNet", "adversarial_flip", "divergence"]


class AdversarialDropout(BernoulliDropout):
    """A Bernoulli dropout layer whose mask :class:`AdversarialDropoutNet` makes adversarial.

    On its own (or in evaluation) it is plain inverted dropout of rate ``p``.
    After a training forward of the wrapper, ``start_mask`` is the random mask
    ε_s the search started from and ``last_mask`` the adversarial mask ε_adv.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.start_mask: Tensor | None = None


def divergence(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target_logits) || softmax(logits)) per example, shape (B,)."""
    return F.kl_div(
        logits.log_softmax(-1), target_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def adversarial_flip(mask: Tensor, jacobian: Tensor, budget: int) -> Tensor:
    """Park et al.'s Algorithm 1: flip at most ``budget`` mask entries per example.

    Flipping entry i changes D by about ``jacobian[i]·(1 − 2·mask[i])`` (first
    order); the entries with the largest positive gains are flipped. ``mask``
    is 0/1 of shape (B, ...); returns a new 0/1 mask of the same shape.
    """
    if mask.shape != jacobian.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and jacobian {tuple(jacobian.shape)} differ")
    flat = mask.reshape(mask.shape[0], -1)
    units = flat.shape[1]
    k = min(int(budget), units)
    if k <= 0:
        return mask.clone()
    gain = jacobian.reshape(flat.shape) * (1.0 - 2.0 * flat)
    values, index = gain.topk(k, dim=1)
    flip = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, values > 0)
    return torch.where(flip, 1.0 - flat, flat).reshape(mask.shape)


class AdversarialDropoutNet(VariationalModule):
    """Wraps a network that contains :class:`AdversarialDropout` layers.

    Training forward (three passes of ``network``): (1) random masks everywhere
    → the returned logits f(x; ε_s); (2) fresh random masks in the other
    dropout layers, ε_s at the adversarial layers → J = ∂D/∂ε; (3) the same
    other masks, ε_adv at the adversarial layers → D = KL(f(x; ε_s) || f(x; ε_adv))
    averaged over the batch. ``kl()`` returns λ·N·D. Evaluation runs
    ``network`` unchanged (dropout off, or random masks under ``mc``).

    Args:
        network: the model; its dropout layers are found by type.
        dataset_size: N, the number of training examples.
        delta: δ, the largest fraction of an adversarial layer's units per example to flip.
        lam: λ, the weight of the divergence per example.
    """

    def __init__(
        self, network: nn.Module, dataset_size: int, delta: float = 0.05, lam: float = 1.0
    ) -> None:
        super().__init__()
        check_dataset_size(dataset_size)
        if not (isinstance(delta, (int, float)) and 0.0 <= delta <= 1.0):
            raise ValueError(f"delta must be a fraction in [0, 1], got {delta!r}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        self.network = network
        self.dataset_size = dataset_size
        self.delta = float(delta)
        self.lam = float(lam)
        self._divergence: Tensor | None = None

    def __getitem__(self, index: int) -> nn.Module:
        return self.network[index]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.network)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.network)  # type: ignore[call-overload]

    def _dropout_layers(self) -> list[BernoulliDropout]:
        return [m for m in self.network.modules() if isinstance(m, BernoulliDropout)]

    def forward(self, x: Tensor) -> Tensor:
        self._divergence = None
        layers = self._dropout_layers()
        for layer in layers:
            layer.mc, layer.mask = self.mc, None
        adversarial = [m for m in layers if isinstance(m, AdversarialDropout)]
        if not self.training or not adversarial or x.shape[0] == 0:
            return self.network(x)  # (an empty batch has no adversarial term)
        others = [m for m in layers if not isinstance(m, AdversarialDropout)]
        try:
            logits = self.network(x)  # (1) random masks ε_s
            target = logits.detach()
            starts = [m.last_mask for m in adversarial]
            with torch.enable_grad():  # (2) J at ε_s, other masks redrawn
                probes = [s.clone().requires_grad_(True) for s in starts]  # type: ignore[union-attr]
                for m, probe in zip(adversarial, probes, strict=True):
                    m.mask = probe
                d = divergence(target, self.network(x)).sum()
                grads = torch.autograd.grad(d, probes, allow_unused=True)
            for m in others:
                m.mask = m.last_mask
            for m, start, grad in zip(adversarial, starts, grads, strict=True):
                units = start[0].numel()  # type: ignore[index]
                jac = torch.zeros_like(start) if grad is None else grad
                m.start_mask = start
                m.mask = adversarial_flip(start, jac, math.floor(self.delta * units + 1e-9))  # type: ignore[arg-type]
            adv_logits = self.network(x)  # (3) ε_adv, same other masks as (2)
        finally:
            for layer in layers:
                layer.mask = None
        self._divergence = divergence(logits, adv_logits).mean()
        return logits

    def deterministic(self) -> nn.Module:
        """Evaluation is the wrapped network with dropout off."""
        return to_deterministic(self.network)

    def kl(self) -> Tensor:
        """λ·N·D of the last training forward (zero after an evaluation forward)."""
        if self._divergence is None:
            param = next(self.parameters(), None)
            return torch.zeros((), device=None if param is None else param.device)
        return self.lam * self.dataset_size * self._divergence

    def extra_repr(self) -> str:
        return f"dataset_size={self.dataset_size}, delta={self.delta}, lam={self.lam}"

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles drop the last divergence (a graph, not state)."""
        state = self.__dict__.copy()
        state["_divergence"] = None
        return state
