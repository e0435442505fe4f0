"""The fused CPU kernels against their eager PyTorch versions, op by op, side by side.

At LeNet-300-100's sizes: the KL sum of a 300×784 layer (forward + backward) for
VBD's and sparse VD's priors, the LRT sample of 100×300 and 1000×300
pre-activations (forward + backward, its noise included), and one layer's whole
training forward + backward at batch 100 and 1000 (gradients set to None before
each call, as an optimizer loop does). Each pair is timed
round-robin in the same process (median of the rounds), and the ratio
eager / fused printed and saved.

    python benchmarks/bench_kernels.py [--rounds 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vbdropout import kernels
from vbdropout.nn import LinearVBD
from vbdropout.priors import HierarchicalPrior, LogUniformPrior


def _median_seconds(fns: dict[str, Callable[[], None]], rounds: int, calls: int) -> dict:
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(v) for name, v in samples.items()}


def _kl_pair(prior) -> dict[str, Callable[[], None]]:
    theta = (torch.randn(300, 784) * 0.05).requires_grad_()
    log_sigma2 = (torch.rand(300, 784) * 8 - 10).requires_grad_()

    def eager() -> None:
        theta.grad = log_sigma2.grad = None
        prior._kl_sum_additive_eager(theta, log_sigma2).backward()

    def fused() -> None:
        theta.grad = log_sigma2.grad = None
        kernels.kl_sum(theta, log_sigma2, prior.kernel_spec()).backward()

    return {"eager": eager, "fused": fused}


def _lrt_pair(batch: int) -> dict[str, Callable[[], None]]:
    mean = torch.randn(batch, 300, requires_grad=True)
    var = torch.rand(batch, 300, requires_grad=True)
    grad = torch.randn(batch, 300)

    def eager() -> None:
        mean.grad = var.grad = None
        (mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)).backward(grad)

    def fused() -> None:
        mean.grad = var.grad = None
        kernels.lrt_sample(mean, var, 1e-8).backward(grad)

    return {"eager": eager, "fused": fused}


def _layer_pair(batch: int) -> dict[str, Callable[[], None]]:
    layer = LinearVBD(784, 300).train()
    x = torch.rand(batch, 784)

    def step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            previous = kernels.set_enabled(fused)
            layer.zero_grad(set_to_none=True)
            (layer(x).sum() + layer.kl()).backward()
            kernels.set_enabled(previous)

        return run

    return {"eager": step(False), "fused": step(True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"fused kernels not available: {kernels.status()}")
    torch.manual_seed(0)
    cases = {
        "VBD KL sum, 300x784, fwd+bwd": _kl_pair(HierarchicalPrior()),
        "sparse VD KL sum, 300x784, fwd+bwd": _kl_pair(LogUniformPrior()),
        "LRT sample, 100x300, fwd+bwd": _lrt_pair(100),
        "LRT sample, 1000x300, fwd+bwd": _lrt_pair(1000),
        "LinearVBD 784->300 + KL, batch 100, fwd+bwd": _layer_pair(100),
        "LinearVBD 784->300 + KL, batch 1000, fwd+bwd": _layer_pair(1000),
    }
    result = {
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_kernels": kernels.status(),
        },
        "seconds": {},
    }
    lines = ["| operation | eager ms | fused ms | eager / fused |", "|---|---|---|---|"]
    for name, fns in cases.items():
        times = _median_seconds(fns, args.rounds, args.calls)
        result["seconds"][name] = times
        ratio = times["eager"] / times["fused"]
        lines.append(
            f"| {name} | {times['eager'] * 1e3:.3f} | {times['fused'] * 1e3:.3f} | {ratio:.2f}× |"
        )
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
