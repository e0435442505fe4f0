"""The dropout baselines of Tables 1–3: each module's own contract, and every method end to end.

Statistical tolerances: a mean over n samples is checked to 5 standard errors
(σ/√n), a variance to 6 relative standard errors (√(2/n) for Gaussian-like
noise); with fixed seeds the tests are deterministic, the margins keep them
valid for other seeds and BLAS thread counts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbdropout.losses import elbo_loss, kl_divergence
from vbdropout.models import METHODS, build_model, get_method
from vbdropout.nn import LinearVBD, StochasticModule, mc_sampling
from vbdropout.nn.adversarial import (
    AdversarialDropout,
    AdversarialDropoutNet,
    adversarial_flip,
    divergence,
)
from vbdropout.nn.concrete import ConcreteDropout
from vbdropout.nn.dropout import BernoulliDropout, GaussianDropout, VariationalGaussianDropout
from vbdropout.nn.fast_dropout import Conv2dFastDropout, LinearFastDropout
from vbdropout.priors import KingmaLogUniformPrior

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
needs_mnist = pytest.mark.skipif(
    not (REAL_DATA / "mnist").is_dir(), reason=f"real MNIST not found at {REAL_DATA}"
)
NEEDS_N = {"concrete", "adversarial", "pruning", "dns", "ssl"}


pytestmark = pytest.mark.usefixtures("one_thread")


def options(method: str, dataset_size: int = 1000) -> dict | None:
    return {"dataset_size": dataset_size} if method in NEEDS_N else None


# ---------------------------------------------------------------- fixed-rate noise


@pytest.mark.parametrize("cls", [BernoulliDropout, GaussianDropout])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_noise_keeps_the_expectation_and_has_dropout_variance(cls, p):
    torch.manual_seed(0)
    n, d = 4000, 300
    x = torch.rand(1, d) + 0.5  # positive, so ξ = y/x is the noise itself
    module = cls(p).train()
    xi = module(x.expand(n, d)) / x
    v = p / (1 - p)
    assert ((xi.mean(0) - 1).abs() < 5 * math.sqrt(v / n)).all()
    # pooled variance over n·d samples, relative standard error about sqrt(2/(n·d))
    assert abs(xi.var() / v - 1) < 6 * math.sqrt(2 / (n * d)) * 2
    assert torch.equal(module.eval()(x), x)  # evaluation: identity
    module.mc = True  # Monte-Carlo evaluation samples
    assert not torch.equal(module(x), x)


def test_bernoulli_mask_can_be_fixed_and_is_recorded():
    module = BernoulliDropout(0.5).train()
    x = torch.randn(4, 6)
    mask = (torch.arange(24).view(4, 6) % 2).float()
    module.mask = mask
    assert torch.equal(module(x), x * mask * 2)
    assert torch.equal(module.last_mask, mask)
    module.mask = torch.ones(2, 6)
    with pytest.raises(ValueError, match="mask has shape"):
        module(x)


# ---------------------------------------------------------------- fast dropout


def test_fast_dropout_matches_monte_carlo_bernoulli_dropout_linear():
    torch.manual_seed(1)
    p, n = 0.5, 20_000
    layer = LinearFastDropout(40, 3, p=p)
    x = torch.randn(1, 40)
    w, b = layer.weight.detach(), layer.bias.detach()
    mean = F.linear(x, w, b)[0]
    var = p / (1 - p) * F.linear(x * x, w * w)[0]
    z = torch.empty(n, 40).bernoulli_(1 - p)
    bern = F.linear(x * z / (1 - p), w, b)  # the dropped-out pre-activation itself
    fast = layer.train()(x.expand(n, 40)).detach()
    for samples in (bern, fast):
        assert ((samples.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
        assert ((samples.var(0) / var - 1).abs() < 6 * math.sqrt(2 / n)).all()
    assert torch.allclose(layer.eval()(x), F.linear(x, w, b))  # eval: mean weights
    assert float(layer.kl()) == 0.0
    assert not layer.log_alpha_param.requires_grad  # α = p/(1 − p) is fixed
    assert math.isclose(layer.log_alpha.item(), math.log(p / (1 - p)), abs_tol=1e-6)


def test_fast_dropout_matches_monte_carlo_bernoulli_dropout_conv():
    torch.manual_seed(2)
    p, n = 0.2, 10_000
    layer = Conv2dFastDropout(2, 3, 3, padding=1, p=p)
    x = torch.randn(1, 2, 5, 5)
    w, b = layer.weight.detach(), layer.bias.detach()
    mean = F.conv2d(x, w, b, padding=1)[0]
    var = p / (1 - p) * F.conv2d(x * x, w * w, padding=1)[0]
    z = torch.empty(n, 2, 5, 5).bernoulli_(1 - p)  # elementwise mask on the conv input
    bern = F.conv2d(x * z / (1 - p), w, b, padding=1)
    fast = layer.train()(x.expand(n, 2, 5, 5)).detach()
    for samples in (bern, fast):
        assert ((samples.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all()
        # Bernoulli sums of 18 terms are slightly heavier-tailed than Gaussian: 8 rel. s.e.
        assert ((samples.var(0) / var - 1).abs() < 8 * math.sqrt(2 / n)).all()


# ---------------------------------------------------------------- Kingma's VD


def test_vd_a_noise_variance_is_alpha_per_unit_and_kl_counts_every_weight():
    torch.manual_seed(3)
    module = VariationalGaussianDropout(4, weights_per_unit=3, p=0.5)
    with torch.no_grad():
        module.log_alpha_param.copy_(torch.tensor([-3.0, -2.0, -1.0, 0.0]))
    n = 20_000
    x = torch.ones(n, 4, 2, 2)  # a conv input: α per channel, noise per element
    xi = module.train()(x)
    alpha = module.alpha.detach()
    per_channel = xi.transpose(0, 1).reshape(4, -1).var(1)
    assert ((per_channel / alpha - 1).abs() < 6 * math.sqrt(2 / (4 * n))).all()
    expected = 3 * KingmaLogUniformPrior().kl(module.log_alpha).sum()
    assert torch.allclose(module.kl(), expected)
    layer_wide = VariationalGaussianDropout(4, weights_per_unit=3, alpha_per="layer")
    assert torch.allclose(layer_wide.kl(), 12 * KingmaLogUniformPrior().kl(layer_wide.log_alpha))
    assert torch.equal(module.eval()(x[:2]), x[:2])


@pytest.mark.parametrize("method", ["vd_a", "vd_b"])
def test_vd_alpha_never_exceeds_one(method):
    torch.manual_seed(4)
    model = build_model("lenet300_100", method)
    layers = [m for m in model.modules() if isinstance(m, (VariationalGaussianDropout, LinearVBD))]
    # initial α = p/(1 − p) by position: 0.25 on the input, 1 on hidden units
    assert [round(m.log_alpha.exp().max().item(), 4) for m in layers] == [0.25, 1.0, 1.0]
    raw = [m.log_alpha_param for m in layers]
    opt = torch.optim.Adam(raw, lr=0.2)
    for _ in range(30):  # Kingma's KL decreases in α: minimizing it pushes α up
        opt.zero_grad()
        (kl_divergence(model) - sum(r.sum() for r in raw)).backward()
        opt.step()
    assert all(r.max() > 0.5 for r in raw)  # the raw parameters went far past the cap ...
    for m in layers:
        assert m.log_alpha.max() <= 0.0  # ... but α stays ≤ 1
    x = torch.ones(2000, 1, 28, 28)
    hidden = model[1][0] if method == "vd_a" else None
    if hidden is not None:  # and so does the noise the layer really injects
        assert (hidden.train()(x.flatten(1)).var(0) < 1 + 6 * math.sqrt(2 / 2000)).all()


def test_vd_a_and_vd_b_have_the_same_kl_when_every_weight_has_the_same_alpha():
    a = kl_divergence(build_model("lenet300_100", "vd_a"))
    b = kl_divergence(build_model("lenet300_100", "vd_b"))
    assert torch.allclose(a, b, rtol=1e-5)
    # layer-wide α: KL of a 784·300 + 300·100 + 100·10 weight network at the same α
    c = kl_divergence(build_model("lenet300_100", "vd_a", method_options={"alpha_per": "layer"}))
    assert torch.allclose(a, c, rtol=1e-5)


# ---------------------------------------------------------------- concrete dropout


def test_concrete_mask_approaches_bernoulli_as_temperature_falls():
    torch.manual_seed(5)
    module = ConcreteDropout(nn.Linear(3, 2), dataset_size=100, init_p=0.3)
    fractions, means = [], []
    for t in (1.0, 0.1, 0.01):
        z = module.sample_mask((200_000,), temperature=t).detach()
        fractions.append(((z < 0.01) | (z > 0.99)).float().mean().item())
        means.append(z.mean().item())
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[2] > 0.95  # ≈ 0.98 expected at t = 0.01
    assert abs(means[2] - 0.7) < 0.01  # keep probability 1 − p; s.e. ≈ 0.001
    x = torch.randn(5, 3)
    assert torch.equal(module.eval()(x), module.layer(x))  # eval: the plain layer


def test_concrete_regularizer_is_the_papers_in_whole_training_set_nats():
    torch.manual_seed(6)
    n, scale = 500, 0.1
    module = ConcreteDropout(nn.Linear(7, 3), dataset_size=n, length_scale=scale, init_p=0.2)
    p = module.p.detach()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    w2 = module.layer.weight.detach().pow(2).sum()
    assert torch.allclose(module.kl(), scale**2 * w2 / (1 - p) - 7 * entropy, rtol=1e-5)
    # the reference code's per-example coefficients, converted with N
    ref = ConcreteDropout(
        nn.Linear(7, 3), dataset_size=n, weight_regularizer=1e-6, dropout_regularizer=1e-5
    )
    p, w2 = ref.p.detach(), ref.layer.weight.detach().pow(2).sum()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    assert torch.allclose(ref.kl(), n * (1e-6 * w2 / (1 - p) - 1e-5 * 7 * entropy), rtol=1e-5)
    conv = ConcreteDropout(nn.Conv2d(3, 4, 3), dataset_size=n)
    with pytest.raises(RuntimeError, match="first forward"):
        conv.kl()
    conv(torch.randn(2, 3, 8, 8))
    assert conv.input_dim == 3 * 8 * 8  # K: elementwise noise on the conv input


@pytest.mark.parametrize(
    ("dataset_size", "informative", "moves"),
    [(50, False, "up"), (1_000_000, True, "down")],
)
def test_concrete_rate_is_learned(dataset_size, informative, moves):
    """Few examples and nothing to fit: −K·H(p)/N pulls p up towards ½.
    Many examples and a fit that dropout hurts: the data term pulls p down."""
    torch.manual_seed(7)
    module = ConcreteDropout(nn.Linear(20, 2), dataset_size=dataset_size, init_p=0.1).train()
    x = torch.randn(200, 20)
    y = (x[:, 0] > 0).long() if informative else torch.randint(0, 2, (200,))
    opt = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        elbo_loss(module(x), y, module, dataset_size, reduction="mean").backward()
        opt.step()
    p = module.p.item()
    assert p > 0.15 if moves == "up" else p < 0.08, p


# ---------------------------------------------------------------- adversarial dropout


def test_adversarial_flip_follows_the_first_order_gains():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    jac = torch.tensor([[-3.0, 2.0, 5.0, -1.0, -0.5]])  # gains J·(1 − 2m) = 3, −2, 5, −1, .5
    assert adversarial_flip(mask, jac, 2).tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]
    assert adversarial_flip(mask, jac, 10).tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0]]
    assert torch.equal(adversarial_flip(mask, jac, 0), mask)


def test_adversarial_mask_raises_the_divergence_within_the_hamming_bound():
    torch.manual_seed(8)
    model = build_model("lenet300_100", "adversarial", method_options={"dataset_size": 1000})
    assert isinstance(model, AdversarialDropoutNet)
    x = torch.randn(128, 1, 28, 28)
    logits = model.train()(x).detach()
    site = next(m for m in model.modules() if isinstance(m, AdversarialDropout))
    others = [m for m in model.modules() if type(m) is BernoulliDropout]
    start, adv = site.start_mask, site.last_mask
    other_masks = [m.last_mask for m in others]

    def d(mask):  # D[f(x; ε_s), f(x; ε)] with the adversarial branch's other masks
        with torch.no_grad():
            for m, fixed in zip(others, other_masks, strict=True):
                m.mask = fixed
            site.mask = mask
            out = divergence(logits, model.network(x))
            for m in [*others, site]:
                m.mask = None
        return out

    d_start, d_adv = d(start), d(adv)
    assert torch.allclose(model.kl(), 1.0 * 1000 * d_adv.mean(), rtol=1e-4)  # λ·N·D
    hamming = (adv != start).sum(1)
    assert (hamming <= math.floor(0.05 * 100)).all() and (hamming > 0).all()
    assert (d_adv > d_start).float().mean() > 0.9
    assert d_adv.mean() > 1.5 * d_start.mean()
    gen = torch.Generator().manual_seed(0)  # random flips of as many units do far less
    for _ in range(3):
        rank = torch.rand(start.shape, generator=gen).argsort(1).argsort(1)
        random_mask = torch.where(rank < hamming[:, None], 1 - start, start)
        assert d(random_mask).mean() < d_adv.mean()
    copy.deepcopy(model)  # the stored divergence (a graph) does not block copies
    model.eval()(x)
    assert float(model.kl()) == 0.0  # no divergence from an evaluation forward


# ---------------------------------------------------------------- every method


def test_registry_lists_every_method():
    expected = (
        "none bernoulli gaussian fast_dropout vd_a vd_b concrete adversarial vbd sparse_vd "
        "vbd_structured sparse_vd_structured sbp pruning dns sws ssl"
    )
    assert sorted(METHODS) == sorted(expected.split(" "))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_builds_lenet5_and_runs_train_and_eval(method):
    torch.manual_seed(9)
    model = build_model("lenet5_caffe", method, method_options=options(method))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    logits = model.train()(x)
    assert logits.shape == (4, 10)
    loss = elbo_loss(logits, y, model, dataset_size=1000, reduction="mean")
    assert torch.isfinite(loss)
    loss.backward()
    assert model.eval()(x).shape == (4, 10)
    with mc_sampling(model):
        a, b = model(x), model(x)
    # mc_sampling reaches every stochastic module, plain dropout included
    # the pruning baselines regularize (kl()) but draw no noise
    noiseless = {"none", "pruning", "dns", "sws", "ssl"}
    assert (method != "none") == any(isinstance(m, StochasticModule) for m in model.modules())
    assert (not torch.equal(a, b)) == (method not in noiseless)


@pytest.mark.parametrize("method", ["bernoulli", "gaussian", "vd_a", "concrete", "adversarial"])
def test_conv_inputs_get_elementwise_noise_with_input_rates(method):
    model = build_model("lenet5_caffe", method, method_options=options(method))
    modules = list(model.modules())
    first = next(
        m
        for m in modules
        if isinstance(
            m, (BernoulliDropout, GaussianDropout, VariationalGaussianDropout, ConcreteDropout)
        )
    )
    torch.manual_seed(10)
    x = torch.ones(1, 1, 28, 28)
    if isinstance(first, ConcreteDropout):
        assert math.isclose(first.p.item(), 0.1, rel_tol=1e-5)  # reference init, every layer
        first.train()(x)
        assert first.input_dim == 28 * 28  # K counts every element of the conv input
        noisy = x * first.sample_mask(x.shape)
    else:
        if isinstance(first, VariationalGaussianDropout):
            assert math.isclose(first.alpha.max().item(), 0.25, rel_tol=1e-5)
            assert first.weights_per_unit == 20 * 5 * 5
        else:
            assert first.p == 0.2  # network input
        noisy = first.train()(x)
    # one channel: the noise differs between positions, so it is drawn per element
    assert noisy.shape == x.shape and noisy.flatten().unique().numel() > 1


def test_errors():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        build_model("lenet300_100", "magic")
    for method in ("bernoulli", "gaussian", "fast_dropout", "vd_a", "vd_b", "adversarial"):
        extra = options(method) or {}
        with pytest.raises(ValueError, match=r"p must be a dropout rate in \(0, 1\), got 1.0"):
            build_model("lenet300_100", method, method_options={"p": 1.0, **extra})
        with pytest.raises(ValueError, match=r"p_input must be a dropout rate in \(0, 1\)"):
            build_model("lenet300_100", method, method_options={"p_input": 0.0, **extra})
    for cls in (BernoulliDropout, GaussianDropout):
        with pytest.raises(ValueError, match=r"in \(0, 1\), got -0.1"):
            cls(-0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        LinearFastDropout(3, 2, p=1.0)
    with pytest.raises(ValueError, match="outside the layers' clip range"):
        LinearFastDropout(3, 2, p=1e-5)
    with pytest.raises(ValueError, match=r"init_p must be a dropout rate in \(0, 1\)"):
        build_model("lenet300_100", "concrete", method_options={"dataset_size": 10, "init_p": 1})
    for method in ("concrete", "adversarial"):
        with pytest.raises(ValueError, match=f"method '{method}' needs the option dataset_size"):
            build_model("lenet300_100", method)
        with pytest.raises(ValueError, match="dataset_size must be a positive int"):
            get_method(method, dataset_size=0)
    with pytest.raises(ValueError, match="bad options for method 'bernoulli'"):
        build_model("lenet300_100", "bernoulli", method_options={"threshold": 3.0})
    with pytest.raises(ValueError, match="alpha_per must be 'unit' or 'layer'"):
        get_method("vd_b", alpha_per="weight")
    with pytest.raises(ValueError, match="delta must be a fraction"):
        AdversarialDropoutNet(nn.Sequential(), dataset_size=10, delta=2.0)


def test_wrap_hook_defaults_to_the_network_itself():
    assert isinstance(build_model("lenet300_100", "bernoulli"), nn.Sequential)
    model = build_model("lenet300_100", "adversarial", method_options={"dataset_size": 10})
    assert isinstance(model, AdversarialDropoutNet)
    assert isinstance(model[5][0], AdversarialDropout) and len(model) == 6


# ---------------------------------------------------------------- real MNIST

TRAIN_N, EPOCHS, TEST_N = 20_000, 2, 2000
MAX_ERROR = 0.12  # measured 7.4–9.9% for every method (seeds 0, 1); chance is 90%


@pytest.fixture(scope="module")
def mnist():
    from vbdropout.data import load_dataset

    return load_dataset("mnist", REAL_DATA, train_subset=TRAIN_N)


@needs_mnist
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_learns_mnist_with_lenet300_100(mnist, method):
    """2 epochs on the first 20 000 training images, Adam 1e-3, batch 100; the KL
    weight β is 0 in the first epoch and 1 in the second (a one-epoch warm-up, as
    the library's protocols do: with β = 1 from the start, VBD and sparse VD prune
    nearly every weight before the data term catches up). Test error on the first
    2000 test images, which are harder than the rest of the test set."""
    from vbdropout.train.loop import evaluate, train_epoch

    torch.manual_seed(0)
    model = build_model("lenet300_100", method, method_options=options(method, TRAIN_N))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(EPOCHS):
        stats = train_epoch(
            model,
            opt,
            mnist.train_x,
            mnist.train_y,
            batch_size=100,
            kl_weight=float(epoch > 0),
            generator=gen,
        )
        assert math.isfinite(stats["loss"])
    error = evaluate(model, mnist.test_x[:TEST_N], mnist.test_y[:TEST_N])["error"]
    assert error < MAX_ERROR, f"{method}: test error {error:.4f}"
    if method == "concrete":  # the learned rates moved from their initial 0.1
        rates = [m.p.item() for m in model.modules() if isinstance(m, ConcreteDropout)]
        assert all(abs(r - 0.1) > 1e-3 for r in rates), rates


def test_one_registry_checks_what_a_method_declares():
    from vbdropout.models.methods import RUN_OPTIONS, Method, method_class, register

    assert list(METHODS)[:3] == ["none", "bernoulli", "gaussian"]  # the CLI's listing order
    assert list(METHODS)[-4:] == ["pruning", "dns", "sws", "ssl"]
    assert all(method_class(name).name == name for name in METHODS)
    with pytest.raises(ValueError, match="unknown method 'magic'; known methods: none, "):
        method_class("magic")

    class Twice(Method):
        name = "vbd"

    class Odd(Method):
        name = "odd"
        run_options = ("threshold",)

    for cls, match in ((Twice, "registered twice"), (Odd, r"unknown run options \['threshold'\]")):
        with pytest.raises(ValueError, match=match):
            register(cls)
    assert "odd" not in METHODS and METHODS["vbd"].__name__ == "VBD"
    run = {key: object() for key in RUN_OPTIONS}
    run.update(dataset_size=60, log_alpha_threshold=2.0, train_clip=True, unit_threshold=-1.0)
    assert method_class("vbd").from_run(run).options["threshold"] == 2.0
    assert method_class("vbd_structured").from_run(run).options["threshold"] == -1.0
    assert method_class("concrete").from_run(run).options["dataset_size"] == 60
    assert repr(method_class("bernoulli").from_run(run)) == "Bernoulli(p=0.5, p_input=0.2)"
