"""The contract every stochastic-regularization module of vbdropout follows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


class VariationalModule(nn.Module):
    """A module that contributes a term to the training objective.

    ``kl()`` returns that term as a scalar tensor in nats for the whole
    training set: a KL divergence for variational methods, the matching
    regularizer for the others. :func:`vbdropout.kl_divergence` sums it over a
    model, so the trainer never needs to know which method it runs.

    ``mc`` switches evaluation to sampling (Monte-Carlo predictions); in
    training mode a module always samples.
    """

    mc: bool = False

    def kl(self) -> Tensor:
        raise NotImplementedError

    def sampling(self) -> bool:
        """Whether the forward pass draws noise now (training, or MC evaluation)."""
        return self.training or self.mc


@contextmanager
def mc_sampling(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every variational module of ``model`` samples in eval mode.

    >>> with mc_sampling(model):
    ...     probs = torch.stack([model(x).softmax(-1) for _ in range(32)]).mean(0)
    """
    modules = [m for m in model.modules() if isinstance(m, VariationalModule)]
    before = [m.mc for m in modules]
    for m in modules:
        m.mc = enabled
    try:
        yield model
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.mc = flag
