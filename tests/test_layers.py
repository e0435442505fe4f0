"""Contracts of the variational layers: LRT statistics, pruning, state_dict, errors."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbdropout import Conv1dVBD, Conv2dVBD, Conv3dVBD, LinearVBD, mc_sampling
from vbdropout.nn import (
    LOG_ALPHA_RANGE,
    StructuredBayesianPruning,
    StructuredVBD,
    attach_optimizer,
)


def spread_log_sigma2(layer, gen):
    """Give every weight a different log σ² so that statistics test real per-weight variances."""
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.empty_like(layer.weight).uniform_(-6, -1, generator=gen))


def repeated_forward(layer, x, n):
    """n independent training-mode outputs for the same input x (one per batch row)."""
    return layer(x.expand(n, *x.shape[1:]).contiguous())


def test_lrt_linear_matches_mean_and_variance_of_weight_noise():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = LinearVBD(6, 4)
    spread_log_sigma2(layer, gen)
    x = torch.randn(1, 6, generator=gen)
    n = 40_000
    out = repeated_forward(layer.train(), x, n).detach()
    mean = F.linear(x, layer.weight, layer.bias)[0].detach()
    var = F.linear(x * x, layer.log_sigma2.exp())[0].detach()
    # mean: standard error sqrt(var/n); variance: relative standard error sqrt(2/n)
    assert ((out.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_lrt_conv_matches_mean_and_variance_of_the_two_convolutions():
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    layer = Conv2dVBD(2, 3, 3, padding=1)
    spread_log_sigma2(layer, gen)
    x = torch.randn(1, 2, 5, 5, generator=gen)
    n = 20_000
    out = repeated_forward(layer.train(), x, n).detach()
    mean = F.conv2d(x, layer.weight, layer.bias, padding=1)[0].detach()
    var = F.conv2d(x * x, layer.log_sigma2.exp(), padding=1)[0].detach()
    assert ((out.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
    assert ((out.var(0) / var - 1).abs() < 6 * math.sqrt(2 / n)).all()


def test_rows_of_a_batch_get_independent_noise():
    torch.manual_seed(2)
    layer = LinearVBD(5, 1, init_log_sigma2=-2.0).train()
    x = torch.randn(1, 5).expand(2, 5)
    samples = torch.stack([layer(x).detach()[:, 0] for _ in range(5000)])
    corr = torch.corrcoef(samples.T)[0, 1]
    assert abs(corr) < 5 / math.sqrt(5000)
    assert samples[:, 0].std() > 0


def test_gradients_reach_theta_and_log_sigma2():
    layer = LinearVBD(4, 3).train()
    loss = layer(torch.randn(8, 4)).pow(2).sum() + layer.kl()
    loss.backward()
    for p in (layer.weight, layer.log_sigma2, layer.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_eval_is_deterministic_and_equals_the_pruned_posterior_mean():
    torch.manual_seed(3)
    layer = LinearVBD(10, 5)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-12, 2)
    layer.eval()
    x = torch.randn(7, 10)
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    mask = layer.log_alpha <= 3.0
    assert 0 < mask.sum() < mask.numel(), "the test needs both kept and pruned weights"
    assert torch.allclose(a, F.linear(x, layer.weight * mask, layer.bias))


def test_threshold_zeroes_exactly_the_weights_above_it():
    layer = LinearVBD(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # log α = log σ²
        layer.log_sigma2.copy_(torch.tensor([[-1.0, 2.9, 3.1], [5.0, 3.0, -7.0]]))
    expected = torch.tensor([[True, True, False], [False, True, True]])
    assert torch.equal(layer.keep_mask(), expected)
    assert torch.equal(layer.masked_weight() != 0, expected)
    layer.threshold = 0.0
    assert torch.equal(
        layer.keep_mask(), torch.tensor([[True, False, False], [False, False, True]])
    )
    layer.threshold = None
    assert layer.keep_mask().all()


def test_log_alpha_is_clipped_and_finite_when_theta_is_zero():
    layer = LinearVBD(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.log_sigma2.fill_(20.0)
    la = layer.log_alpha
    assert torch.isfinite(la).all() and (la == LOG_ALPHA_RANGE[1]).all()
    with torch.no_grad():
        layer.weight.fill_(1e3)
        layer.log_sigma2.fill_(-50.0)
    assert (layer.log_alpha == LOG_ALPHA_RANGE[0]).all()
    layer.train()
    out = layer(torch.randn(4, 3))
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_state_dict_round_trip_gives_identical_eval_outputs():
    torch.manual_seed(4)
    model = nn.Sequential(Conv2dVBD(1, 4, 3), nn.ReLU(), nn.Flatten(), LinearVBD(4 * 6 * 6, 3))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "log_sigma2"):
                m.log_sigma2.uniform_(-10, 4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = nn.Sequential(Conv2dVBD(1, 4, 3), nn.ReLU(), nn.Flatten(), LinearVBD(4 * 6 * 6, 3))
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model.eval()(x), clone.eval()(x))


def test_works_inside_sequential_beside_plain_layers():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), LinearVBD(6, 4), nn.Tanh(), nn.Linear(4, 2))
    out = model.train()(torch.randn(3, 8))
    assert out.shape == (3, 2)
    out.sum().backward()
    assert model[2].log_sigma2.grad is not None


@pytest.mark.parametrize(
    "plain,variational",
    [
        (lambda: nn.Linear(5, 3), lambda: LinearVBD(5, 3)),
        (lambda: nn.Conv2d(2, 4, 3, padding=1), lambda: Conv2dVBD(2, 4, 3, padding=1)),
    ],
)
def test_a_plain_layers_state_dict_loads_theta_and_bias(plain, variational):
    src, dst = plain(), variational()
    with torch.no_grad():
        dst.log_sigma2.fill_(1.0)
    result = dst.load_state_dict(src.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    assert (dst.log_sigma2 == dst.init_log_sigma2).all()
    # strict loading still reports genuinely missing weights
    with pytest.raises(RuntimeError, match="weight"):
        dst.load_state_dict({"bias": src.bias})


def test_output_shapes_match_the_torch_layers():
    torch.manual_seed(5)
    cases = [
        (nn.Conv1d(2, 3, 3, stride=2), Conv1dVBD(2, 3, 3, stride=2), (4, 2, 9)),
        (nn.Conv2d(2, 3, 3, groups=1, dilation=2), Conv2dVBD(2, 3, 3, dilation=2), (4, 2, 9, 9)),
        (nn.Conv3d(2, 3, 2), Conv3dVBD(2, 3, 2), (4, 2, 5, 5, 5)),
        (nn.Linear(7, 2), LinearVBD(7, 2), (4, 3, 7)),
    ]
    for plain, layer, shape in cases:
        x = torch.randn(shape)
        assert layer.train()(x).shape == plain(x).shape
        layer.load_state_dict(plain.state_dict())
        layer.threshold = None
        assert torch.allclose(layer.eval()(x), plain(x), atol=1e-6)


def test_training_forwards_differ_and_mc_mode_samples_in_eval():
    layer = LinearVBD(6, 4, init_log_sigma2=-1.0)
    x = torch.randn(3, 6)
    assert not torch.equal(layer.train()(x), layer(x))
    layer.eval()
    with mc_sampling(layer):
        assert layer.mc
        assert not torch.equal(layer(x), layer(x))
    assert not layer.mc
    assert torch.equal(layer(x), layer(x))


def test_mc_mode_samples_only_the_kept_weights():
    layer = LinearVBD(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.log_sigma2.copy_(torch.tensor([[-30.0, -30.0, 5.0, 5.0]]))  # last two pruned
    layer.eval()
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    with mc_sampling(layer):
        out = torch.stack([layer(x) for _ in range(200)])
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=1e-3)


def test_kingma_prior_caps_alpha_at_one_for_tied_and_per_weight_alpha():
    for alpha_per in ("unit", "layer"):
        layer = LinearVBD(5, 3, prior="kingma", alpha_per=alpha_per)
        assert not hasattr(layer, "log_sigma2")
        shape = (3, 1) if alpha_per == "unit" else (1, 1)
        assert layer.log_alpha_param.shape == shape
        with torch.no_grad():
            layer.log_alpha_param.fill_(4.0)
        assert (layer.log_alpha <= 0).all()
        assert torch.allclose(layer.sigma2(), layer.weight**2)
        per_alpha = layer.prior.kl(layer.log_alpha).sum()
        assert layer.kl().item() == pytest.approx(per_alpha.item() * 15 / layer.log_alpha.numel())
    layer = LinearVBD(5, 3, prior="kingma")
    with torch.no_grad():
        layer.log_sigma2.fill_(10.0)
    assert (layer.sigma2() <= layer.weight**2 + 1e-7).all()


def test_conv_tied_alpha_per_channel():
    layer = Conv2dVBD(2, 4, 3, prior="kingma", alpha_per="unit")
    assert layer.log_alpha_param.shape == (4, 1, 1, 1)
    assert layer.keep_mask().shape == layer.weight.shape
    assert layer.train()(torch.randn(2, 2, 6, 6)).shape == (2, 4, 4, 4)


def test_train_clip_zeroes_pruned_weights_while_training():
    layer = LinearVBD(3, 1, bias=False, train_clip=True)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.log_sigma2.copy_(torch.tensor([[-30.0, -30.0, 6.0]]))
    out = layer.train()(torch.tensor([[1.0, 2.0, 100.0]]))
    assert out.item() == pytest.approx(3.0, abs=1e-3)


def test_kl_is_the_prior_summed_over_weights():
    layer = LinearVBD(4, 3, prior="log_uniform")
    expected = layer.prior.kl(layer.log_alpha).sum()
    assert layer.kl().item() == pytest.approx(expected.item())
    assert layer.kl().dim() == 0


def test_repr_names_the_method():
    text = repr(Conv2dVBD(1, 2, 3, prior="log_uniform", threshold=2.5))
    assert "kernel_size=(3, 3)" in text and "prior=log_uniform" in text
    assert "threshold=2.5" in text


def test_bad_input_gives_clear_errors():
    layer = LinearVBD(4, 2)
    with pytest.raises(ValueError, match="in_features=4.*shape \\(3, 5\\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    conv = Conv2dVBD(3, 2, 3)
    with pytest.raises(ValueError, match="Conv2dVBD expects inputs of shape \\(N, 3"):
        conv(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown prior 'laplace'"):
        LinearVBD(4, 2, prior="laplace")
    with pytest.raises(ValueError, match="threshold.*clip range"):
        LinearVBD(4, 2, threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold.*clip range"):
        layer.threshold = 100.0
    with pytest.raises(TypeError, match="threshold must be a number"):
        LinearVBD(4, 2, threshold="3")
    with pytest.raises(ValueError, match="alpha_per"):
        LinearVBD(4, 2, alpha_per="neuron")
    assert layer.threshold == 3.0, "a rejected threshold leaves the old one in place"


def test_eval_weight_cache_follows_every_change():
    torch.manual_seed(6)
    layer = LinearVBD(5, 3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        first = layer.eval()(x)
        assert torch.equal(layer(x), first)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after_step = layer.eval()(x)
        assert not torch.equal(after_step, first)
        assert torch.equal(after_step, F.linear(x, layer.masked_weight(), layer.bias))
        layer.log_sigma2.fill_(5.0)  # in-place change of the variance: everything pruned
        assert torch.equal(layer(x), layer.bias.expand(4, 3))
        layer.threshold = None
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.enable_grad():
        out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is not None, "evaluation with autograd still differentiates"


@pytest.mark.parametrize("layer_class", [LinearVBD, StructuredVBD, StructuredBayesianPruning])
def test_eval_cache_follows_a_fused_optimizer_step(layer_class):
    """torch's fused Adam updates parameters without bumping their version counters."""
    torch.manual_seed(7)
    layer = layer_class(5, 5) if layer_class is LinearVBD else layer_class(5)
    x = torch.randn(4, 5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5, fused=True)
    with torch.no_grad():
        before = layer.eval()(x)
    layer.train()(x).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer.eval()(x)
        assert not torch.equal(after, before)
        if layer_class is LinearVBD:
            assert torch.equal(after, F.linear(x, layer.masked_weight(), layer.bias))
        else:
            assert torch.equal(after, x * layer.multiplier())


@pytest.mark.parametrize("layer_class", [LinearVBD, StructuredVBD])
def test_eval_cache_follows_an_attached_fused_optimizer_without_a_mode_switch(layer_class):
    """Steps taken in eval mode: only the hook of attach_optimizer tells the cache."""
    torch.manual_seed(7)
    layer = (layer_class(5, 5) if layer_class is LinearVBD else layer_class(5)).eval()
    x = torch.randn(4, 5)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.5, fused=True)
    attach_optimizer(layer, optimizer)
    with torch.no_grad():
        before = layer(x)
    layer(x).pow(2).sum().backward()  # eval mode, with autograd
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    expected = (
        F.linear(x, layer.masked_weight(), layer.bias)
        if layer_class is LinearVBD
        else x * layer.multiplier()
    )
    assert not torch.equal(after, before) and torch.equal(after, expected)


def test_log_alpha_parameterization_learns_log_alpha_per_weight():
    layer = LinearVBD(4, 3, parameterization="log_alpha", init_log_alpha=-2.0)
    assert not hasattr(layer, "log_sigma2") and layer.log_alpha_param.shape == (3, 4)
    assert torch.allclose(layer.sigma2(), math.exp(-2.0) * layer.weight**2)
    assert "parameterization=log_alpha" in repr(layer)
    out = layer.train()(torch.randn(5, 4))
    (out.sum() + layer.kl()).backward()
    assert layer.log_alpha_param.grad is not None and layer.weight.grad is not None
    with pytest.raises(ValueError, match="parameterization"):
        LinearVBD(4, 3, parameterization="sigma")


def test_noise_for_channels_last_activations_keeps_their_layout_and_distribution():
    from vbdropout.nn.base import standard_normal_like

    t = torch.empty(64, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    noise = standard_normal_like(t)
    assert noise.shape == t.shape and noise.stride() == t.stride()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02  # 5 σ
    per_channel = noise.mean((0, 2, 3))
    assert per_channel.abs().max() < 0.06, "channels are not copies of each other"
    torch.manual_seed(3)
    assert torch.equal(standard_normal_like(t), noise)
    plain = torch.empty(5, 4)
    torch.manual_seed(3)
    first = standard_normal_like(plain)
    torch.manual_seed(3)
    assert torch.equal(first, torch.randn_like(plain)), "contiguous: torch's own draw"
    strided = torch.empty(6, 8)[:, ::2]  # not dense: falls back to torch's draw
    assert standard_normal_like(strided).shape == strided.shape
    conv = Conv2dVBD(8, 4, 3).train()
    out = conv(torch.randn(64, 8, 12, 12).contiguous(memory_format=torch.channels_last))
    assert out.shape == (64, 4, 10, 10) and torch.isfinite(out).all()
