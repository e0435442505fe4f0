"""Structured (per-unit) multiplicative noise: VBD's dropout-like layer and SBP.

Both multiply their input by one random variable per unit — a neuron of a
fully connected layer's input, or a channel of a convolution's output —
B' = f(B) ∘ W' (Eq. 19), so that pruning a variable removes a whole unit.

- :class:`StructuredVBD` — the paper's Section 4.2: W' ~ N(θ, αθ²) per unit,
  additive reparameterization (θ, log σ²), KL from a prior of
  :mod:`vbdropout.priors` (VBD's ½·log(1 + 1/α) by default; ``log_uniform``
  gives structured sparse VD). As in the authors' code, θ starts at N(1, 0.01²),
  log σ² at −9, and a unit is kept while log α ≤ 0 (``threshold``); with
  ``train_clip`` (the authors' hard mask) a pruned unit is also dropped in
  training, so that it stays pruned.
- :class:`StructuredBayesianPruning` — Neklyudov et al. (2017): W' = exp(ξ),
  ξ ~ N(μ, σ²) truncated to [a, b] = [−20, 0], KL to the log-uniform prior
  truncated to the same interval, unit kept while its signal-to-noise ratio
  E[W'] / std[W'] exceeds 1.

Noise is drawn independently for every example in training (and under ``mc``);
evaluation multiplies by the posterior mean of the kept units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.special import log_ndtr, ndtr, ndtri

from ..priors import THETA_EPS, Prior, get_prior
from .base import VariationalModule
from .deterministic import Scale
from .prunable import UNIT_THRESHOLD, Prunable, Threshold, check_unit_threshold, eval_cached

__all__ = ["StructuredBayesianPruning", "StructuredVBD", "UnitNoise"]


class UnitNoise(Prunable, VariationalModule):
    """Base: one multiplicative variable per unit along dim 1 of (N, C, ...) or (N, C) inputs.

    Subclasses give :meth:`keep_mask` (which units survive at a threshold) and
    :meth:`posterior_mean`; the evaluation multiplier is their product.
    """

    check_inputs: bool = True

    def __init__(self, num_units: int) -> None:
        super().__init__()
        if num_units <= 0:
            raise ValueError(f"num_units must be positive, got {num_units}")
        self.num_units = num_units

    def posterior_mean(self) -> Tensor:
        """E[W'] of every unit."""
        raise NotImplementedError

    def multiplier(self, threshold: Threshold = "own") -> Tensor:
        """The deterministic per-unit multiplier of evaluation: E[W'], 0 for the units
        pruned at ``threshold``."""
        return self.posterior_mean() * self.keep_mask(threshold)

    def own_threshold(self) -> float | None:
        """The cut the layer was built with (what ``"own"`` means)."""
        raise NotImplementedError

    def sample(self, batch: int) -> Tensor:
        """Noise of shape (batch, num_units), one independent draw per example."""
        raise NotImplementedError

    @torch.no_grad()
    def deterministic(self, threshold: Threshold = "own") -> nn.Module:
        """The evaluation-time equivalent: a fixed per-unit scale (units cut at ``threshold``)."""
        return Scale(self.multiplier(threshold))

    def forward(self, x: Tensor) -> Tensor:
        if self.check_inputs and (x.dim() < 2 or x.shape[1] != self.num_units):
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (N, {self.num_units}, ...), "
                f"got shape {tuple(x.shape)}"
            )
        view = (-1, self.num_units) + (1,) * (x.dim() - 2)
        if self.sampling():
            return x * self.sample(x.shape[0]).view(view)
        return x * self._eval_multiplier().view(view)

    def _eval_multiplier(self) -> Tensor:
        """:meth:`multiplier`, cached across evaluation forwards (:func:`.eval_cached`)."""
        return eval_cached(
            self, self.multiplier, self.parameters(recurse=False), self.own_threshold()
        )

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}"


class StructuredVBD(UnitNoise):
    """VBD's per-unit dropout-like layer W' ~ N(θ, αθ²) (Section 4.2, Eq. 19).

    threshold: a unit is kept while log α ≤ ``threshold`` (0, the authors' cut);
        ``None`` keeps every unit.
    train_clip: also drop the pruned units while training (the authors' hard mask:
        their multiplier is zero, so only the KL acts on them and they stay pruned).
    """

    threshold_option = "unit_threshold"

    def __init__(
        self,
        num_units: int,
        prior: str | Prior = "hierarchical",
        threshold: float | None = UNIT_THRESHOLD,
        init_log_sigma2: float = -9.0,
        train_clip: bool = False,
    ) -> None:
        super().__init__(num_units)
        self.prior = get_prior(prior)
        self.threshold = check_unit_threshold(threshold)
        self.init_log_sigma2 = init_log_sigma2
        self.train_clip = train_clip
        self.theta = nn.Parameter(torch.empty(num_units))
        self.log_sigma2 = nn.Parameter(torch.empty(num_units))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.theta.normal_(1.0, 0.01)
            self.log_sigma2.fill_(self.init_log_sigma2)

    @property
    def log_alpha(self) -> Tensor:
        """log α = log σ² − log(θ² + ε), not clipped (only capped where the prior caps α).

        Unlike the weight layers' [−8, 8] clip, no lower bound: a unit starts at
        log α ≈ −9 (θ ≈ 1, log σ² = −9), and a clamp there would pass no gradient, so
        the KL would not push any unit at initialization. Both priors' KL terms are
        smooth closed forms of log α on the whole real line (VBD's is exactly
        ½·log(1 + θ²/σ²)), and ε keeps log α finite at θ = 0.
        """
        raw = self.log_sigma2 - torch.log(self.theta * self.theta + THETA_EPS)
        cap = self.prior.max_log_alpha
        return raw if cap is None else raw.clamp_max(cap)

    def own_threshold(self) -> float | None:
        return self.threshold

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """Units with log α ≤ ``threshold`` ("own": :attr:`threshold`; ``None``: all)."""
        cut = self.threshold if threshold == "own" else check_unit_threshold(threshold)
        if cut is None:
            return torch.ones_like(self.theta, dtype=torch.bool)
        return self.log_alpha <= cut

    def posterior_mean(self) -> Tensor:
        return self.theta

    def sample(self, batch: int) -> Tensor:
        theta, sigma = self.theta, torch.exp(0.5 * self.log_sigma2)
        if self.mc or self.train_clip:  # where, not a product: a pruned unit's σ may be inf
            mask = self.keep_mask()
            theta, sigma = theta * mask, torch.where(mask, sigma, 0.0)
        eps = torch.randn(batch, self.num_units, device=theta.device, dtype=theta.dtype)
        return theta + sigma * eps

    def variance_overflows(self) -> Tensor | None:
        """Whether a unit that training samples has σ = exp(½·log σ²) = inf. With
        ``train_clip`` only kept units are sampled (log α ≤ threshold, σ finite): it cannot
        (``None``). Without it, a unit the KL has long pruned can get there in a long run."""
        if self.train_clip:
            return None
        limit = 2 * math.log(torch.finfo(self.log_sigma2.dtype).max)
        return self.log_sigma2.detach().amax() > limit

    def kl(self) -> Tensor:
        """Σ over units of the prior's KL at the unclipped log α (½·log(1 + 1/α) for VBD)."""
        return self.prior.kl(self.log_alpha).sum()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, prior={self.prior.name}, threshold={self.threshold}, "
            f"train_clip={self.train_clip}"
        )


def _log_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, computed in the tail where it is accurate."""
    upper = lo > 0  # both in the upper tail: use Φ(−lo) − Φ(−hi)
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    return log_b + torch.log(-torch.expm1(log_a - log_b).clamp_max(-1e-30))


def _log_pdf(x: Tensor) -> Tensor:
    return -0.5 * x * x - 0.5 * math.log(2 * math.pi)


class StructuredBayesianPruning(UnitNoise):
    """SBP (Neklyudov et al. 2017): truncated log-normal noise exp(ξ), ξ ~ TN(μ, σ², a, b)."""

    def __init__(
        self,
        num_units: int,
        a: float = -20.0,
        b: float = 0.0,
        snr_threshold: float = 1.0,
        init_log_sigma: float = -5.0,
        param_range: tuple[float, float] = (-20.0, 5.0),
    ) -> None:
        super().__init__(num_units)
        if not a < b:
            raise ValueError(f"the truncation interval needs a < b, got [{a}, {b}]")
        self.a, self.b = a, b
        self.snr_threshold = snr_threshold
        self.init_log_sigma = init_log_sigma
        self.param_range = param_range
        self.mu = nn.Parameter(torch.empty(num_units))
        self.log_sigma = nn.Parameter(torch.empty(num_units))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mu.zero_()
            self.log_sigma.fill_(self.init_log_sigma)

    def _standardized(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mu = self.mu.clamp(*self.param_range)
        sigma = self.log_sigma.clamp(*self.param_range).exp()
        return mu, sigma, (self.a - mu) / sigma, (self.b - mu) / sigma

    def kl(self) -> Tensor:
        """KL(TN(μ, σ²; a, b) || U(a, b)) in log-space = log(b − a) − H(q).

        H = log(√(2πe)·σ·Z) + (α·φ(α) − β·φ(β)) / (2Z), Z = Φ(β) − Φ(α).
        """
        _, sigma, alpha, beta = self._standardized()
        log_z = _log_mass(alpha, beta)
        edge = alpha * torch.exp(_log_pdf(alpha) - log_z) - beta * torch.exp(_log_pdf(beta) - log_z)
        entropy = 0.5 * math.log(2 * math.pi * math.e) + torch.log(sigma) + log_z + 0.5 * edge
        return (math.log(self.b - self.a) - entropy).sum()

    def _log_moments(self) -> tuple[Tensor, Tensor]:
        """log E[exp(ξ)] and log E[exp(2ξ)] of the truncated normal."""
        mu, sigma, alpha, beta = self._standardized()
        log_z = _log_mass(alpha, beta)
        m1 = mu + 0.5 * sigma**2 + _log_mass(alpha - sigma, beta - sigma) - log_z
        m2 = 2 * mu + 2 * sigma**2 + _log_mass(alpha - 2 * sigma, beta - 2 * sigma) - log_z
        return m1, m2

    def snr(self) -> Tensor:
        """Signal-to-noise ratio E[W'] / std[W'] of every unit."""
        m1, m2 = self._log_moments()
        return torch.rsqrt(torch.expm1((m2 - 2 * m1).clamp_min(1e-30)))

    def own_threshold(self) -> float:
        return self.snr_threshold

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """Units whose SNR exceeds ``threshold`` ("own": :attr:`snr_threshold`; ``None``: all)."""
        if threshold is None:
            return torch.ones_like(self.mu, dtype=torch.bool)
        return self.snr() > (self.snr_threshold if threshold == "own" else threshold)

    def posterior_mean(self) -> Tensor:
        return self._log_moments()[0].exp()

    def sample(self, batch: int) -> Tensor:
        mu, sigma, alpha, beta = self._standardized()
        u = torch.rand(batch, self.num_units, device=mu.device, dtype=mu.dtype)
        lo, hi = ndtr(alpha), ndtr(beta)
        p = (lo + u * (hi - lo)).clamp(1e-7, 1 - 1e-7)
        xi = (mu + sigma * ndtri(p)).clamp(self.a, self.b)
        noise = xi.exp()
        return noise * self.keep_mask() if self.mc else noise

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, interval=[{self.a}, {self.b}], "
            f"snr_threshold={self.snr_threshold}"
        )
