"""Training-step time of our layers vs plain torch and peer Bayesian layers, side by side.

Measures forward + backward + Adam step of LeNet-300-100 and LeNet-5-Caffe at
batch 100 and 1000 for: plain torch layers, our VBD and sparse VD layers, and —
when installed (``pip install "vbdropout[bench]" && pip install --no-deps
bayesian-torch``; its declared torchvision dependency does not import beside
torch 2.13 and the layers measured here do not use it) — bayesian-torch
(reparameterization and flipout) and torchbnn. Variants are timed round-robin
in the same process so that every ratio compares numbers taken side by side.
Also measures how much the local reparameterization trick reduces gradient
variance compared with sampling one weight matrix per batch, and the peak memory
allocated by one training step of each variant (autograd profiler).

    python benchmarks/bench_train_step.py [--rounds 7] [--steps 20] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vbdropout import kernels, kl_divergence
from vbdropout.models import build_model
from vbdropout.train.loop import make_adam

N_TRAIN = 60_000
EAGER_VBD = "vbdropout vbd, eager"  # our VBD with the fused CPU kernels turned off


class PeerNet(nn.Module):
    """A sequential net of peer layers whose forwards may return (out, kl)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl = x.new_zeros(())
        for layer in self.layers:
            x = layer(x)
            if isinstance(x, tuple):
                x, layer_kl = x
                kl = kl + layer_kl
        return x, kl


def _peer_layers(model: str, linear: Callable, conv: Callable | None) -> list[nn.Module]:
    if model == "lenet300_100":
        dims = [784, 300, 100, 10]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(pairwise(dims)):
            layers.append(linear(a, b))
            if i < 2:
                layers.append(nn.ReLU())
        return layers
    return [
        conv(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), conv(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), linear(800, 500), nn.ReLU(), linear(500, 10),
    ]  # fmt: skip


def variants(model: str) -> dict[str, Callable[[], tuple[nn.Module, Callable]]]:
    """name -> factory returning (module, loss_fn(module, x, y))."""

    def ours(method: str) -> Callable[[], tuple[nn.Module, Callable]]:
        def make() -> tuple[nn.Module, Callable]:
            net = build_model(model, method)

            def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out = F.cross_entropy(m(x), y)
                return out + kl_divergence(m) / N_TRAIN if method != "none" else out

            return net, loss

        return make

    found = {
        "plain torch": ours("none"),
        "vbdropout vbd": ours("vbd"),
        EAGER_VBD: ours("vbd"),
        "vbdropout sparse_vd": ours("sparse_vd"),
    }

    def peer(linear: Callable, conv: Callable) -> Callable[[], tuple[nn.Module, Callable]]:
        def make() -> tuple[nn.Module, Callable]:
            net = PeerNet(_peer_layers(model, linear, conv))

            def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out, kl = m(x)
                return F.cross_entropy(out, y) + kl / N_TRAIN

            return net, loss

        return make

    try:
        import bayesian_torch.layers as bt

        found["bayesian-torch reparam"] = peer(
            bt.LinearReparameterization, bt.Conv2dReparameterization
        )
        found["bayesian-torch flipout"] = peer(bt.LinearFlipout, bt.Conv2dFlipout)
    except ImportError:
        pass
    try:
        import torchbnn as bnn

        class TorchbnnKL(nn.Module):
            def __init__(self, layers: list[nn.Module]) -> None:
                super().__init__()
                self.net = nn.Sequential(*layers)
                self.kl = bnn.BKLLoss(reduction="sum", last_layer_only=False)

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.net(x), self.kl(self.net)

        def tb_linear(a: int, b: int) -> nn.Module:
            return bnn.BayesLinear(prior_mu=0.0, prior_sigma=0.1, in_features=a, out_features=b)

        def tb_conv(a: int, b: int, k: int) -> nn.Module:
            return bnn.BayesConv2d(
                prior_mu=0.0, prior_sigma=0.1, in_channels=a, out_channels=b, kernel_size=k
            )

        def make_tb() -> tuple[nn.Module, Callable]:
            net = TorchbnnKL(_peer_layers(model, tb_linear, tb_conv))

            def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                out, kl = m(x)
                return F.cross_entropy(out, y) + kl / N_TRAIN

            return net, loss

        found["torchbnn"] = make_tb
    except ImportError:
        pass
    return found


def time_steps(
    model: str, batch: int, rounds: int, steps: int, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per training step of every variant, measured round-robin."""
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    built = {}
    for name, make in variants(model).items():
        if name == EAGER_VBD and device != "cpu":
            continue  # the fused kernels are CPU-only: on a GPU our VBD is the eager one
        net, loss = make()
        net = net.to(device).train()
        built[name] = (net, loss, make_adam(net.parameters(), 1e-3))

    def run(name: str, n: int) -> float:
        net, loss, opt = built[name]
        fused = kernels.set_enabled(name != EAGER_VBD)
        start = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss(net, x, y).backward()
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        kernels.set_enabled(fused)
        return elapsed / n

    for name in built:  # warm-up
        run(name, 3)
    samples: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name in built:
            samples[name].append(run(name, steps))
    return {name: statistics.median(v) for name, v in samples.items()}


def gradient_variance(batch: int = 100, repeats: int = 300) -> dict[str, dict[str, float]]:
    """Variance of the gradients over noise draws: LRT vs one weight sample per batch.

    The layer is LeNet-300-100's second (300 → 100, inputs are ReLU activations)
    with α = 0.5 on every weight; the rest of the network is held deterministic
    and the minibatch fixed, so only the layer's own noise varies. Reported for
    θ and for log σ² (the parameter that sets the dropout rate), each as the mean
    over weights of the per-weight variance.
    """
    torch.manual_seed(0)
    net = build_model("lenet300_100", "vbd").eval()
    layer = net[3]
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(0.5 * layer.weight**2 + 1e-8))
        h = net[:3](torch.rand(batch, 1, 28, 28))
    y = torch.randint(0, 10, (batch,))
    head = net[4:]

    def grads(sample_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        theta, log_sigma2 = [], []
        for _ in range(repeats):
            layer.weight.grad = layer.log_sigma2.grad = None
            if sample_weights:
                std = (0.5 * layer.log_sigma2).exp()
                w = layer.weight + std * torch.randn_like(layer.weight)
                pre = F.linear(h, w, layer.bias)
            else:
                pre = layer.train()(h)
            F.cross_entropy(head(pre), y).backward()
            theta.append(layer.weight.grad.flatten().clone())
            log_sigma2.append(layer.log_sigma2.grad.flatten().clone())
        return torch.stack(theta), torch.stack(log_sigma2)

    lrt, sampled = grads(False), grads(True)
    result = {}
    for i, name in enumerate(("theta", "log_sigma2")):
        v_lrt, v_sampled = lrt[i].var(0).mean().item(), sampled[i].var(0).mean().item()
        result[name] = {"lrt": v_lrt, "weight_sample": v_sampled, "ratio": v_sampled / v_lrt}
    return result


def peak_memory(model: str, batch: int, name: str) -> float:
    """Peak memory (MiB) that one training step allocates on top of the model and optimizer.

    Measured with the autograd profiler's allocation events (in time order,
    the running sum of allocations minus frees), after warm-up steps so that
    Adam's state already exists.
    """
    from torch.profiler import ProfilerActivity, profile

    net, loss = variants(model)[name]()
    opt = make_adam(net.parameters(), 1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(net, x, y).backward()
        opt.step()

    fused = kernels.set_enabled(name != EAGER_VBD)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    kernels.set_enabled(fused)
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    running = peak = 0
    for e in events:
        running += e.cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5_caffe"])
    parser.add_argument("--batches", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (on cuda, peak memory is not measured)"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    result = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_kernels": kernels.status() if args.device == "cpu" else "unused on cuda",
            "device": args.device
            if args.device == "cpu"
            else torch.cuda.get_device_name(torch.device(args.device)),
        },
        "steps": {},
        "memory_mib": {},
    }
    for model in args.models:
        for batch in args.batches:
            steps = max(2, args.steps * 100 // batch)
            times = time_steps(model, batch, args.rounds, steps, args.device)
            base = times["plain torch"]
            result["steps"][f"{model} b{batch}"] = {
                k: {"seconds": v, "ratio": v / base} for k, v in times.items()
            }
            print(
                f"{model} batch {batch}: "
                + ", ".join(f"{k} {v / base:.2f}×" for k, v in times.items()),
                flush=True,
            )
            if not args.no_memory and args.device == "cpu":
                result["memory_mib"][f"{model} b{batch}"] = {
                    k: peak_memory(model, batch, k) for k in times
                }
    result["gradient_variance"] = gradient_variance()
    for name, v in result["gradient_variance"].items():
        print(f"gradient variance of {name}, weight sampling / LRT: {v['ratio']:.2f}×")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| model, batch | variant | s/step | × plain | step peak MiB |",
        "|---|---|---|---|---|",
    ]
    for key, entry in result["steps"].items():
        for name, v in entry.items():
            mem = result["memory_mib"].get(key, {}).get(name)
            shown = "–" if mem is None else f"{mem:.0f}"
            lines.append(f"| {key} | {name} | {v['seconds']:.4f} | {v['ratio']:.2f} | {shown} |")
    (out / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
