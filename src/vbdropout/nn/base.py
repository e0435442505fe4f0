"""The contract every stochastic-regularization module of vbdropout follows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# Bumped by every step of an optimizer hooked with attach_optimizer and every train()/eval()
# of a StochasticModule: the part of state_key that in-place version counters miss.
_state_changes = [0]


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Hook ``model`` to ``optimizer``: after each of its steps, the layers it updated react.

    Every :class:`StochasticModule` of ``model`` holding a parameter of ``optimizer``
    runs :meth:`~StochasticModule.after_optimizer_step` (a pruned layer zeroes its
    pruned weights again), and :func:`state_key` changes. Training loops call it once
    per run with the run's optimizer (the trainer, the demo, the Lightning callback);
    other optimizers are left alone. The modules are those ``model`` has now.
    Returns the handle that removes the hook.
    """
    modules = [m for m in model.modules() if isinstance(m, StochasticModule)]

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        optimizer_stepped(
            m for m in modules if any(id(p) in stepped for p in m.parameters(recurse=False))
        )

    return optimizer.register_step_post_hook(after_step)


def optimizer_stepped(modules: Iterable[StochasticModule]) -> None:
    """An optimizer step changed the parameters of ``modules``: each runs
    :meth:`~StochasticModule.after_optimizer_step`, and :func:`state_key` changes.

    What :func:`attach_optimizer`'s hook does; called directly where the parameters are
    stepped through other tensors (the stacked replicas of :mod:`vbdropout.train.replicas`).
    """
    _state_changes[0] += 1
    for module in modules:
        module.after_optimizer_step()


def check_dataset_size(
    dataset_size: int | None, missing: str | None = None, optional: bool = False
) -> int | None:
    """N, the number of training examples, as a positive int, else a ValueError.

    ``None`` is returned as is with ``optional``; else it is an error, with the
    message ``missing`` where given. The one check of N for layers, methods and losses.
    """
    if dataset_size is None and (optional or missing is not None):
        if optional:
            return None
        raise ValueError(missing)
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    return dataset_size


def state_key(tensors: Iterable[Tensor]) -> tuple[int, ...]:
    """A cache key that changes whenever one of ``tensors`` may have changed.

    Made of every tensor's in-place version counter and storage address, and a
    counter of the steps of the optimizers hooked with :func:`attach_optimizer` and
    of train/eval switches of stochastic modules: torch's fused optimizers
    (``Adam(fused=True)``) update parameters without bumping their version counters,
    so an unhooked one's steps are seen at the model's next ``train()``/``eval()``.
    """
    key = [_state_changes[0]]
    for t in tensors:
        key += (t._version, t.data_ptr())
    return tuple(key)


def standard_normal_like(t: Tensor) -> Tensor:
    """N(0, 1) noise shaped and strided like ``t``, drawn at the speed of a contiguous draw.

    torch fills a non-contiguous tensor (e.g. channels-last activations) with normal
    numbers one element at a time, several times slower than its vectorized
    contiguous path; so a dense ``t`` in any memory order is sampled as the
    contiguous tensor of its memory layout and then viewed with ``t``'s strides.
    """
    if t.is_contiguous():
        return torch.randn_like(t)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost first
    if not t.permute(order).is_contiguous():  # not a dense layout: no fast path
        return torch.randn_like(t)
    dense = torch.randn([t.shape[d] for d in order], dtype=t.dtype, device=t.device)
    return dense.permute([order.index(d) for d in range(t.dim())])


class StochasticModule(nn.Module):
    """A module whose forward pass draws noise in training mode.

    ``mc = True`` makes it sample in evaluation mode too (Monte-Carlo predictions,
    see :func:`mc_sampling`); otherwise evaluation is deterministic.
    """

    mc: bool = False
    # whether forward raises on a NaN/inf output (a host sync per call where a layer
    # checks it); training loops that check once per epoch turn it off for the epoch
    check_finite: bool = True

    def train(self, mode: bool = True) -> StochasticModule:
        """``nn.Module.train``; also changes :func:`state_key` (caches are rebuilt)."""
        _state_changes[0] += 1
        return super().train(mode)

    def sampling(self) -> bool:
        """Whether the forward pass draws noise now (training, or MC evaluation)."""
        return self.training or self.mc

    def deterministic(self) -> nn.Module | None:
        """The plain module that computes this one's evaluation output (``None``: the identity).

        Every stochastic module defines it; :func:`~.deterministic.to_deterministic`
        builds a whole model's plain equivalent from it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define its evaluation-time equivalent"
        )

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Training events after epoch ``epoch`` (from 0) of a run of ``epochs``; none here.

        Called by :func:`~vbdropout.nn.epoch_hooks.epoch_end`.
        """

    def after_optimizer_step(self) -> None:
        """React to a step of the run's optimizer on this module's parameters; nothing here.

        Called by the hook of :func:`attach_optimizer`.
        """


class VariationalModule(StochasticModule):
    """A stochastic module that contributes a term to the training objective.

    ``kl()`` returns that term as a scalar tensor in nats for the whole
    training set: a KL divergence for variational methods, the matching
    regularizer for the others. :func:`vbdropout.kl_divergence` sums it over a
    model, so the trainer never needs to know which method it runs.
    """

    def kl(self) -> Tensor:
        raise NotImplementedError

    def variance_overflows(self) -> Tensor | None:
        """Whether the finite parameters imply a noise variance that overflows to inf
        (a 0-dim bool tensor, read once per step by the training loop); ``None`` for a
        module whose variances cannot overflow."""
        return None


@contextmanager
def mc_sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every stochastic module of ``model`` samples in eval mode.

    >>> with mc_sampling(model):
    ...     probs = torch.stack([model(x).softmax(-1) for _ in range(32)]).mean(0)
    """
    modules = [m for m in model.modules() if isinstance(m, StochasticModule)]
    before = [m.mc for m in modules]
    for m in modules:
        m.mc = enabled
    try:
        yield model
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.mc = flag
