"""The training objective: the negative evidence lower bound (SGVLB).

For a training set of N examples and a minibatch B, the negative ELBO of
Eq. (18) is estimated without bias by

    L = N · mean_{(x, y) ∈ B} [−log p(y | x, W)] + β · KL(q(W) || p(W)),

with W drawn by the local reparameterization trick and β = 1 for the true
ELBO (β < 1 during a KL warm-up). ``reduction="mean"`` returns L / N — the same
gradient direction, per-example units, convenient for SGD learning rates.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.base import VariationalModule, check_dataset_size

__all__ = ["ElboTerms", "elbo_loss", "elbo_terms", "kl_divergence"]


def kl_divergence(model: nn.Module) -> Tensor:
    """Sum of ``kl()`` over every :class:`~vbdropout.nn.VariationalModule` in ``model``."""
    terms = [m.kl() for m in model.modules() if isinstance(m, VariationalModule)]
    if terms:
        return torch.stack(terms).sum()
    param = next(model.parameters(), None)
    return torch.zeros((), device=None if param is None else param.device)


class ElboTerms(NamedTuple):
    """The negative ELBO and its parts: mean cross-entropy of the batch and total KL."""

    loss: Tensor
    nll: Tensor
    kl: Tensor


def elbo_terms(
    logits: Tensor,
    targets: Tensor,
    model: nn.Module,
    dataset_size: int,
    kl_weight: float | Tensor = 1.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> ElboTerms:
    """Like :func:`elbo_loss`, also returning the mean cross-entropy and the KL.

    ``kl_weight`` may also be a 0-dim float tensor (a compiled training step's β, which
    changes at every step of a KL warm-up without a recompilation); its value is then
    not checked, since that would read it back to the host.
    """
    check_dataset_size(dataset_size)
    if isinstance(kl_weight, Tensor):
        if kl_weight.dim() != 0 or not kl_weight.is_floating_point():
            raise ValueError(
                f"a tensor kl_weight must be a 0-dim float tensor, got shape "
                f"{tuple(kl_weight.shape)} and dtype {kl_weight.dtype}"
            )
    elif not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits of shape (B, C) and targets of shape (B,), "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("got an empty batch: its mean cross-entropy is undefined")
    nll = F.cross_entropy(logits, targets)
    kl = kl_divergence(model)
    loss = dataset_size * nll + kl_weight * kl
    return ElboTerms(loss / dataset_size if reduction == "mean" else loss, nll, kl)


def elbo_loss(
    logits: Tensor,
    targets: Tensor,
    model: nn.Module,
    dataset_size: int,
    kl_weight: float | Tensor = 1.0,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """Negative ELBO of a classifier: N·mean cross-entropy + β·KL (see module docstring).

    logits: (B, C) outputs of ``model`` on the minibatch; targets: (B,) class indices.
    dataset_size: N, the number of training examples the data term is scaled to.
    kl_weight: β ≥ 0. reduction: ``sum`` (the negative ELBO) or ``mean`` (divided by N).
    """
    return elbo_terms(logits, targets, model, dataset_size, kl_weight, reduction).loss
