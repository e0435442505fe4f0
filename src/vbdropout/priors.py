"""KL terms of the variational posterior q(w) = N(θ, αθ²) to a prior on the weights.

A method that puts a Gaussian posterior on the weights (or on multiplicative
noise) differs from its siblings only here: the layer code is shared and the
prior says how much each dropout rate α costs. Every prior maps ``log α``
elementwise to KL(q(w) || p(w)) per weight, in nats, and may cap α.

- :class:`HierarchicalPrior` — this paper (Liu et al. 2019). p(w|γ) = N(0, γ),
  p(γ) = U(a, b); the optimal γ* = θ² + αθ² (Eq. 16) gives
  KL = ½·log(1 + 1/α) (Eq. 17/18), a proper prior.
- :class:`LogUniformPrior` — sparse variational dropout (Molchanov et al. 2017):
  the improper log-uniform prior p(|w|) ∝ 1/|w|, KL approximated by
  −k1·σ(k2 + k3·log α) + ½·log(1 + 1/α) + k1, accurate for every α.
- :class:`KingmaLogUniformPrior` — variational dropout (Kingma et al. 2015):
  the same prior with Kingma's cubic approximation
  −KL ≈ C + ½·log α + c1·α + c2·α² + c3·α³, valid only for α ≤ 1, so it caps
  log α at 0. Kingma ties α per layer or per output unit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = [
    "LOG_ALPHA_RANGE",
    "PRIORS",
    "THETA_EPS",
    "HierarchicalPrior",
    "KingmaLogUniformPrior",
    "LogUniformPrior",
    "NoPrior",
    "Prior",
    "get_prior",
]


LOG_ALPHA_RANGE: tuple[float, float] = (-8.0, 8.0)
"""Numerical clip of every log α (the sparse VD reference range)."""

THETA_EPS = 1e-8
"""ε in log α = log σ² − log(θ² + ε), which keeps log α finite at θ = 0."""


class Prior:
    """The KL term of one method, as a function of log α (elementwise).

    ``max_log_alpha`` is the largest log α the approximation is valid for
    (``None``: no cap beyond :data:`LOG_ALPHA_RANGE`).
    """

    name: ClassVar[str]
    max_log_alpha: ClassVar[float | None] = None

    @property
    def upper_log_alpha(self) -> float:
        """The largest log α allowed: the prior's cap within :data:`LOG_ALPHA_RANGE`."""
        high = LOG_ALPHA_RANGE[1]
        return high if self.max_log_alpha is None else min(self.max_log_alpha, high)

    def clip(self, log_alpha: Tensor) -> Tensor:
        """Clamp raw log α values to [LOG_ALPHA_RANGE[0], :attr:`upper_log_alpha`]."""
        return log_alpha.clamp(LOG_ALPHA_RANGE[0], self.upper_log_alpha)

    def kl(self, log_alpha: Tensor) -> Tensor:
        """KL(q(w) || p(w)) for each weight, same shape as ``log_alpha``."""
        raise NotImplementedError

    def kernel_spec(self) -> kernels.KLSpec | None:
        """This KL's id and constants in the fused CPU kernels (:mod:`vbdropout.kernels`),
        ``None`` if they do not implement it."""
        return None

    def _kl_overridden(self, cls: type[Prior]) -> bool:
        """Whether a subclass of ``cls`` replaced its ``kl`` or ``kl_sum_additive``: then
        ``cls``'s closed forms (its exact additive KL, its kernel) no longer describe
        this prior."""
        return (
            type(self).kl is not cls.kl or type(self).kl_sum_additive is not Prior.kl_sum_additive
        )

    def kl_sum_additive(self, theta: Tensor, log_sigma2: Tensor) -> Tensor:
        """Σ KL over weights given θ and log σ² (the additive parameterization).

        By default ``kl`` of the clipped log α = log σ² − log(θ² + 1e−8); a prior
        may override it with an exact, cheaper form. With the fused CPU kernels
        (where :meth:`kernel_spec` is set and they take the tensors) one pass
        each way.
        """
        spec = self.kernel_spec()
        if (
            spec is not None
            and theta.stride() == log_sigma2.stride()
            and kernels.supports(theta, log_sigma2)
        ):
            return kernels.kl_sum(theta, log_sigma2, spec)
        return self._kl_sum_additive_eager(theta, log_sigma2)

    def _kl_sum_additive_eager(self, theta: Tensor, log_sigma2: Tensor) -> Tensor:
        log_alpha = log_sigma2 - torch.log(theta * theta + THETA_EPS)
        return self.kl(self.clip(log_alpha)).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class HierarchicalPrior(Prior):
    """VBD's Gaussian–uniform hierarchical prior: KL = ½·log(1 + 1/α) (Eq. 17/18).

    Written as ½·softplus(−log α), which is exact and stable for any log α.
    """

    name = "hierarchical"

    def kl(self, log_alpha: Tensor) -> Tensor:
        return 0.5 * F.softplus(-log_alpha)

    def kernel_spec(self) -> kernels.KLSpec | None:
        return None if self._kl_overridden(HierarchicalPrior) else (0, ())

    def _kl_sum_additive_eager(self, theta: Tensor, log_sigma2: Tensor) -> Tensor:
        """Σ ½·log(1 + θ²/σ²) = Σ ½·(log(θ² + σ²) − log σ²), exact (no clip of log α).

        With the hand-written gradients of :class:`_HierarchicalKLSum`: about half
        the elementwise passes over the weights of autograd's version.
        """
        if self._kl_overridden(HierarchicalPrior):
            return super()._kl_sum_additive_eager(theta, log_sigma2)
        return _HierarchicalKLSum.apply(theta, log_sigma2)[0]


class _HierarchicalKLSum(torch.autograd.Function):
    """KL = ½·Σ(log t − log σ²) with t = θ² + σ², σ² = exp(log σ²).

    Gradients: ∂KL/∂θ = θ/t, ∂KL/∂log σ² = ½·σ²/t − ½ = −½·θ·(θ/t). A floor of
    1e−30 on t keeps the log finite when θ = 0 and σ² underflows; only there (θ = 0
    and log σ² < −69) the value exceeds the true 0 by ½·(−69 − log σ²), while the
    gradients above stay exact. Differentiable once (no double backward); ``torch.func``
    transforms (the replicas' ``vmap``) batch it with the same gradients. Returns the KL
    and t (not differentiable; kept for the backward pass).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(theta: Tensor, log_sigma2: Tensor) -> tuple[Tensor, Tensor]:
        total = torch.addcmul(log_sigma2.exp(), theta, theta).clamp_min_(1e-30)
        return 0.5 * (total.log().sum() - log_sigma2.sum()), total

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]
    ) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        theta, total = ctx.saved_tensors
        ratio = torch.div(theta, total)  # θ/t
        grad_theta = ratio * grad if ctx.needs_input_grad[0] else None
        grad_log_sigma2 = None
        if ctx.needs_input_grad[1]:
            grad_log_sigma2 = ratio.mul_(theta).mul_(-0.5 * grad)
        return grad_theta, grad_log_sigma2


class LogUniformPrior(Prior):
    """Sparse VD's log-uniform prior with Molchanov et al.'s (2017) approximation.

    KL ≈ k1 − k1·σ(k2 + k3·log α) + ½·log(1 + 1/α), with k1 = 0.63576,
    k2 = 1.87320, k3 = 1.48695; the constant k1 makes KL → 0 as α → ∞.
    """

    name = "log_uniform"
    k1, k2, k3 = 0.63576, 1.87320, 1.48695

    def kl(self, log_alpha: Tensor) -> Tensor:
        return (
            self.k1
            - self.k1 * torch.sigmoid(self.k2 + self.k3 * log_alpha)
            + 0.5 * F.softplus(-log_alpha)
        )

    def kernel_spec(self) -> kernels.KLSpec | None:
        if self._kl_overridden(LogUniformPrior):
            return None
        return (1, (self.k1, self.k2, self.k3, LOG_ALPHA_RANGE[0], self.upper_log_alpha))

    def _kl_sum_additive_eager(self, theta: Tensor, log_sigma2: Tensor) -> Tensor:
        """The clipped log-α route of :meth:`Prior.kl_sum_additive`, with hand-written
        gradients (:class:`_LogUniformKLSum`): fewer elementwise passes than autograd's,
        which runs under ``torch.func`` transforms."""
        if self._kl_overridden(LogUniformPrior) or kernels.functorch_active():
            return super()._kl_sum_additive_eager(theta, log_sigma2)
        constants = (self.k1, self.k2, self.k3, LOG_ALPHA_RANGE[0], self.upper_log_alpha)
        return _LogUniformKLSum.apply(theta, log_sigma2, *constants)


class _LogUniformKLSum(torch.autograd.Function):
    """Σ KL(log α) of :class:`LogUniformPrior` with log α = clip(log σ² − log(θ² + ε)).

    Written as Σ k1·q + ½·softplus(−log α) with q = σ(−k2 − k3·log α) = 1 − σ(k2 + k3·log α),
    which avoids the float32 cancellation of k1·n − k1·Σσ(·) on large layers.
    ∂KL/∂log α = −k1·k3·q·(1 − q) − ½·σ(−log α) inside the clip range and 0
    outside it; ∂log α/∂log σ² = 1, ∂log α/∂θ = −2θ/(θ² + ε). Differentiable once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        theta: Tensor,
        log_sigma2: Tensor,
        k1: float,
        k2: float,
        k3: float,
        low: float,
        high: float,
    ) -> Tensor:
        denominator = torch.mul(theta, theta).add_(THETA_EPS)  # θ² + ε
        log_alpha = torch.sub(log_sigma2, denominator.log()).clamp_(low, high)
        q = torch.mul(log_alpha, -k3).sub_(k2).sigmoid_()
        ctx.save_for_backward(theta, denominator, log_alpha, q)
        ctx.constants = (k1, k3, low, high)
        return k1 * q.sum() + 0.5 * F.softplus(log_alpha.neg()).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        k1, k3, low, high = ctx.constants
        theta, denominator, log_alpha, q = ctx.saved_tensors
        # ∂KL/∂log α, then zero where the clip was active
        d = torch.sub(1.0, q).mul_(q).mul_(-k1 * k3)
        d.sub_(torch.sigmoid(log_alpha.neg()), alpha=0.5)
        d.masked_fill_((log_alpha <= low) | (log_alpha >= high), 0.0).mul_(grad)
        grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_theta = torch.div(theta, denominator).mul_(d).mul_(-2.0)
        grad_log_sigma2 = d if ctx.needs_input_grad[1] else None
        return grad_theta, grad_log_sigma2, None, None, None, None, None


class KingmaLogUniformPrior(Prior):
    """Kingma et al.'s (2015) cubic approximation of the log-uniform KL, for α ≤ 1.

    −KL ≈ C + ½·log α + c1·α + c2·α² + c3·α³ with c1 = 1.16145124,
    c2 = −1.50204118, c3 = 0.58629921. Kingma leave C open; we set it so that
    the value at α = 1 equals :class:`LogUniformPrior`'s, which makes the two
    log-uniform methods report comparable KL values.
    """

    name = "kingma"
    max_log_alpha = 0.0
    c1, c2, c3 = 1.16145124, -1.50204118, 0.58629921

    def __init__(self) -> None:
        at_one = LogUniformPrior().kl(torch.zeros(())).item()
        self._constant = at_one + self.c1 + self.c2 + self.c3

    def kl(self, log_alpha: Tensor) -> Tensor:
        alpha = log_alpha.exp()
        return self._constant - (
            0.5 * log_alpha + alpha * (self.c1 + alpha * (self.c2 + alpha * self.c3))
        )


class NoPrior(Prior):
    """No KL term: the posterior variance is a fixed noise level, not a learned belief
    (fast dropout's layers); not selectable by name."""

    name = "none"

    def kl(self, log_alpha: Tensor) -> Tensor:
        return torch.zeros_like(log_alpha)


PRIORS: dict[str, type[Prior]] = {
    cls.name: cls for cls in (HierarchicalPrior, LogUniformPrior, KingmaLogUniformPrior)
}


def get_prior(prior: str | Prior) -> Prior:
    """Return a :class:`Prior` from its name (``hierarchical``, ``log_uniform``, ``kingma``)."""
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, str) and prior in PRIORS:
        return PRIORS[prior]()
    known = ", ".join(sorted(PRIORS))
    raise ValueError(f"unknown prior {prior!r}; known priors: {known}")
