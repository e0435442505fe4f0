"""Convolutions train channels-last on a CPU (``train.runs.to_run_device``): the same
function, the fused kernels still right, and restored optimizer moments in the weights'
layout (torch's fused CPU Adam pairs tensors in memory order)."""

import io

import pytest
import torch
import torch.nn.functional as F

from vbdropout import kernels
from vbdropout.data import Dataset
from vbdropout.losses import elbo_loss
from vbdropout.models.methods import METHODS
from vbdropout.nn import Conv2dVBD
from vbdropout.train.config import TrainConfig, resolve_config
from vbdropout.train.loop import make_adam
from vbdropout.train.runs import build_run_model, to_run_device
from vbdropout.train.state import restore_training_state

CPU = torch.device("cpu")


def _fake_mnist(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Dataset("fake", x, y, x[:8], y[:8], 10, (0.0,), (1.0,))


def _run_model(method, model="lenet5_caffe", data=None):
    config = resolve_config(TrainConfig(model=model, method=method))
    return build_run_model(config, data or _fake_mnist())


def test_a_cpu_run_puts_convolution_weights_channels_last_and_leaves_mlps_alone():
    conv = to_run_device(_run_model("vbd"), CPU)
    four_d = [p for p in conv.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert any(not p.is_contiguous() for p in four_d)  # reordered where C > 1
    mlp = _run_model("vbd", model="lenet300_100")
    before = {k: v.stride() for k, v in mlp.state_dict().items()}
    after = {k: v.stride() for k, v in to_run_device(mlp, CPU).state_dict().items()}
    assert before == after


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_computes_the_same_function_channels_last(method):
    data = _fake_mnist()
    torch.manual_seed(0)
    contiguous = _run_model(method, data=data).eval()
    last = _run_model(method, data=data)
    last.load_state_dict(contiguous.state_dict())
    last = to_run_device(last, CPU).eval()
    x = data.train_x[:16]
    with torch.no_grad():
        torch.testing.assert_close(last(x), contiguous(x), rtol=1e-4, atol=1e-5)
    last.train()
    loss = elbo_loss(last(x), data.train_y[:16], last, dataset_size=32, reduction="mean")
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in last.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("fused", [True, False])
def test_lrt_convolution_channels_last_samples_and_differentiates_exactly(fused):
    """out = mean + sqrt(var + ε)·z: recover z from the channels-last layer's output with
    contiguous reference convolutions; a layout mix-up would pair a mean with another
    element's variance (|z| in the hundreds here). Then both gradients against their
    closed forms given that z."""
    if fused and not kernels.available():
        pytest.skip(f"fused kernels unavailable: {kernels.status()}")
    torch.manual_seed(0)
    layer = Conv2dVBD(3, 6, 3, padding=1)
    with torch.no_grad():  # σ = 0.03·|θ|: a noise small against the mean
        layer.log_sigma2.copy_(torch.log(layer.weight**2 * 1e-3 + 1e-12))
    layer = layer.to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    c = torch.randn(4, 6, 8, 8)
    previous = kernels.set_enabled(fused)
    try:
        out = layer(x)
        (out * c).sum().backward()
    finally:
        kernels.set_enabled(previous)
    theta, sigma2 = layer.weight.detach().contiguous(), layer.log_sigma2.detach().exp()
    xc = x.contiguous().requires_grad_(False)
    mean = F.conv2d(xc, theta, layer.bias.detach(), padding=1)
    var = F.conv2d(xc * xc, sigma2.contiguous(), padding=1) + 1e-8
    z = (out.detach() - mean) / var.sqrt()
    assert z.abs().max() < 6 and abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    theta_ref = theta.clone().requires_grad_(True)
    s2_ref = sigma2.contiguous().clone().requires_grad_(True)
    ref = (
        F.conv2d(xc, theta_ref, padding=1)
        + F.conv2d(xc * xc, s2_ref, padding=1).add(1e-8).sqrt() * z
    )
    grad_theta, grad_s2 = torch.autograd.grad((ref * c).sum(), (theta_ref, s2_ref))
    torch.testing.assert_close(layer.weight.grad, grad_theta, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(layer.log_sigma2.grad, grad_s2 * sigma2, rtol=1e-3, atol=1e-4)


def test_moments_restored_in_another_layout_follow_their_weights(tmp_path):
    """A checkpoint written before convolutions trained channels-last (contiguous Adam
    moments) resumes into a channels-last model as the same Adam step."""
    torch.manual_seed(0)
    data = _fake_mnist()
    old = _run_model("none", data=data)
    old_opt = make_adam(old.parameters(), 1e-2)
    x, y = data.train_x, data.train_y

    def step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(old, old_opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda e: 1.0)
    saved = {
        "model": old.state_dict(),
        "optimizer": old_opt.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "shuffle": torch.Generator().get_state()},
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # as a checkpoint holds it: no tensor shared with old
    buffer.seek(0)
    state = torch.load(buffer)
    new = to_run_device(_run_model("none", data=data), CPU)
    new_opt = make_adam(new.parameters(), 1e-2)
    new_sched = torch.optim.lr_scheduler.LambdaLR(new_opt, lambda e: 1.0)
    restore_training_state(state, tmp_path, new, new_opt, new_sched, torch.Generator(), CPU)
    for p in new.parameters():
        for value in new_opt.state[p].values():
            if value.shape == p.shape:
                assert value.stride() == p.stride()
    step(old, old_opt)
    step(new, new_opt)
    for (name, a), b in zip(old.named_parameters(), new.parameters(), strict=True):
        # a tenth of the step lr: rounding moves Adam's step of a near-zero gradient a
        # little; moments paired with other weights move it by up to lr
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3, msg=name)


@pytest.mark.parametrize("method", ["pruning", "dns", "ssl", "sws"])
def test_epoch_schedules_prune_the_same_weights_channels_last(method):
    """The methods whose layers act at epoch ends (masks, group removal, quantization) and
    draw no noise end four steps-and-hooks with the same network in either layout."""
    from vbdropout.models import build_model
    from vbdropout.nn.base import attach_optimizer
    from vbdropout.train.runs import run_method

    data = _fake_mnist()
    config = resolve_config(TrainConfig(model="lenet5_caffe", method=method))
    outputs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        chosen = run_method(config, data)
        model = build_model("lenet5_caffe", chosen, input_shape=(1, 28, 28))
        if channels_last:
            model = to_run_device(model, CPU)
        optimizer = make_adam(model.parameters(), 1e-3)
        attach_optimizer(model, optimizer)
        for epoch in range(4):
            model.train()
            optimizer.zero_grad()
            loss = elbo_loss(model(data.train_x), data.train_y, model, 32, reduction="mean")
            loss.backward()
            optimizer.step()
            chosen.epoch_end(model, epoch, 4)
        with torch.no_grad():
            outputs.append(model.eval()(data.test_x))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
