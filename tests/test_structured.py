"""Per-unit noise layers: structured VBD and SBP against closed forms and sampling."""

import math

import pytest
import torch
from torch import nn

from vbdropout.nn.base import mc_sampling
from vbdropout.nn.structured import StructuredBayesianPruning, StructuredVBD, _log_mass
from vbdropout.priors import HierarchicalPrior
from vbdropout.train.loop import DivergenceError, train_epoch


def test_structured_vbd_samples_n_theta_alpha_theta2_per_example_and_unit():
    torch.manual_seed(0)
    layer = StructuredVBD(4)
    with torch.no_grad():
        layer.theta.copy_(torch.tensor([1.0, -0.5, 2.0, 0.3]))
        layer.log_sigma2.copy_(torch.tensor([-2.0, -1.0, 0.0, -4.0]))
    n = 50_000
    out = layer.train()(torch.ones(n, 4)).detach()
    var = layer.log_sigma2.exp().detach()
    assert ((out.mean(0) - layer.theta.detach()).abs() < 5 * (var / n).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n)).all()
    # conv-shaped input: one draw per (example, channel), shared over positions
    x = torch.ones(3, 4, 5, 5)
    y = layer(x)
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))


def test_structured_vbd_kl_threshold_and_eval_multiplier():
    layer = StructuredVBD(3)
    with torch.no_grad():
        layer.theta.fill_(1.0)
        layer.log_sigma2.copy_(torch.tensor([-3.0, 0.5, -0.5]))
    assert layer.kl().item() == pytest.approx(HierarchicalPrior().kl(layer.log_alpha).sum().item())
    assert layer.keep_mask().tolist() == [True, False, True]
    x = torch.randn(2, 3)
    assert torch.equal(layer.eval()(x), x * torch.tensor([1.0, 0.0, 1.0]))
    layer.train()(x).sum().backward()
    assert layer.theta.grad is not None and layer.log_sigma2.grad is not None


def sbp_layer():
    layer = StructuredBayesianPruning(3)
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([-1.0, -3.0, 0.5]))
        layer.log_sigma.copy_(torch.tensor([-0.5, 0.3, -1.0]))
    return layer


def test_sbp_moments_and_snr_match_sampling():
    torch.manual_seed(1)
    layer = sbp_layer().train()
    z = layer.sample(400_000).detach()
    assert (z > 0).all() and (z <= 1.0).all(), "exp(ξ) with ξ in [−20, 0]"
    mean = layer._log_moments()[0].exp().detach()
    assert torch.allclose(z.mean(0), mean, rtol=3e-3)
    assert torch.allclose(z.mean(0) / z.std(0), layer.snr().detach(), rtol=1e-2)
    assert layer.keep_mask().tolist() == [True, False, True]


def test_sbp_kl_matches_monte_carlo():
    torch.manual_seed(2)
    layer = sbp_layer()
    xi = layer.sample(400_000).detach().log()
    mu, sigma, alpha, beta = (t.detach() for t in layer._standardized())
    log_q = (
        -0.5 * ((xi - mu) / sigma) ** 2
        - 0.5 * math.log(2 * math.pi)
        - sigma.log()
        - _log_mass(alpha, beta)
    )
    mc = (log_q.mean(0) + math.log(20.0)).sum()
    assert layer.kl().item() == pytest.approx(mc.item(), abs=0.02)


def test_sbp_is_stable_at_its_initialization_and_extremes():
    layer = StructuredBayesianPruning(4)
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([0.0, -19.0, 4.0, -10.0]))
        layer.log_sigma.copy_(torch.tensor([-5.0, -20.0, 5.0, 2.0]))
    for value in (layer.kl(), layer.snr(), layer.multiplier(), layer.train().sample(16)):
        assert torch.isfinite(value).all()
    layer.train()(torch.ones(8, 4)).sum().add(layer.kl()).backward()
    assert torch.isfinite(layer.mu.grad).all() and torch.isfinite(layer.log_sigma.grad).all()


def test_unit_noise_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 3, \.\.\.\)"):
        StructuredVBD(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="a < b"):
        StructuredBayesianPruning(3, a=0.0, b=-1.0)


@pytest.mark.parametrize("make", [lambda: StructuredVBD(4), lambda: StructuredBayesianPruning(4)])
def test_cached_eval_multiplier_follows_parameter_and_threshold_changes(make):
    layer = make().eval()
    x = torch.ones(2, 4)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, layer.multiplier().expand(2, 4))
        for p in layer.parameters():
            p.add_(0.5)  # in place, as an optimizer step does
        assert torch.equal(layer(x), layer.multiplier().expand(2, 4))
        assert not torch.equal(layer(x), first)
        if isinstance(layer, StructuredVBD):
            layer.log_sigma2.fill_(0.0)  # log α ≈ −0.8: kept at threshold 0 ...
            assert layer(x).abs().sum() > 0
            layer.threshold = -1.0  # ... pruned at −1
        else:
            layer.log_sigma.fill_(2.0)  # wide noise: SNR < 1, every unit pruned ...
            assert torch.equal(layer(x), torch.zeros(2, 4))
            layer.snr_threshold = 0.0  # ... and kept again at threshold 0
            assert (layer(x) > 0).all()
            return
        assert torch.equal(layer(x), torch.zeros(2, 4)), "every unit pruned"


def test_a_pruned_unit_with_an_infinite_sigma_stays_out_of_training_and_mc_outputs():
    """Under train_clip the KL alone drives a pruned unit's log σ² up without bound; its
    σ = exp(½·log σ²) may overflow, and a masked product (inf·0) would then be NaN."""
    layer = StructuredVBD(3, train_clip=True)
    with torch.no_grad():
        layer.log_sigma2[1] = 400.0  # finite, but exp(200) overflows float32
    x = torch.ones(5, 3)
    out = layer.train()(x)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()
    assert not bool(layer.variance_overflows())  # pruned units are never sampled
    layer.train_clip = False
    assert bool(layer.variance_overflows())  # ... without the hard mask they are
    with mc_sampling(layer.eval()):
        assert torch.isfinite(layer(x)).all()


def test_structured_variance_overflow_is_divergence_in_the_training_loop():
    model = nn.Sequential(StructuredVBD(4), nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    class Overflowing(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                model[0].log_sigma2[0] = 400.0

    opt = Overflowing(model.parameters(), lr=0.1)
    with pytest.raises(DivergenceError, match=r"step 1/1: the update made 0.sigma2 = exp"):
        train_epoch(model, opt, x, y, batch_size=8, kl_weight=1.0)
