"""One epoch of SGVLB training and the evaluation of a classifier, on in-memory tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import iterate_batches
from ..losses import ElboTerms, elbo_terms
from ..nn.base import VariationalModule, mc_sampling

__all__ = ["DivergenceError", "evaluate", "make_adam", "train_epoch"]


class DivergenceError(FloatingPointError, RuntimeError):
    """The loss, the KL, a gradient or a parameter became NaN or infinite.

    Also a :class:`RuntimeError`, so that the command line reports it as a one-line error.
    """


def make_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam as every vbdropout training loop uses it: torch's fused kernel where it exists.

    The same update rule as the default implementation in one pass per parameter
    instead of about ten (the optimizer's share of a VBD step, whose parameters
    are twice a plain net's, shrinks most). Falls back to the default
    implementation where torch has no fused Adam for the parameters (CPU before
    torch 2.4, other devices, non-float parameters).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def _first_nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    """The name of the first tensor that holds a NaN or inf (``None`` tensors are skipped).

    Fast path: a NaN or inf makes a tensor's sum non-finite, so one sum per tensor and
    one device sync decide; only if that total is not finite (which an overflowing
    sum of huge finite values can also cause) are the tensors scanned elementwise.
    """
    items = [(name, t.detach()) for name, t in named if t is not None]
    sums = [t.sum().abs().float() for _, t in items]  # abs, float: any dtype stacks
    if not items or bool(torch.isfinite(torch.stack(sums).sum())):
        return None
    return next((name for name, t in items if not bool(torch.isfinite(t).all())), None)


def _checked_forward(model: nn.Module, x: Tensor, where: str) -> Tensor:
    """``model(x)``, with a layer's refusal of NaN/inf activations reported as divergence.

    Finite inputs and finite parameters can still overflow the activations (e.g.
    after a too large learning rate). The Gaussian layers then raise a
    ``FloatingPointError`` (non-finite output from a finite input), or a
    ``ValueError`` mentioning "NaN or inf" when an earlier layer produced them;
    for finite ``x`` both are divergence. A non-finite ``x`` stays a ``ValueError``.
    """
    try:
        return model(x)
    except (FloatingPointError, ValueError) as err:
        if isinstance(err, ValueError) and "NaN or inf" not in str(err):
            raise
        if not bool(torch.isfinite(x).all()):
            raise
        raise DivergenceError(
            f"{where}: the forward pass overflowed to NaN/inf ({err}; the update was not applied)"
        ) from err


def _checked_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, terms: ElboTerms, where: str
) -> tuple[float, float]:
    """Backward and optimizer step, refusing any update that is or makes the model non-finite.

    The loss and KL are checked before the backward pass and every gradient before
    the step, so a NaN/inf never reaches the parameters through an update; the
    parameters, and the variances σ² of the Gaussian layers they imply, are checked
    after it (a finite update can still overflow them).
    Returns the loss and KL as floats.
    """
    loss, kl = terms.loss.item(), terms.kl.item()
    if not (math.isfinite(loss) and math.isfinite(kl)):
        raise DivergenceError(f"{where}: loss={loss} kl={kl} (the update was not applied)")
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    params = list(model.named_parameters())
    bad = _first_nonfinite((name, p.grad) for name, p in params)
    if bad is not None:
        raise DivergenceError(
            f"{where}: the gradient of {bad} is NaN/inf at loss={loss} kl={kl} "
            f"(the update was not applied)"
        )
    optimizer.step()
    bad = _first_nonfinite(params)
    if bad is not None:
        raise DivergenceError(
            f"{where}: parameter {bad} became NaN/inf in the update (learning rate too large?)"
        )
    flagged = [
        (name, flag)
        for name, m in model.named_modules()
        if isinstance(m, VariationalModule) and (flag := m.variance_overflows()) is not None
    ]
    if flagged:  # finite parameters can still imply σ² = exp(log σ²) = inf
        overflows = torch.stack([flag for _, flag in flagged])
        if bool(overflows.any()):  # one sync
            flags = overflows.tolist()
            bad = next(name for (name, _), flag in zip(flagged, flags, strict=True) if flag)
            raise DivergenceError(
                f"{where}: the update made {bad}.sigma2 = exp(log σ²) overflow to inf "
                f"(learning rate too large?)"
            )
    return loss, kl


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    kl_weight: float | Callable[[float], float],
    generator: torch.Generator | None = None,
    on_batch: Callable[[int, dict[str, float]], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """One pass over (x, y) in shuffled minibatches minimizing the per-example negative ELBO.

    ``kl_weight``: β, or β as a function of the fraction of the epoch done before a step
    (0 at its first step). Returns the epoch means of ``loss``, ``nll`` (cross-entropy),
    the last step's ``kl`` and β (``kl_weight``), and the training ``error`` (of the noisy
    forward passes). Raises :class:`DivergenceError`
    (naming the step and the quantity) instead of applying an update when the loss,
    the KL or a gradient is NaN/inf, or when an update makes a parameter NaN/inf.
    ``shard=(rank, world)``: this worker's share of every (global) batch.
    """
    rank, world = shard
    model.train()
    start = time.perf_counter()
    n = x.shape[0]
    steps = -(-n // batch_size)
    sums = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "wrong": 0.0}
    seen, beta = 0, 0.0
    for step, (xb, yb) in enumerate(
        iterate_batches(x, y, batch_size, shuffle=True, generator=generator)
    ):
        where = f"step {step + 1}/{steps}"
        if world > 1:
            xb, yb = xb[rank::world], yb[rank::world]
        beta = kl_weight(step / steps) if callable(kl_weight) else kl_weight
        logits = _checked_forward(model, xb, where)
        terms = elbo_terms(logits, yb, model, n, beta, reduction="mean")
        loss, kl = _checked_step(model, optimizer, terms, where)
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
        "kl_weight": beta,
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
    if not (isinstance(mc_samples, int) and mc_samples >= 0):
        raise ValueError(f"mc_samples must be an integer >= 0, got {mc_samples!r}")
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
