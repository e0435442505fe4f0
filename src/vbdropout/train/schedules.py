"""Schedules of the compression protocols (Molchanov et al. 2017) as functions of the epoch."""

from __future__ import annotations

__all__ = ["kl_weight", "lr_factor"]


def kl_weight(progress: float, warmup_start: int, warmup_end: int) -> float:
    """β after ``progress`` epochs of training: 0 before ``warmup_start``, linear to 1 at
    ``warmup_end``, then 1.

    The sparse VD protocol uses (5, 20): β = (t − 5)/15 for 5 ≤ t < 20. ``vbd train``
    asks at every step (``progress`` = epoch + step/steps), so β rises smoothly, also
    through a warm-up shorter than an epoch; a per-epoch loop (the demo, Lightning's
    ``KLWarmup``) passes the epoch and keeps β through each epoch at its value at the start.
    """
    if progress < warmup_start:
        return 0.0
    if progress >= warmup_end:
        return 1.0
    return (progress - warmup_start) / (warmup_end - warmup_start)


def lr_factor(epoch: int, epochs: int, decay_start: int | None) -> float:
    """Learning-rate multiplier: 1 until ``decay_start``, then linear to 0 at ``epochs``.

    ``decay_start=None`` keeps the rate constant. The sparse VD protocol decays
    from epoch 100 of 200.
    """
    if decay_start is None or epoch < decay_start:
        return 1.0
    return max(0.0, (epochs - epoch) / (epochs - decay_start))
