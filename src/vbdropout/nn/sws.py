"""Soft weight-sharing (Ullrich, Meeds & Welling 2017).

The weights get a Gaussian-mixture prior learned with them (empirical Bayes):

    p(w) = π₀·N(w | 0, σ₀²) + Σ_{j=1}^{K−1} π_j·N(w | μ_j, σ_j²),

with a zero component of fixed mixing proportion π₀ (0.99) that prunes, and
learned means μ_j, precisions λ_j = σ_j⁻² (all K, the zero one included) and
proportions π_{j≥1} = (1 − π₀)·softmax(ρ)_j. Gamma hyper-priors on the
precisions keep the components from collapsing: Gamma(5000, 2) for the zero
component, Gamma(250, 0.1) for the others (Ullrich et al.'s code). One prior
is shared by all the weights of the network (biases excluded: the compression
ratio counts weights), as in the paper.

Objective (whole training set): −log p(T | W) − τ·log p(W, μ, σ, π), i.e.
each layer's :meth:`~SoftSharedWeight.kl` is −τ·Σ_i log p(w_i) and the
prior's own :meth:`MixturePrior.kl` is the hyper-priors' −τ·log p(λ) (without
their normalizing constants, as the authors' code). The authors' tutorial
uses τ = 0.003 (its data term is the batch-mean cross-entropy and the prior's
weight τ/N: the same objective). Our default is τ = 0.03: retraining a plain
LeNet-300-100 (10 epochs on MNIST, Adam 1e-3) with the prior, τ = 0.003 had
not clustered the weights after 30 epochs (zero component σ₀ = 0.043;
quantized test error 14.4 %, continuous 1.5 %), τ = 0.03 had after 10
(σ₀ = 0.004; quantized 1.73 % at |W|/|W≠0| = 10.9). The "kl" is a negative
log density and can be negative.

The authors train the prior with its own Adam learning rates (weights 5e-4,
means 1e-4, log-precisions and mixing logits 3e-3). The library's trainer has
one learning rate, so the prior stores its parameters scaled: a value v is
kept as the parameter v / s, and Adam, whose steps do not depend on the
gradient's scale, then moves v s times as fast. ``lr_scales`` (0.2, 6, 6) keeps
the authors' ratios to the weights' rate.

Ullrich et al. retrain a trained network with the prior. ``start`` (a
fraction of the run) lets one run do both: the weights train without the
prior until then, and when it starts its means are widened to cover the
trained weights (they start spread over the weights' range when the model is
built, and a plain ``state_dict`` loaded into the model widens them too).

Quantization, the compression step, is explicit and in place:
:meth:`SoftSharedWeight.quantize_` (or :func:`quantize` on a model) sets each
weight to the mean of its most responsible component, argmax_j π_j·N(w | μ_j,
σ_j²) — exactly 0 for the zero component. The training hook does it after the
last epoch (``quantize_at_end``), so the evaluation, the compression report and
export of a finished run see at most K distinct weight values; before that,
evaluation uses the continuous weights. Ullrich et al. also merge components
that collapsed onto each other; merging does not change the quantized values
(such components share their mean), so it is left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from .base import VariationalModule
from .epoch_hooks import epoch_at
from .penalized import PenalizedWeight, check_nonnegative

__all__ = ["Conv2dSWS", "LinearSWS", "MixturePrior", "SoftSharedWeight", "quantize"]

_LOG_2PI = math.log(2 * math.pi)


def _check_positive(value: float, name: str) -> float:
    value = check_nonnegative(value, name)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def _joint(w: Tensor, mu: Tensor, log_lam: Tensor, log_pi: Tensor) -> Tensor:
    """(|w|, K) log π_j + log N(w_i | μ_j, 1/λ_j) as one matrix product of [1, w, w²]:
    log π_j + ½(log λ_j − log 2π) − ½λ_j μ_j² + w·λ_j μ_j − ½ w² λ_j."""
    lam = log_lam.exp()
    coef = torch.stack(
        [log_pi + 0.5 * (log_lam - _LOG_2PI) - 0.5 * lam * mu * mu, lam * mu, -0.5 * lam]
    )
    powers = torch.stack([torch.ones_like(w), w, w * w], 1)
    return powers @ coef.to(w.dtype)


class _MixtureLogProb(torch.autograd.Function):
    """Σ_i log Σ_j π_j N(w_i | μ_j, 1/λ_j) with the analytic backward.

    With responsibilities r_ij and moments S_k = Σ_i r_ij w_i^k:
    ∂/∂w_i = −Σ_j r_ij λ_j (w_i − μ_j), ∂/∂μ_j = λ_j (S1 − μ_j S0),
    ∂/∂log λ_j = ½ S0 − ½ λ_j (S2 − 2μ_j S1 + μ_j² S0), ∂/∂log π_j = S0.
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, mu: Tensor, log_lam: Tensor, log_pi: Tensor) -> Tensor:
        flat = w.detach().reshape(-1)
        joint = _joint(flat, mu.detach(), log_lam.detach(), log_pi.detach())
        top = joint.max(1, keepdim=True).values
        # in place: the responsibilities once normalized. Clamped at e^−80 (which changes
        # log p by < 1e−33): exp of far more negative values gives denormals, ~10× slower.
        resp = joint.sub_(top).clamp_(min=-80.0).exp_()
        total = resp.sum(1, keepdim=True)
        resp.div_(total)
        ctx.save_for_backward(w, mu, log_lam, resp)
        return (top + total.log()).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        w, mu, log_lam, resp = ctx.saved_tensors
        flat = w.detach().reshape(-1)
        lam = log_lam.exp().to(resp.dtype)
        mu_ = mu.to(resp.dtype)
        grad_w = -(flat * (resp @ lam) - resp @ (lam * mu_))
        s0 = resp.sum(0)
        s1 = flat @ resp
        s2 = (flat * flat) @ resp
        grad_mu = lam * (s1 - mu_ * s0)
        grad_log_lam = 0.5 * s0 - 0.5 * lam * (s2 - 2 * mu_ * s1 + mu_ * mu_ * s0)
        return (
            grad * grad_w.view_as(w),
            (grad * grad_mu).to(mu.dtype),
            (grad * grad_log_lam).to(log_lam.dtype),
            (grad * s0).to(mu.dtype),
        )


class MixturePrior(VariationalModule):
    """The learned Gaussian mixture prior p(w) of soft weight-sharing; see the module docstring.

    Parameters (stored scaled, see ``lr_scales``): ``mean_param`` (K − 1 means),
    ``log_precision_param`` (K log-precisions, the zero component's first),
    ``logit_param`` (K − 1 mixing logits).
    """

    def __init__(
        self,
        components: int = 16,
        pi_zero: float = 0.99,
        tau: float = 0.03,
        init_std: float = 0.25,
        init_range: float = 0.6,
        zero_gamma: tuple[float, float] = (5000.0, 2.0),
        gamma: tuple[float, float] = (250.0, 0.1),
        lr_scales: tuple[float, float, float] = (0.2, 6.0, 6.0),
        start: float = 0.0,
    ) -> None:
        """components: K, the zero component included (≥ 2).

        pi_zero: the zero component's fixed mixing proportion, in (0, 1).
        tau: the prior's weight τ in the objective.
        init_std: initial σ of every component; init_range: the K − 1 means start
            evenly spaced over [−init_range, init_range] (see :meth:`init_means`).
        zero_gamma, gamma: (α, β) of the Gamma hyper-priors on the zero
            component's precision and on the others'.
        lr_scales: learning-rate factors of the means, log-precisions and logits.
        start: the prior acts from the end of this fraction of the run on (0: from the
            first step); before, the weights train without it (see :meth:`on_epoch_end`).
        """
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int) or components < 2:
            raise ValueError(f"components must be an int >= 2, got {components!r}")
        if isinstance(pi_zero, bool) or not isinstance(pi_zero, (int, float)):
            raise ValueError(f"pi_zero must be a probability in (0, 1), got {pi_zero!r}")
        if not 0 < pi_zero < 1:
            raise ValueError(f"pi_zero must be a probability in (0, 1), got {pi_zero!r}")
        self.components = components
        self.pi_zero = float(pi_zero)
        self.tau = check_nonnegative(tau, "tau")
        init_std = _check_positive(init_std, "init_std")
        self.zero_gamma = tuple(_check_positive(v, "zero_gamma") for v in zero_gamma)
        self.gamma = tuple(_check_positive(v, "gamma") for v in gamma)
        if len(self.zero_gamma) != 2 or len(self.gamma) != 2:
            raise ValueError("zero_gamma and gamma are (alpha, beta) pairs")
        scales = tuple(_check_positive(v, "lr_scales") for v in lr_scales)
        if len(scales) != 3:
            raise ValueError("lr_scales gives three factors: means, log-precisions, logits")
        self.mean_scale, self.precision_scale, self.logit_scale = scales
        self.mean_param = nn.Parameter(torch.zeros(components - 1))
        self.log_precision_param = nn.Parameter(
            torch.full((components,), -2 * math.log(init_std) / self.precision_scale)
        )
        self.logit_param = nn.Parameter(torch.zeros(components - 1))
        self.init_means(init_range)
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
            raise ValueError(f"start must be a fraction of the run in [0, 1), got {start!r}")
        self.start = float(start)
        self.register_buffer("active", torch.tensor(self.start == 0))

    def start_epoch(self, epochs: int) -> int:
        """The first epoch (from 0) of a run of ``epochs`` in which the prior acts."""
        return 0 if self.start == 0 else epoch_at(self.start, epochs) + 1

    def deterministic(self) -> None:
        """Not part of the evaluation computation (the layers hold their weights)."""
        return None

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Switch the prior on from :meth:`start_epoch` on."""
        self.active.fill_(epoch + 1 >= self.start_epoch(epochs))

    @torch.no_grad()
    def init_means(self, spread: float) -> None:
        """Place the K − 1 learned means evenly over [−spread, spread] (as the authors'
        ``linspace(−0.6, 0.6)`` for their pretrained network)."""
        spread = _check_positive(spread, "spread")
        values = torch.linspace(-spread, spread, self.components - 1)
        self.mean_param.copy_(values / self.mean_scale)

    @torch.no_grad()
    def cover(self, spread: float) -> None:
        """Re-spread the means over [−spread, spread] if that is wider than they are now."""
        if spread > float(self.means().abs().max()):
            self.init_means(spread)

    def means(self) -> Tensor:
        """μ of the K components; μ₀ = 0."""
        return torch.cat([self.mean_param.new_zeros(1), self.mean_scale * self.mean_param])

    def log_precisions(self) -> Tensor:
        """log λ_j = −2 log σ_j of the K components."""
        return self.precision_scale * self.log_precision_param

    def log_mixing(self) -> Tensor:
        """log π_j of the K components (π₀ fixed)."""
        rest = math.log1p(-self.pi_zero) + torch.log_softmax(self.logit_scale * self.logit_param, 0)
        return torch.cat([rest.new_full((1,), math.log(self.pi_zero)), rest])

    def _joint(self, w: Tensor) -> Tensor:
        """log π_j + log N(w | μ_j, σ_j²) of the flattened ``w``, shape (|w|, K)."""
        return _joint(w.reshape(-1), self.means(), self.log_precisions(), self.log_mixing())

    def log_prob(self, w: Tensor) -> Tensor:
        """log p(w) of every entry of ``w`` (same shape)."""
        return torch.logsumexp(self._joint(w), -1).view_as(w)

    def log_prob_sum(self, w: Tensor) -> Tensor:
        """Σ_i log p(w_i), with a fused backward (responsibilities and K-sized moments
        instead of |w|×K autograd graphs: several times faster on LeNet-300-100; autograd's
        under ``torch.func`` transforms, e.g. the replicas' ``vmap``)."""
        if kernels.functorch_active():
            return self.log_prob(w).sum()
        return _MixtureLogProb.apply(w, self.means(), self.log_precisions(), self.log_mixing())

    @torch.no_grad()
    def assign(self, w: Tensor) -> Tensor:
        """The index of each entry's most responsible component (0: the zero component)."""
        return self._joint(w).argmax(-1).view(w.shape)

    @torch.no_grad()
    def quantized(self, w: Tensor) -> Tensor:
        """Each entry replaced by its component's mean (exactly 0 for the zero component)."""
        index = self.assign(w)
        return torch.where(index == 0, torch.zeros_like(w), self.means()[index].to(w.dtype))

    def kl(self) -> Tensor:
        """τ·(−log p(λ)) of the Gamma hyper-priors, up to their constants (0 while inactive)."""
        if not bool(self.active):
            return self.mean_param.new_zeros(())
        log_lam = self.log_precisions()
        alpha = torch.tensor([self.zero_gamma[0]] + [self.gamma[0]] * (self.components - 1))
        beta = torch.tensor([self.zero_gamma[1]] + [self.gamma[1]] * (self.components - 1))
        alpha, beta = alpha.to(log_lam), beta.to(log_lam)
        return self.tau * ((1 - alpha) * log_lam + beta * log_lam.exp()).sum()

    def extra_repr(self) -> str:
        return f"components={self.components}, pi_zero={self.pi_zero}, tau={self.tau}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """A state without any prior entry (a plain network's) leaves the prior as it is."""
        names = [prefix + n for n, _ in self.named_parameters(recurse=False)]
        names += [prefix + n for n, _ in self.named_buffers(recurse=False)]
        absent = not any(k in state_dict for k in names)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:
            for key in names:
                if key in missing_keys:
                    missing_keys.remove(key)


class SoftSharedWeight(PenalizedWeight):
    """Mixin: ``weight`` under a (shared) :class:`MixturePrior`; see the module docstring.

    ``prior`` becomes a submodule of every layer that shares it (the model's
    ``parameters()`` and ``modules()`` list it once, so its hyper-prior counts once).
    """

    def __init__(
        self,
        *args: Any,
        prior: MixturePrior | None = None,
        quantize_at_end: bool = True,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged.

        prior: the mixture prior (shared between layers); a new default one if None.
        quantize_at_end: quantize the weights after the last epoch (the training hook).
        """
        super().__init__(*args, **kwargs)
        if prior is not None and not isinstance(prior, MixturePrior):
            raise TypeError(f"prior must be a MixturePrior, got {type(prior).__name__}")
        self.prior = prior if prior is not None else MixturePrior()
        self.quantize_at_end = bool(quantize_at_end)

    def _is_plain_state(self, state_dict: dict[str, Any], prefix: str) -> bool:
        """The weight without any entry of the prior (a trained plain net to retrain)."""
        prior = prefix + "prior."
        return prefix + "weight" in state_dict and not any(k.startswith(prior) for k in state_dict)

    def _after_load(self, plain: bool) -> None:
        """After a plain layer's state (as Ullrich et al. retrain a trained net), widen the
        prior's means to cover the loaded weights (:meth:`MixturePrior.cover`)."""
        if plain:
            self.prior.cover(float(self.weight.detach().abs().max()))

    def penalty(self) -> Tensor:
        """−τ·Σ log p(w) over the layer's weights (0 while the prior is inactive)."""
        if not bool(self.prior.active):
            return self.weight.new_zeros(())
        return -self.prior.tau * self.prior.log_prob_sum(self.weight)

    @torch.no_grad()
    def quantize_(self) -> None:
        """Set every weight to the mean of its most responsible component (in place)."""
        self.weight.copy_(self.prior.quantized(self.weight))

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """When the prior starts next epoch, widen its means to cover this layer's weights
        (:meth:`MixturePrior.cover`); after the last epoch, quantize (``quantize_at_end``)."""
        if epoch + 1 == self.prior.start_epoch(epochs) and epoch + 1 < epochs:
            self.prior.cover(float(self.weight.detach().abs().max()))
        if epoch == epochs - 1 and self.quantize_at_end:
            self.quantize_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize_at_end={self.quantize_at_end}"


@torch.no_grad()
def quantize(model: nn.Module) -> nn.Module:
    """Quantize every soft weight-sharing layer of ``model`` in place; returns ``model``."""
    for module in model.modules():
        if isinstance(module, SoftSharedWeight):
            module.quantize_()
    return model


class LinearSWS(SoftSharedWeight, nn.Linear):
    """``nn.Linear`` under a soft weight-sharing prior (Ullrich et al. 2017).

    ``LinearSWS(in_features, out_features, bias=True, *, prior=None, quantize_at_end=True)``.
    """


class Conv2dSWS(SoftSharedWeight, nn.Conv2d):
    """``nn.Conv2d`` under a soft weight-sharing prior (same signature + prior options)."""
