"""Training events at epoch boundaries: one generic hook, no method special-cased.

Some methods change their layers between epochs: Han et al.'s pruning prunes
at scheduled epochs and then retrains, dynamic network surgery switches its
mask updates on and off and fixes its masks at the end, soft weight-sharing
quantizes the weights after the last epoch, SSL removes the groups that
reached zero. Such a module overrides ``on_epoch_end(epoch, epochs)`` of
:class:`~vbdropout.nn.base.StochasticModule` (``epoch`` counts from 0;
``epochs`` is the length of the whole run), and every training loop (the
trainer, the demo, the Lightning callback) calls :func:`epoch_end` — through
the method's :meth:`~vbdropout.models.methods.Method.epoch_end` — once after
every epoch's optimizer steps, before evaluating or saving the model::

    for epoch in range(epochs):
        train_epoch(model, optimizer, ...)
        epoch_end(model, epoch, epochs)
        evaluate(model, ...); save_checkpoint(...)

Everything the hooks change lives in parameters and buffers, so a checkpoint
written after :func:`epoch_end` resumes exactly. Schedules are given as
fractions of the run (:func:`epoch_at`), so they follow ``epochs``.
"""

from __future__ import annotations

from torch import nn

from .base import StochasticModule

__all__ = ["check_fraction", "epoch_at", "epoch_end"]


def _check_epoch(epoch: int, epochs: int) -> None:
    for name, value in (("epoch", epoch), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"need 0 <= epoch < epochs, got epoch={epoch}, epochs={epochs}")


def epoch_end(model: nn.Module, epoch: int, epochs: int) -> None:
    """Call ``on_epoch_end(epoch, epochs)`` on every stochastic module of ``model``.

    epoch: the epoch that just finished, counted from 0; epochs: the run's length.
    Each module is called once, in :meth:`~torch.nn.Module.modules` order.
    """
    _check_epoch(epoch, epochs)
    for module in model.modules():
        if isinstance(module, StochasticModule):
            module.on_epoch_end(epoch, epochs)


def epoch_at(fraction: float, epochs: int) -> int:
    """The epoch (from 0) after which a fraction of a run of ``epochs`` epochs is done.

    ``fraction`` in (0, 1]: ``round(fraction · epochs)`` epochs done, at least one;
    e.g. 0.25 of 200 epochs is the end of epoch 49, 1.0 the end of the last one.
    """
    return min(max(1, round(fraction * epochs)), epochs) - 1


def check_fraction(value: float, name: str, allow_zero: bool = False) -> float:
    """``value`` as a float in (0, 1] (or [0, 1] with ``allow_zero``), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a fraction of the run, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):  # also rejects NaN
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a fraction of the run in {interval}, got {value!r}")
    return float(value)
