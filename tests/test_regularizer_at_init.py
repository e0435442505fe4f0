"""Every method's regularizer pushes its parameters from the first step on.

A clamp in front of a KL or penalty passes no gradient outside its range; the
structured VBD layer once started at log α ≈ −9 under a clip at −8, so its KL
moved no unit until the data term happened to lift it (issue 16). These tests
build every method the way a run does (``resolve_config`` + ``build_run_model``,
so the options a run hands to the method are the ones checked) and take the
gradient of each module's ``kl()`` at the initial values.
"""

import pytest
import torch

from vbdropout.data import Dataset
from vbdropout.models import METHODS, build_model
from vbdropout.models.methods import RUN_OPTIONS
from vbdropout.nn.base import VariationalModule
from vbdropout.nn.structured import StructuredVBD
from vbdropout.nn.sws import LinearSWS
from vbdropout.train.config import TrainConfig, resolve_config
from vbdropout.train.runs import build_run_model

# methods whose modules have no regularizer: nothing to push
NO_REGULARIZER = {"none", "bernoulli", "gaussian", "fast_dropout"}


@pytest.fixture(scope="module")
def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return Dataset("fake", x, y, x[:8], y[:8], 10, (0.0,), (1.0,))


def _pushed_fraction(module: VariationalModule) -> float:
    """Fraction of the module's non-bias parameter elements that get a non-zero KL gradient."""
    named = [(n, p) for n, p in module.named_parameters() if not n.endswith("bias")]
    kl = module.kl()
    assert kl.requires_grad, f"{type(module).__name__}.kl() does not depend on its parameters"
    grads = torch.autograd.grad(kl, [p for _, p in named], allow_unused=True)
    used = [g for g in grads if g is not None]
    assert used, f"{type(module).__name__}.kl() has no gradient"
    assert all(torch.isfinite(g).all() for g in used)
    return sum(int((g != 0).sum()) for g in used) / sum(g.numel() for g in used)


@pytest.mark.parametrize("model_name", ["lenet300_100", "lenet5_caffe"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - NO_REGULARIZER - {"sws"}))
def test_every_regularizer_has_a_gradient_at_initialization(method, model_name, data):
    torch.manual_seed(0)
    config = resolve_config(TrainConfig(model=model_name, method=method))
    model = build_run_model(config, data).train()
    model(data.train_x[:16])  # some regularizers are computed in the forward pass
    modules = [m for m in model.modules() if isinstance(m, VariationalModule)]
    assert modules
    # sparse VD's [−8, 8] clip holds the ~0.2% of weights that start above log α = 8
    # (|θ| < 1.2e−4 with log σ² = −10): they are already pruned; every other one is pushed.
    # Adversarial dropout's divergence between two forward passes reaches no weight behind
    # a ReLU that is off for the whole batch (~5% of them here).
    least = 0.9 if method == "adversarial" else 0.99
    for module in modules:
        assert _pushed_fraction(module) >= least, type(module).__name__


def test_sws_prior_pushes_once_it_is_active(data):
    """SWS's prior is off for the first ``start`` of the run by design (a schedule, not a
    clamp); from its first epoch on it pushes every weight."""
    model = build_model("lenet300_100", "sws", method_options={"start": 0.0}).train()
    layers = [m for m in model.modules() if isinstance(m, LinearSWS)]
    assert layers and all(_pushed_fraction(m) >= 0.99 for m in layers)


@pytest.mark.parametrize("prior", ["hierarchical", "log_uniform"])
def test_structured_vbd_kl_moves_every_unit_at_its_initial_values(prior):
    """θ ≈ 1, log σ² = −9 (log α ≈ −9): the KL is the closed form at the unclipped log α
    and its gradient on θ and log σ² is non-zero for every unit."""
    torch.manual_seed(0)
    layer = StructuredVBD(5, prior=prior)
    assert (layer.log_alpha < -8.5).all(), "starts below the weight layers' clip range"
    kl = layer.kl()
    raw = layer.log_sigma2 - torch.log(layer.theta**2 + 1e-8)
    assert torch.allclose(kl, layer.prior.kl(raw).sum())
    if prior == "hierarchical":  # ½·log(1 + θ²/σ²) exactly
        exact = 0.5 * torch.log1p(layer.theta**2 / layer.log_sigma2.exp()).sum()
        assert torch.allclose(kl, exact, rtol=1e-5)
    d_theta, d_log_sigma2 = torch.autograd.grad(kl, [layer.theta, layer.log_sigma2])
    assert (d_theta > 0).all(), "the KL shrinks θ towards 0"
    assert (d_log_sigma2 < 0).all(), "the KL grows σ²"


def test_every_method_declares_only_known_run_options():
    for name, method in METHODS.items():
        assert set(method.run_options) <= set(RUN_OPTIONS), name
