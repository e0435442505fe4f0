"""Signs that a run went wrong without diverging: a method's end-of-run step that breaks
the network (then undone), a final training NLL far off, a test error near chance, a KL
warm-up that outlasted the run."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..models.methods import Method
from .config import TrainConfig
from .loop import evaluate

__all__ = ["chance_warning", "final_epoch_end", "run_warnings", "warmup_warning"]


@torch.no_grad()
def final_epoch_end(
    method: Method,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    config: TrainConfig,
    classes: int,
) -> str | None:
    """The last epoch's :meth:`Method.epoch_end`, undone if it breaks the network.

    A method's end-of-run step taken before its state has settled can destroy the
    network: soft weight-sharing's quantization after 1 epoch put every weight in
    the zero component (89.9% test error). If the step loses more than half of the
    network's margin over chance on (up to 10000) training examples, the state from
    before it is restored; returns what was done then (``None``: the step was kept).
    A step that changes nothing (most methods') is not evaluated; one that does holds
    three copies of the state while it is judged, and must keep the state's keys.
    """
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    method.epoch_end(model, epoch, config.epochs)
    after_state = model.state_dict()
    if all(_same(after_state[k], v) for k, v in before_state.items()):
        return None
    after_state = {k: v.clone() for k, v in after_state.items()}
    sample = slice(0, min(x.shape[0], 10000))
    after = evaluate(model, x[sample], y[sample])["error"]
    model.load_state_dict(before_state)
    before = evaluate(model, x[sample], y[sample])["error"]
    chance = 1 - 1 / classes
    if before >= chance or after - before <= 0.5 * (chance - before):
        model.load_state_dict(after_state)
        return None
    return (
        f"the end-of-run step of --method {config.method} (for sws: quantizing the weights) "
        f"raised the training error from {100 * before:.1f}% to {100 * after:.1f}%, so it was "
        f"undone: the network keeps its weights from before it (train longer for it to apply)"
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (DNS keeps NaN statistics until its surgery starts)."""
    if torch.equal(a, b):
        return True
    return (
        a.is_floating_point()
        and a.shape == b.shape
        and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


def run_warnings(history: list[dict[str, Any]], test_error: float, classes: int) -> list[str]:
    """Signs of a broken run that did not diverge: a final training NLL far above its best
    (more than twice it and 0.5 nats above) or above 2·log(classes) (far worse than a
    uniform guess, whose NLL is log(classes)); a test error near chance (≥ 1 − 2/classes)."""
    found = []
    if history:
        best = min(history, key=lambda row: row["nll"])
        last = history[-1]["nll"]
        if last > 2 * best["nll"] and last > best["nll"] + 0.5:
            found.append(
                f"the final training NLL {last:.4g} is far above its best {best['nll']:.4g} "
                f"(epoch {best['epoch']}): training went wrong (learning rate too large?)"
            )
        elif last > 2 * math.log(classes):
            found.append(
                f"the final training NLL {last:.4g} is far above that of a uniform guess "
                f"({math.log(classes):.3g}): training went wrong (learning rate too large?)"
            )
    return found + chance_warning(test_error, classes)


def chance_warning(test_error: float, classes: int) -> list[str]:
    """A test error near chance (≥ 1 − 2/classes): the network is not working."""
    if test_error < 1 - 2 / classes:
        return []
    return [
        f"test error {100 * test_error:.1f}% is near chance ({100 * (1 - 1 / classes):.0f}% "
        f"for {classes} classes): the network is not working"
    ]


def warmup_warning(config: TrainConfig, history: list[dict[str, Any]]) -> list[str]:
    """A run with a KL term that ended before its warm-up did: its last β (``kl_weight``
    over ``kl_scale``) below 1, so it was not trained to the ELBO (β = 0 throughout: by its
    likelihood alone). A run may be stopped early on purpose and continued with
    ``--resume --epochs``: a warning, not an error."""
    start, end = config.kl_warmup
    if not history or end <= config.epochs or all(row["kl"] == 0 for row in history):
        return []
    beta = history[-1]["kl_weight"] / config.kl_scale
    reached = (
        "stayed 0 (no KL: trained by the likelihood alone)"
        if beta == 0
        else (f"reached {beta:.2g} of 1")
    )
    return [
        f"training ended after epoch {config.epochs}, before its KL warm-up (epochs {start} to "
        f"{end}) did: β {reached}, so the model is not the method's; continue with vbd train "
        f"--resume --out {config.out} --epochs {end} (or more)"
    ]
