"""The KL terms against closed forms and Monte-Carlo estimates."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vbdropout.priors import (
    HierarchicalPrior,
    KingmaLogUniformPrior,
    LogUniformPrior,
    Prior,
    get_prior,
)


def gaussian_kl(theta, sigma2, gamma):
    """KL(N(θ, σ²) || N(0, γ)), Eq. (14)."""
    return 0.5 * torch.log(gamma / sigma2) + (sigma2 + theta**2) / (2 * gamma) - 0.5


@pytest.mark.parametrize("log_alpha", [-4.0, -1.0, 0.0, 1.5, 4.0])
def test_hierarchical_kl_matches_monte_carlo_at_optimal_gamma(log_alpha):
    """½·log(1 + 1/α) = KL(q(w) || N(0, γ*)) with γ* = θ² + αθ² (Eq. 16–17), by sampling."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.tensor(0.7, dtype=torch.float64)
    alpha = math.exp(log_alpha)
    sigma = theta.abs() * math.sqrt(alpha)
    gamma_star = theta**2 + alpha * theta**2
    q, p = Normal(theta, sigma), Normal(torch.zeros((), dtype=torch.float64), gamma_star.sqrt())
    w = theta + sigma * torch.randn(400_000, generator=gen, dtype=torch.float64)
    log_ratio = q.log_prob(w) - p.log_prob(w)
    stderr = log_ratio.std() / math.sqrt(w.numel())
    closed = HierarchicalPrior().kl(torch.tensor(log_alpha, dtype=torch.float64))
    assert abs(log_ratio.mean() - closed) < 5 * stderr
    assert closed == pytest.approx(0.5 * math.log1p(1 / alpha), rel=1e-12)


@pytest.mark.parametrize("theta,alpha", [(0.3, 0.05), (-1.2, 1.0), (2.0, 7.0)])
def test_gamma_star_minimizes_the_gaussian_kl(theta, alpha):
    theta_t = torch.tensor(theta, dtype=torch.float64)
    sigma2 = alpha * theta_t**2
    gamma_star = theta_t**2 + sigma2
    grid = gamma_star * torch.logspace(-2, 2, 4001, dtype=torch.float64)
    values = gaussian_kl(theta_t, sigma2, grid)
    best = grid[values.argmin()]
    assert best == pytest.approx(gamma_star.item(), rel=5e-3)
    # zero derivative at γ*, and the value there is the closed form of Eq. (17)
    g = gamma_star.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gaussian_kl(theta_t, sigma2, g), g)
    assert abs(grad.item()) < 1e-12
    exact = kl_divergence(
        Normal(theta_t, sigma2.sqrt()), Normal(torch.zeros((), dtype=torch.float64), g.sqrt())
    )
    closed = HierarchicalPrior().kl(torch.tensor(math.log(alpha), dtype=torch.float64))
    assert exact.item() == pytest.approx(closed.item(), rel=1e-10)


def log_uniform_kl_up_to_constant(log_alpha, gen, n=2_000_000):
    """−½·log α + E log|1 + √α·ε|, ε ~ N(0, 1): KL to the log-uniform prior up to a constant."""
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    return -0.5 * log_alpha + torch.log((1 + math.exp(log_alpha / 2) * eps).abs()).mean().item()


def test_sparse_vd_approximation_tracks_the_log_uniform_kl():
    """Molchanov's 3-constant approximation equals the true KL up to one constant (±0.01)."""
    gen = torch.Generator().manual_seed(1)
    grid = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    approx = LogUniformPrior().kl(torch.tensor(grid, dtype=torch.float64))
    true = torch.tensor([log_uniform_kl_up_to_constant(a, gen) for a in grid])
    offset = approx - true
    assert (offset - offset.mean()).abs().max() < 0.015


def test_kingma_approximation_tracks_the_log_uniform_kl_for_alpha_up_to_one():
    gen = torch.Generator().manual_seed(2)
    grid = [-3.0, -2.0, -1.0, -0.5, 0.0]
    approx = KingmaLogUniformPrior().kl(torch.tensor(grid, dtype=torch.float64))
    true = torch.tensor([log_uniform_kl_up_to_constant(a, gen) for a in grid])
    offset = approx - true
    assert (offset - offset.mean()).abs().max() < 0.015
    assert KingmaLogUniformPrior.max_log_alpha == 0.0
    # the constant matches sparse VD's value at α = 1
    one = torch.zeros(())
    assert KingmaLogUniformPrior().kl(one).item() == pytest.approx(LogUniformPrior().kl(one).item())


def test_kl_shapes_monotonicity_and_limits():
    log_alpha = torch.linspace(-8, 8, 101)
    for prior in (HierarchicalPrior(), LogUniformPrior()):
        kl = prior.kl(log_alpha)
        assert kl.shape == log_alpha.shape
        assert (kl.diff() < 0).all(), "larger dropout rates must cost less"
        assert (kl > 0).all()
    # both vanish as α → ∞; the hierarchical KL grows like −½·log α as α → 0
    assert HierarchicalPrior().kl(torch.tensor(30.0)) < 1e-12
    assert LogUniformPrior().kl(torch.tensor(30.0)) < 1e-6
    assert HierarchicalPrior().kl(torch.tensor(-30.0)).item() == pytest.approx(15.0, rel=1e-6)


def test_get_prior_by_name_and_unknown_name():
    assert isinstance(get_prior("hierarchical"), HierarchicalPrior)
    assert isinstance(get_prior("log_uniform"), LogUniformPrior)
    assert isinstance(get_prior("kingma"), KingmaLogUniformPrior)
    prior = LogUniformPrior()
    assert get_prior(prior) is prior
    with pytest.raises(ValueError, match="unknown prior 'gauss'.*hierarchical"):
        get_prior("gauss")


def test_exact_additive_hierarchical_kl_matches_the_log_alpha_route():
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(50, 40, generator=gen, dtype=torch.float64)
    theta[0, :5] = 0.0  # θ = 0: α = ∞, KL 0
    log_sigma2 = torch.empty(50, 40, dtype=torch.float64).uniform_(-14, 2, generator=gen)
    prior = HierarchicalPrior()
    exact = prior.kl_sum_additive(theta, log_sigma2)
    via_log_alpha = prior.kl(log_sigma2 - torch.log(theta**2)).nan_to_num(0.0).sum()
    assert exact.item() == pytest.approx(via_log_alpha.item(), rel=1e-10)
    # inside the clip range the generic (clipped) route agrees with it as well
    raw = log_sigma2 - torch.log(theta**2)
    inside = (raw > -8) & (raw < 8)
    generic = Prior.kl_sum_additive(prior, theta[inside], log_sigma2[inside])
    assert generic.item() == pytest.approx(
        prior.kl_sum_additive(theta[inside], log_sigma2[inside]).item(), rel=1e-6
    )
    # gradients agree with the autograd of the closed form
    t = theta.clone().requires_grad_(True)
    s = log_sigma2.clone().requires_grad_(True)
    prior.kl_sum_additive(t, s).backward()
    expected_ds = -0.5 * theta**2 / (theta**2 + log_sigma2.exp())
    assert torch.allclose(s.grad, expected_ds, atol=1e-12)
    assert torch.allclose(t.grad, theta / (theta**2 + log_sigma2.exp()), atol=1e-12)
    small_t, small_s = t[:6, :5].detach().requires_grad_(), s[:6, :5].detach().requires_grad_()
    assert torch.autograd.gradcheck(prior.kl_sum_additive, (small_t, small_s))


def test_log_uniform_additive_kl_matches_autograd_of_the_clipped_route():
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(60, 30, generator=gen, dtype=torch.float64)
    theta[0, :5] = 0.0
    # log α spans both clip ends and the inside
    log_sigma2 = torch.empty(60, 30, dtype=torch.float64).uniform_(-16, 6, generator=gen)
    prior = LogUniformPrior()
    fast = [theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()]
    slow = [theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()]
    value = prior.kl_sum_additive(*fast)
    expected = prior.kl(prior.clip(slow[1] - torch.log(slow[0] ** 2 + 1e-8))).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    (3.0 * value).backward()
    (3.0 * expected).backward()
    clipped = ((log_sigma2 - torch.log(theta**2 + 1e-8)).abs() > 8).sum()
    assert 0 < clipped < theta.numel(), "the check covers clipped and free weights"
    assert torch.allclose(fast[0].grad, slow[0].grad, atol=1e-12)
    assert torch.allclose(fast[1].grad, slow[1].grad, atol=1e-12)
    inside = [t[5:10, :6].detach().clone() for t in (theta, log_sigma2)]
    inside[1] = torch.log(inside[0] ** 2 + 1e-8) + torch.linspace(-6, 6, 30).view(5, 6).double()
    assert torch.autograd.gradcheck(
        prior.kl_sum_additive, tuple(t.requires_grad_() for t in inside)
    )


def test_log_uniform_additive_kl_keeps_float32_precision_on_large_layers():
    theta = torch.full((4_000_000,), 1e-3)
    log_sigma2 = torch.full((4_000_000,), 6.0)  # log α clipped at 8: KL per weight ≈ 2e-4
    prior = LogUniformPrior()
    exact = prior.kl(torch.tensor(8.0, dtype=torch.float64)).item() * theta.numel()
    assert prior.kl_sum_additive(theta, log_sigma2).item() == pytest.approx(exact, rel=1e-5)
