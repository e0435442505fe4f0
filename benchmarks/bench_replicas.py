"""Many seeds at once on CPU: replicas stacked into one batched model vs one run per seed.

Two measurements, side by side in one process:

1. **One training step of K LeNet-300-100 VBD replicas** (batch 100 each). "stacked":
   the K replicas' parameters stacked on a leading dimension, one ``bmm`` per layer for
   the LRT mean and variance, the KL of Eq. 18 and one fused Adam over the stacked
   tensors (what a replica-batched model would run, in plain PyTorch); "K single": K
   vbdropout models stepped one after another (fused CPU kernels). Also the fit
   t(batch) = per-weight cost + per-example cost · batch of one model's step at batch 100
   and 1000: the per-weight part (σ² = exp(log σ²), the KL, Adam — over every weight,
   whatever the batch) is what K replicas cannot share, so batching them saves only
   the dispatch overhead.
2. **K seeds of one cell through ``vbd reproduce``**: the local executor (one cell after
   another, all threads each) vs ``--executor processes`` (one worker process per core,
   the cores shared out) and ``--executor ray`` on a local Ray instance (one cell per
   core, one thread each), wall time of the whole call. Needs MNIST (``$VBD_DATA_DIR``);
   Ray is left out without ray.

    python benchmarks/bench_replicas.py [--rounds 7] [--steps 20] [--seeds 4] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

from vbdropout import kl_divergence
from vbdropout.models import build_model
from vbdropout.train.loop import make_adam

N_TRAIN = 60_000
DIMS = (784, 300, 100, 10)
LOG_ALPHA_CLIP = 10.0  # the layer's clamp of log α in the KL


def stacked_step(replicas: int, batch: int) -> Callable[[], None]:
    """One step of ``replicas`` stacked LeNet-300-100 VBD replicas (plain PyTorch)."""
    params: list[torch.Tensor] = []
    for fan_in, fan_out in pairwise(DIMS):
        theta = torch.randn(replicas, fan_in, fan_out) / fan_in**0.5
        log_sigma2 = torch.full((replicas, fan_in, fan_out), -10.0)
        bias = torch.zeros(replicas, 1, fan_out)
        params += [p.requires_grad_() for p in (theta, log_sigma2, bias)]
    optimizer = make_adam(params, lr=1e-3)
    x = torch.rand(replicas, batch, DIMS[0])
    y = torch.randint(0, DIMS[-1], (replicas, batch))

    def step() -> None:
        h, kl = x, x.new_zeros(())
        for i in range(len(DIMS) - 1):
            theta, log_sigma2, bias = params[3 * i : 3 * i + 3]
            mean = torch.baddbmm(bias, h, theta)
            var = torch.bmm(h * h, log_sigma2.exp())
            h = mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)
            if i < len(DIMS) - 2:
                h = F.relu(h)
            log_alpha = (log_sigma2 - torch.log(theta * theta + 1e-8)).clamp(
                -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP
            )
            kl = kl + 0.5 * F.softplus(-log_alpha).sum()  # ½·log(1 + 1/α), Eq. 18
        nll = F.cross_entropy(h.reshape(-1, DIMS[-1]), y.reshape(-1), reduction="sum")
        loss = nll * (N_TRAIN / batch) + kl  # each replica's N·mean CE + KL, summed
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def single_steps(replicas: int, batch: int) -> Callable[[], None]:
    """One step of each of ``replicas`` vbdropout LeNet-300-100 VBD models, in turn."""
    models = [build_model("lenet300_100", "vbd") for _ in range(replicas)]
    optimizers = [make_adam(m.parameters(), lr=1e-3) for m in models]
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, DIMS[-1], (batch,))

    def step() -> None:
        for model, optimizer in zip(models, optimizers, strict=True):
            loss = N_TRAIN * F.cross_entropy(model(x), y) + kl_divergence(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], rounds: int, n: int) -> dict:
    """Median seconds per call of each step, timed in turns so that ratios are side by side."""
    for step in steps.values():  # warm-up (kernel build, allocator)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n):
                step()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def step_results(rounds: int, n: int) -> dict:
    out: dict = {}
    for k in (4, 8):
        t = time_round_robin(
            {"stacked": stacked_step(k, 100), "single": single_steps(k, 100)}, rounds, n
        )
        out[f"K={k}"] = {
            "stacked_s": t["stacked"],
            "single_s": t["single"],
            "stacked_speedup": t["single"] / t["stacked"],
        }
    t = time_round_robin({"b100": single_steps(1, 100), "b1000": single_steps(1, 1000)}, rounds, n)
    per_example = (t["b1000"] - t["b100"]) / 900
    per_weight = t["b100"] - 100 * per_example
    out["cost_model"] = {
        "step_b100_s": t["b100"],
        "step_b1000_s": t["b1000"],
        "per_weight_s": per_weight,
        "per_example_s": per_example,
        "per_weight_share_b100": per_weight / t["b100"],
    }
    return out


def seeds_results(seeds: int, epochs: int) -> dict | str:
    """Wall time of ``seeds`` seeds of one Table-4 cell per executor (Ray if installed)."""
    from vbdropout.experiments import reproduce

    data = os.environ.get("VBD_DATA_DIR")
    if not data or not Path(data, "mnist", "train-images-idx3-ubyte.gz").is_file():
        return "skipped: MNIST not found under $VBD_DATA_DIR"
    executors = ["local", "processes"]
    try:
        import ray  # noqa: F401

        executors.append("ray")
    except ImportError:
        pass
    walls = {}
    for executor in executors:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            reproduce(
                "table4", only="^Ours \\(low.*lenet300_100", seeds=seeds, epochs=epochs,
                out=out, data_dir=data, progress=False, device="cpu", executor=executor,
            )  # fmt: skip
            walls[executor] = time.perf_counter() - start
    return {
        "cell": f"table4 Ours (low test error) lenet300_100, {epochs} epochs, all 60k examples",
        "seeds": seeds,
        "wall_s": walls,
        "speedup_vs_local": {k: walls["local"] / v for k, v in walls.items() if k != "local"},
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['threads']} threads, torch {m['torch']}.",
        "",
        "| LeNet-300-100 VBD, batch 100 each | K single (fused) s/step | stacked s/step | "
        "stacked speedup |",
        "|---|---|---|---|",
    ]
    for key, row in result["step"].items():
        if key.startswith("K="):
            lines.append(
                f"| {key} | {row['single_s']:.4f} | {row['stacked_s']:.4f} | "
                f"{row['stacked_speedup']:.2f}× |"
            )
    c = result["step"]["cost_model"]
    lines += [
        "",
        f"One model's step: {c['step_b100_s'] * 1e3:.2f} ms at batch 100, "
        f"{c['step_b1000_s'] * 1e3:.2f} ms at batch 1000: {c['per_weight_s'] * 1e3:.2f} ms "
        f"per step whatever the batch (per-weight work) + {c['per_example_s'] * 1e6:.1f} µs "
        f"per example; the per-weight part is {c['per_weight_share_b100']:.0%} of a "
        "batch-100 step.",
        "",
    ]
    s = result["seeds"]
    if isinstance(s, str):
        lines.append(f"Seeds through vbd reproduce: {s}")
    else:
        others = ", ".join(
            f"--executor {k} {s['wall_s'][k]:.1f} s ({x:.2f}×)"
            for k, x in s["speedup_vs_local"].items()
        )
        lines.append(
            f"{s['seeds']} seeds of {s['cell']}: local executor {s['wall_s']['local']:.1f} s, "
            f"{others} (Ray: a local instance)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    result = {
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "step": step_results(args.rounds, args.steps),
        "seeds": seeds_results(args.seeds, args.epochs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "replicas.md").write_text(markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
