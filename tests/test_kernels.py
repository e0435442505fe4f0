"""The fused CPU kernels (vbdropout.kernels) against their eager PyTorch twins."""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from scipy import stats

from vbdropout import kernels
from vbdropout.nn import Conv1dVBD, Conv2dVBD, LinearVBD, attach_optimizer
from vbdropout.nn.gaussian import _FORWARD_KL
from vbdropout.priors import HierarchicalPrior, LogUniformPrior

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.status())

PRIORS = [HierarchicalPrior(), LogUniformPrior()]


def _weights(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """θ and log σ² spanning small and large α, with exact zeros and extreme variances."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(shape, generator=g) * 0.3
    log_sigma2 = torch.empty(shape).uniform_(-14.0, 4.0, generator=g)
    flat_t, flat_s = theta.view(-1), log_sigma2.view(-1)
    flat_t[:5] = 0.0
    flat_s[5:10] = -80.0
    flat_s[10:15] = 30.0
    return theta, log_sigma2


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.name)
def test_kl_sum_and_gradients_match_the_eager_version(prior):
    theta, log_sigma2 = _weights((301, 97))
    fused_t, fused_s = theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()
    eager_t, eager_s = theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()
    fused = kernels.kl_sum(fused_t, fused_s, prior.kernel_spec())
    eager = prior._kl_sum_additive_eager(eager_t, eager_s)
    reference = prior._kl_sum_additive_eager(theta.double(), log_sigma2.double())
    assert fused.item() == pytest.approx(reference.item(), rel=2e-6)
    (0.7 * fused).backward()
    (0.7 * eager).backward()
    torch.testing.assert_close(fused_t.grad, eager_t.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_s.grad, eager_s.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.name)
def test_sigma2_and_kl_and_weight_grads_follow_their_formulas(prior):
    theta, log_sigma2 = _weights((64, 33), seed=1)
    spec = prior.kernel_spec()
    sigma2, kl = torch.ops.vbdropout.sigma2_and_kl(theta, log_sigma2, spec[0], list(spec[1]))
    torch.testing.assert_close(sigma2, log_sigma2.exp())
    assert kl.item() == pytest.approx(kernels.kl_sum(theta, log_sigma2, spec).item(), rel=1e-6)

    grad_theta, grad_sigma2 = torch.randn_like(theta), torch.randn_like(theta)
    t, s = theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()
    (1.3 * prior._kl_sum_additive_eager(t, s)).backward()
    expected_theta = grad_theta + t.grad
    expected_log_sigma2 = grad_sigma2 * sigma2 + s.grad
    torch.ops.vbdropout.weight_grads_(
        theta, log_sigma2, sigma2, grad_theta, grad_sigma2, spec[0], list(spec[1]),
        torch.tensor(1.3),
    )  # fmt: skip
    torch.testing.assert_close(grad_theta, expected_theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_sigma2, expected_log_sigma2, rtol=1e-5, atol=1e-6)


def test_lrt_sample_is_mean_plus_scaled_standard_normal_noise():
    n = 1 << 20
    mean = torch.randn(n)
    var = 0.25 + torch.rand(n) * 3
    out, dvar = torch.ops.vbdropout.lrt_sample(mean, var, torch.tensor(12345), 1e-8)
    sd = torch.sqrt(var + 1e-8)
    z = ((out - mean) / sd).double()
    torch.testing.assert_close(dvar.double(), z / (2 * sd.double()), rtol=1e-4, atol=1e-5)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean().item() - 3) < 0.05
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # the two numbers of one Box–Muller pair, and neighbours across pairs, are uncorrelated
    for lag in (1, 2):
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def _with_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_lrt_noise_follows_torch_seed_and_not_the_thread_count():
    n = 100_003  # several chunks of work, and odd: the last pair is half used
    mean, var = torch.zeros(n), torch.ones(n)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return kernels.lrt_sample(mean, var, 0.0)

    first = _with_threads(1, lambda: draw(3))
    assert torch.equal(first, _with_threads(2, lambda: draw(3)))
    assert not torch.equal(first, draw(4))
    torch.manual_seed(3)
    assert not torch.equal(kernels.lrt_sample(mean, var, 0.0), kernels.lrt_sample(mean, var, 0.0))


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.name)
def test_kl_sums_and_gradients_do_not_depend_on_the_thread_count(prior):
    theta, log_sigma2 = _weights((700, 301), seed=2)
    spec = prior.kernel_spec()

    def kl_and_grads() -> list[torch.Tensor]:
        t, s = theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_()
        kl = kernels.kl_sum(t, s, spec)
        kl.backward()
        return [kl.detach(), t.grad, s.grad]

    def weight_grads() -> list[torch.Tensor]:
        grads = [torch.ones_like(theta), torch.full_like(theta, 0.5)]
        sigma2 = log_sigma2.exp()
        torch.ops.vbdropout.weight_grads_(
            theta, log_sigma2, sigma2, *grads, spec[0], list(spec[1]), torch.tensor(0.7)
        )
        return grads

    # (a whole layer's gradients are not: the matrix products' are not, eager or fused)
    for fn in (kl_and_grads, weight_grads):
        for a, b in zip(_with_threads(1, fn), _with_threads(2, fn), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.name)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_kl_sum_of_non_finite_weights_is_nan(prior, bad):
    # the kernels are built with -ffast-math, which lets the compiler assume finite
    # values; the sums read the bit patterns so that a NaN still reaches the loss
    for which in (0, 1):
        tensors = list(_weights((50, 40), seed=3))
        tensors[which][7, 3] = bad
        assert math.isnan(kernels.kl_sum(*tensors, prior.kernel_spec()).item())
        spec = prior.kernel_spec()
        _, kl = torch.ops.vbdropout.sigma2_and_kl(*tensors, spec[0], list(spec[1]))
        assert math.isnan(kl.item())


def test_ops_reject_tensors_they_do_not_take():
    theta, log_sigma2 = _weights((8, 4))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.vbdropout.kl_sum(theta.double(), log_sigma2.double(), 0, [])
    with pytest.raises(RuntimeError, match="shape and strides"):
        torch.ops.vbdropout.kl_sum(theta, log_sigma2.t(), 0, [])
    with pytest.raises(RuntimeError, match="unknown prior id"):
        torch.ops.vbdropout.kl_sum(theta, log_sigma2, 7, [])
    with pytest.raises(RuntimeError, match="k1, k2, k3, low, high"):
        torch.ops.vbdropout.kl_sum(theta, log_sigma2, 1, [1.0])


def test_ops_have_valid_schemas_and_fake_implementations():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    theta, log_sigma2 = _weights((6, 5))
    sigma2 = log_sigma2.exp()
    utils = ("test_schema", "test_faketensor")
    ops = torch.ops.vbdropout
    opcheck(ops.kl_sum.default, (theta, log_sigma2, 0, []), test_utils=utils)
    one = torch.tensor(1.0)
    opcheck(ops.kl_sum_backward.default, (theta, log_sigma2, 0, [], one), test_utils=utils)
    opcheck(ops.sigma2_and_kl.default, (theta, log_sigma2, 0, []), test_utils=utils)
    args = (theta, log_sigma2, sigma2, torch.randn(6, 5), torch.randn(6, 5), 0, [], one)
    opcheck(ops.weight_grads_.default, args, test_utils=utils)
    opcheck(
        ops.lrt_sample.default,
        (theta, sigma2, torch.tensor(1), 1e-8),
        test_utils=("test_faketensor",),
    )


def _layer(kind: str, prior, bias: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = LinearVBD(20, 7, bias=bias, prior=prior)
    elif kind == "conv1d":
        layer = Conv1dVBD(3, 5, 3, stride=2, padding=1, bias=bias, prior=prior)
    else:
        layer = Conv2dVBD(4, 6, 3, padding=1, dilation=2, groups=2, bias=bias, prior=prior)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6.0, 1.0)
    return layer.train()


_INPUTS = {
    "linear": lambda: torch.randn(2, 5, 20),  # N-D input: (…, in_features)
    "conv1d": lambda: torch.randn(4, 3, 11),
    "conv2d": lambda: torch.randn(3, 4, 9, 9).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("prior", ["hierarchical", "log_uniform"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_training_forward_gives_the_eager_gradients(kind, prior, bias):
    layer = _layer(kind, prior, bias)
    x = _INPUTS[kind]().requires_grad_()
    out = layer(x)
    kl = layer.kl()
    assert "GaussianTrainingForward" in type(kl.grad_fn).__name__  # the forward's own KL
    weights = torch.randn_like(out)
    ((out * weights).sum() + 0.37 * kl).backward()

    # the eager graph on copies of the parameters, with the noise the fused forward drew
    theta = layer.weight.detach().clone().requires_grad_()
    log_sigma2 = layer.log_sigma2.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    xe = x.detach().clone().requires_grad_()
    mean = layer._apply_weight(xe, theta, b)
    sd = torch.sqrt(layer._apply_weight(xe * xe, log_sigma2.exp(), None) + 1e-8)
    z = (out.detach() - mean.detach()) / sd.detach()
    eager_out = mean + sd * z
    eager_kl = layer.prior._kl_sum_additive_eager(theta, log_sigma2)
    assert kl.item() == pytest.approx(eager_kl.item(), rel=1e-5)
    ((eager_out * weights).sum() + 0.37 * eager_kl).backward()

    assert out.shape == eager_out.shape and out.stride() == mean.stride()
    pairs = [(x, xe), (layer.weight, theta), (layer.log_sigma2, log_sigma2)]
    if bias:
        pairs.append((layer.bias, b))
    for fused, eager in pairs:
        torch.testing.assert_close(fused.grad, eager.grad, rtol=1e-4, atol=1e-5)


def test_fused_gradients_have_the_eager_mean_and_variance_over_noise_draws():
    # the two paths draw different noise streams; over many draws the gradient of a
    # loss must have the same expectation and variance (what training sees)
    torch.manual_seed(0)
    layer = LinearVBD(30, 10).train()
    with torch.no_grad():
        layer.log_sigma2.uniform_(-4.0, 0.0)
    x, weights = torch.randn(16, 30), torch.randn(16, 10)

    def moments(fused: bool, draws: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
        previous = kernels.set_enabled(fused)
        torch.manual_seed(1)
        grads = []
        for _ in range(draws):
            layer.zero_grad(set_to_none=True)
            ((torch.tanh(layer(x)) * weights).sum() + layer.kl()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
        kernels.set_enabled(previous)
        g = torch.stack(grads).double()
        return g.mean(0), g.var(0)

    (mean_f, var_f), (mean_e, var_e) = moments(True), moments(False)
    z = (mean_f - mean_e) / torch.sqrt((var_f + var_e) / 3000)
    assert z.abs().max() < 5 and abs(z.mean()) < 0.5, (z.abs().max(), z.mean())
    assert 0.9 < (var_f.sum() / var_e.sum()).item() < 1.1


def test_forward_kl_is_handed_out_once_and_only_while_valid():
    layer = _layer("linear", "hierarchical", True)
    x = torch.randn(8, 20)

    def is_forward_kl(kl: torch.Tensor) -> bool:
        return "GaussianTrainingForward" in type(kl.grad_fn).__name__

    layer(x)
    assert is_forward_kl(layer.kl())
    assert not is_forward_kl(layer.kl())  # a second call computes it afresh

    layer(x)
    with torch.no_grad():
        assert layer.kl().grad_fn is None  # a value for logging, detached

    # separate backward passes for the data term and the KL (the forward graph is freed
    # by the first) give the gradients of one combined backward
    combined = _layer("linear", "hierarchical", True)
    torch.manual_seed(1)
    (combined(x).sum() + combined.kl()).backward()
    torch.manual_seed(1)
    layer.zero_grad()
    layer(x).sum().backward()
    layer.kl().backward()
    torch.testing.assert_close(layer.weight.grad, combined.weight.grad)
    torch.testing.assert_close(layer.log_sigma2.grad, combined.log_sigma2.grad)

    # a layer holding a forward's KL can still be deep-copied and pickled
    layer(x)
    copy.deepcopy(layer)
    torch.save(layer, io.BytesIO())
    assert is_forward_kl(layer.kl())

    # a step of the run's optimizer (fused Adam does not bump version counters; the hook of
    # attach_optimizer, which every training loop of vbdropout attaches, tells) invalidates it
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    attach_optimizer(layer, opt)
    layer(x)
    opt.step()
    assert layer.kl().item() == pytest.approx(
        layer.prior._kl_sum_additive_eager(layer.weight, layer.log_sigma2).item(), rel=1e-5
    )


def test_forward_kl_is_not_handed_to_other_parameter_tensors():
    # functional_call with detached copies: same storage and versions, other tensors
    layer = _layer("linear", "hierarchical", True)
    x = torch.randn(8, 20)
    params = {k: v.detach().requires_grad_() for k, v in layer.named_parameters()}
    out = torch.func.functional_call(layer, params, (x,))
    (out.sum() + layer.kl()).backward()
    assert layer.log_sigma2.grad is not None and params["log_sigma2"].grad is not None
    expected = torch.autograd.grad(
        layer.prior._kl_sum_additive_eager(layer.weight, layer.log_sigma2), layer.log_sigma2
    )[0]
    torch.testing.assert_close(layer.log_sigma2.grad, expected, rtol=1e-5, atol=1e-6)


def test_a_prior_that_overrides_the_additive_kl_sum_keeps_its_own():
    class Zero(HierarchicalPrior):
        def kl_sum_additive(self, theta, log_sigma2):
            return 0 * theta.sum()

    assert Zero().kernel_spec() is None
    layer = LinearVBD(6, 3, prior=Zero()).train()
    layer(torch.randn(4, 6))
    assert layer.kl().item() == 0.0


def test_compiled_layers_do_not_hand_out_a_freed_graph():
    layer = _layer("linear", "hierarchical", True)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(8, 20)
    compiled(x).sum().backward()  # the data term alone, as its own backward
    layer.kl().backward()  # recomputed: the compiled forward kept no KL for it
    assert torch.isfinite(layer.log_sigma2.grad).all()


def test_layers_run_eagerly_where_the_kernels_do_not_apply():
    for layer, x in [
        (LinearVBD(6, 3).double(), torch.randn(4, 6, dtype=torch.float64)),  # not float32
        (LinearVBD(6, 3, prior="kingma"), torch.randn(4, 6)),  # capped α
        (LinearVBD(6, 3, alpha_per="unit"), torch.randn(4, 6)),  # tied α
        (LinearVBD(6, 3, train_clip=True), torch.randn(4, 6)),  # masks in training
        (Conv2dVBD(2, 3, 3, padding="same"), torch.randn(1, 2, 5, 5)),  # string padding
        (Conv2dVBD(2, 3, 3, padding_mode="reflect", padding=1), torch.randn(1, 2, 5, 5)),
        (  # θ channels-last, log σ² not
            torch.nn.utils.convert_conv2d_weight_memory_format(
                Conv2dVBD(3, 4, 3), torch.channels_last
            ),
            torch.randn(2, 3, 6, 6),
        ),
    ]:
        layer.train()
        out = layer(x)
        out.sum().backward()
        assert layer not in _FORWARD_KL
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_a_prior_subclass_with_its_own_kl_gets_neither_the_parents_kernel_nor_closed_form():
    class Doubled(HierarchicalPrior):
        def kl(self, log_alpha: torch.Tensor) -> torch.Tensor:
            return 2 * super().kl(log_alpha)

    assert HierarchicalPrior().kernel_spec() == (0, ())
    assert Doubled().kernel_spec() is None
    prior = Doubled()
    for fused in (True, False):
        previous = kernels.set_enabled(fused)
        try:
            layer = LinearVBD(6, 3, prior=prior).train()
            layer(torch.randn(4, 6))
            theta, log_sigma2 = layer.weight, layer.log_sigma2
            expected = prior.kl(prior.clip(log_sigma2 - torch.log(theta * theta + 1e-8))).sum()
            assert layer.kl().item() == pytest.approx(expected.item(), rel=1e-5)
        finally:
            kernels.set_enabled(previous)


def test_cpu_autocast_runs_the_eager_path():
    layer = LinearVBD(20, 7).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 20))
    assert out.dtype == torch.bfloat16 and layer not in _FORWARD_KL
    out.float().sum().backward()
    assert torch.isfinite(layer.log_sigma2.grad).all()


def test_set_enabled_switches_to_the_eager_path():
    layer = _layer("linear", "hierarchical", True)
    previous = kernels.set_enabled(False)
    try:
        assert kernels.status().startswith("eager: disabled")
        layer(torch.randn(3, 20))
        assert layer not in _FORWARD_KL
        assert "GaussianTrainingForward" not in type(layer.kl().grad_fn).__name__
        with pytest.raises(RuntimeError, match="not in use: eager: disabled"):
            kernels.kl_sum(layer.weight, layer.log_sigma2, (0, ()))
    finally:
        kernels.set_enabled(previous)
    assert kernels.status() == "fused"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_environment_variable_and_failed_build_fall_back_to_eager(tmp_path):
    step = """
        import torch
        from vbdropout import kernels
        from vbdropout.nn import LinearVBD
        layer = LinearVBD(6, 3).train()
        (layer(torch.randn(4, 6)).sum() + layer.kl()).backward()
        assert torch.isfinite(layer.log_sigma2.grad).all()
        print(kernels.status())
    """
    disabled = _python(step, VBDROPOUT_CPU_KERNELS="0")
    assert disabled.returncode == 0, disabled.stderr
    assert "eager: disabled" in disabled.stdout
    broken = _python(step, CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    assert "eager: build failed" in broken.stdout
    assert "vbdropout CPU kernels unavailable" in broken.stderr  # said once, as a warning log


def test_a_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path):
    from vbdropout.kernels import build

    name_of = """
        from torch.utils.cpp_extension import _get_build_directory
        from vbdropout.kernels import build
        print(_get_build_directory(build._extension_name(build._compile_flags()), False))
    """
    found = _python(name_of, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert found.returncode == 0, found.stderr
    lock = Path(found.stdout.strip()) / "lock"
    lock.write_text("")  # what a SIGKILLed build leaves behind
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    result = _python(
        "from vbdropout import kernels; print(kernels.status())", TORCH_EXTENSIONS_DIR=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fused"
    assert "left" in result.stderr and "by a build that did not finish" in result.stderr


def test_loading_the_kernels_keeps_denormal_floats():
    # -ffast-math at link time would set flush-to-zero for the whole process on load
    result = _python(
        """
        import torch
        from vbdropout import kernels
        assert kernels.available()
        tiny = torch.tensor([1e-39]) * torch.tensor([1.0])
        print(tiny.item() != 0.0)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
