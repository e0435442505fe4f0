"""The contract every stochastic-regularization module of vbdropout follows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = [0]  # steps taken by any torch optimizer in this process


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def state_key(tensors: Iterable[Tensor]) -> tuple[int, ...]:
    """A cache key that changes whenever one of ``tensors`` may have changed.

    Made of every tensor's in-place version counter and storage address, and the
    number of torch optimizer steps taken in this process: torch's fused
    optimizers (``Adam(fused=True)``) update parameters without bumping their
    version counters.
    """
    key = [_optimizer_steps[0]]
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
