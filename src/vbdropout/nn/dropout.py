"""Noise on a layer's inputs: the dropout baselines of the paper's Tables 1–3.

Each module multiplies its input elementwise by noise ξ with E[ξ] = 1, so the
expectation of every activation is kept and evaluation is the identity:

- :class:`BernoulliDropout` — Srivastava et al. (2014): ξ = z/(1 − p),
  z ~ Bernoulli(1 − p) (inverted dropout).
- :class:`GaussianDropout` — Srivastava et al. (2014, Sec. 10): ξ ~ N(1, σ²)
  with σ² = p/(1 − p), the variance of the Bernoulli noise it replaces.
- :class:`VariationalGaussianDropout` — Kingma et al. (2015), variational
  dropout "A": ξ ~ N(1, α) with α learned per input unit (or per layer) and
  capped at α ≤ 1; its KL term is Kingma's approximation counted once per
  weight that the noisy input multiplies.

Inputs are (N, C, ...) tensors: a linear layer's (N, features) or a
convolution's (N, channels, H, W). The noise is drawn for every element — per
example, per feature and, on convolution inputs, per spatial position — while a
learned α is shared along the channel dimension (dim 1).

A module samples in training mode and when its ``mc`` flag is set (Monte-Carlo
prediction, :func:`vbdropout.nn.mc_sampling`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..priors import Prior, get_prior
from .base import StochasticModule, VariationalModule, standard_normal_like

__all__ = [
    "BernoulliDropout",
    "GaussianDropout",
    "VariationalGaussianDropout",
    "check_rate",
]


def check_rate(p: float, name: str = "p") -> float:
    """Validate a dropout rate: a number strictly between 0 and 1."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(p).__name__}")
    if not 0.0 < p < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a dropout rate in (0, 1), got {p}")
    return float(p)


def _check_noise_input(module: nn.Module, x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"{type(module).__name__} expects inputs of shape (N, C, ...), "
            f"got shape {tuple(x.shape)}"
        )


class _InputNoise(StochasticModule):
    """Shared part of the fixed-rate noise modules: the rate; identity in evaluation."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = check_rate(p)

    def deterministic(self) -> None:
        """Evaluation is the identity (inverted scaling): nothing to keep."""
        return None

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BernoulliDropout(_InputNoise):
    """Dropout (Srivastava et al. 2014) with inverted scaling: y = x ⊙ z / (1 − p).

    z ~ Bernoulli(1 − p) independently for every element, so E[y] = x and
    Var[y] = x²·p/(1 − p); evaluation is the identity.

    ``mask`` may be set to a 0/1 tensor shaped like the input to use it instead
    of a random draw (:class:`~vbdropout.nn.adversarial.AdversarialDropoutNet`
    holds masks fixed across its forward passes this way); ``last_mask`` is the
    mask of the most recent sampling forward.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)
        self.mask: Tensor | None = None
        self.last_mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.sampling():
            return x
        _check_noise_input(self, x)
        mask = self.mask
        if mask is None:
            mask = torch.empty_like(x).bernoulli_(1.0 - self.p)
        elif mask.shape != x.shape:
            raise ValueError(
                f"{type(self).__name__}.mask has shape {tuple(mask.shape)} "
                f"but the input has shape {tuple(x.shape)}"
            )
        self.last_mask = mask.detach()
        return x * mask / (1.0 - self.p)


class GaussianDropout(_InputNoise):
    """Multiplicative Gaussian noise (Srivastava et al. 2014, Sec. 10): y = x ⊙ ξ.

    ξ ~ N(1, σ²) with σ² = p/(1 − p) independently for every element — the
    mean and variance of the inverted Bernoulli noise of rate p. Evaluation is
    the identity.
    """

    @property
    def std(self) -> float:
        """σ = sqrt(p/(1 − p))."""
        return math.sqrt(self.p / (1.0 - self.p))

    def forward(self, x: Tensor) -> Tensor:
        if not self.sampling():
            return x
        _check_noise_input(self, x)
        return x * (1.0 + self.std * standard_normal_like(x))


class VariationalGaussianDropout(VariationalModule):
    """Variational dropout "A" (Kingma et al. 2015): y = x ⊙ ξ, ξ ~ N(1, α), α learned.

    Kingma et al. (Sec. 3.3) read Gaussian dropout on the inputs A of a layer
    B = (A ⊙ ξ)·θ as a variational posterior over weights with *correlated*
    noise, w_ij = ξ_i·θ_ij, whose marginals are N(θ_ij, α_i·θ_ij²); with the
    scale-invariant log-uniform prior the KL depends on α alone. We count the
    per-weight KL of :class:`~vbdropout.priors.KingmaLogUniformPrior` once for
    every weight each α scales: ``weights_per_unit`` per input unit (a linear
    layer's ``out_features``; a convolution's ``out_channels·kh·kw``).

    α is one parameter per input unit/channel (``alpha_per="unit"``) or one per
    layer (``"layer"``), initialized at the Gaussian-dropout value p/(1 − p),
    and capped at α ≤ 1 (log α ≤ 0), the range where Kingma's KL approximation
    holds, by clipping log α in the forward pass (as the Gaussian-weight layers
    do). The noise itself is drawn per element.

    Args:
        num_features: C, the size of dim 1 of the input.
        weights_per_unit: weights of the following layer that one input unit multiplies.
        p: the dropout rate α is initialized from, α₀ = p/(1 − p).
        alpha_per: ``"unit"`` (one α per input unit/channel) or ``"layer"``.
        prior: the KL term (default ``"kingma"``; any :mod:`vbdropout.priors` name).
    """

    def __init__(
        self,
        num_features: int,
        weights_per_unit: int = 1,
        p: float = 0.5,
        alpha_per: Literal["unit", "layer"] = "unit",
        prior: str | Prior = "kingma",
    ) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("weights_per_unit", weights_per_unit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if alpha_per not in ("unit", "layer"):
            raise ValueError(f"alpha_per must be 'unit' or 'layer', got {alpha_per!r}")
        self.num_features = num_features
        self.weights_per_unit = weights_per_unit
        self.p = check_rate(p)
        self.alpha_per = alpha_per
        self.prior = get_prior(prior)
        self.log_alpha_param = nn.Parameter(torch.empty(num_features if alpha_per == "unit" else 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """log α = log(p/(1 − p)), Gaussian dropout's value for rate p."""
        with torch.no_grad():
            self.log_alpha_param.fill_(math.log(self.p / (1.0 - self.p)))

    @property
    def log_alpha(self) -> Tensor:
        """Clipped log α, shape (C,) or (1,); at most 0 (α ≤ 1) with Kingma's prior."""
        return self.prior.clip(self.log_alpha_param)

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    def kl(self) -> Tensor:
        """Σ over the weights the noise scales of the prior's per-weight KL(α)."""
        per_alpha = self.prior.kl(self.log_alpha).sum()
        units = 1 if self.alpha_per == "unit" else self.num_features
        return per_alpha * (units * self.weights_per_unit)

    def forward(self, x: Tensor) -> Tensor:
        if not self.sampling():
            return x
        _check_noise_input(self, x)
        if self.alpha_per == "unit" and x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with {self.num_features} "
                f"features/channels in dim 1, got shape {tuple(x.shape)}"
            )
        std = (0.5 * self.log_alpha).exp().view(1, -1, *([1] * (x.dim() - 2)))
        return x * (1.0 + std * standard_normal_like(x))

    def deterministic(self) -> None:
        """Evaluation is the identity (the noise has mean 1)."""
        return None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, weights_per_unit={self.weights_per_unit}, p={self.p}, "
            f"alpha_per={self.alpha_per}, prior={self.prior.name}"
        )
