"""One epoch of SGVLB training and the evaluation of a classifier, on in-memory tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import iterate_batches
from ..losses import elbo_terms
from ..nn.base import mc_sampling

__all__ = ["DivergenceError", "evaluate", "train_epoch"]


class DivergenceError(FloatingPointError):
    """The loss or KL became NaN or infinite."""


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    kl_weight: float,
    generator: torch.Generator | None = None,
    on_batch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One pass over (x, y) in shuffled minibatches minimizing the per-example negative ELBO.

    Returns the epoch means of ``loss``, ``nll`` (cross-entropy), ``kl`` and the
    training ``error`` (of the noisy forward passes).
    """
    model.train()
    start = time.perf_counter()
    n = x.shape[0]
    sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "wrong": 0.0}
    seen = 0
    for step, (xb, yb) in enumerate(
        iterate_batches(x, y, batch_size, shuffle=True, generator=generator)
    ):
        logits = model(xb)
        terms = elbo_terms(logits, yb, model, n, kl_weight, reduction="mean")
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        loss, kl = terms.loss.item(), terms.kl.item()
        if not (math.isfinite(loss) and math.isfinite(kl)):
            raise DivergenceError(f"loss={loss} kl={kl} at step {step}")
        b = yb.shape[0]
        seen += b
        sums["loss"] += loss * b
        sums["nll"] += terms.nll.item() * b
        sums["kl"] = kl
        sums["wrong"] += (logits.argmax(1) != yb).sum().item()
        if on_batch is not None:
            on_batch(step + 1, {"loss": sums["loss"] / seen, "error": sums["wrong"] / seen})
    return {
        "loss": sums["loss"] / seen,
        "nll": sums["nll"] / seen,
        "kl": sums["kl"],
        "train_error": sums["wrong"] / seen,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, mc_samples: int = 0
) -> dict[str, Any]:
    """Test error, NLL and ECE of the deterministic (pruned posterior-mean) network.

    With ``mc_samples = K > 0``, also of the predictive distribution averaged
    over K sampled forward passes (``mc_error``, ``mc_nll``).
    """
    model.eval()
    probs, mc_probs = [], []
    for xb, _ in iterate_batches(x, y, batch_size, shuffle=False):
        probs.append(model(xb).softmax(-1))
        if mc_samples:
            with mc_sampling(model):
                mc_probs.append(
                    torch.stack([model(xb).softmax(-1) for _ in range(mc_samples)]).mean(0)
                )
    result = _scores(torch.cat(probs), y)
    if mc_samples:
        result.update({f"mc_{k}": v for k, v in _scores(torch.cat(mc_probs), y).items()})
    return result


def _scores(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
    """Error, NLL and expected calibration error (equal-width confidence bins)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == y).float()
    which = (confidence * bins).long().clamp_max(bins - 1)
    count = torch.zeros(bins, device=probs.device).index_add_(0, which, torch.ones_like(confidence))
    gap = torch.zeros(bins, device=probs.device).index_add_(0, which, confidence - correct)
    return {
        "error": 1.0 - correct.mean().item(),
        "nll": F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
        "ece": (gap.abs().sum() / count.sum()).item(),
    }
