"""Convolutional training steps on a CPU: contiguous vs channels-last weights, side by side.

``vbd train`` puts a CPU run's convolution weights in channels-last order
(``vbdropout.train.runs.to_run_device``). This times one training step (forward, ELBO,
backward, fused Adam; batch 100) of LeNet-5-Caffe and Kingma et al.'s CIFAR net at scale
1 for several methods in both layouts, interleaved in one process, and reports the
median milliseconds per step and their ratio.

    python benchmarks/bench_layout.py [--threads 1] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vbdropout.losses import elbo_loss
from vbdropout.models import build_model
from vbdropout.train.loop import make_adam
from vbdropout.train.runs import to_run_device

CASES = {
    "lenet5_caffe": ((1, 28, 28), ("none", "vbd", "vbd_structured", "sbp")),
    "kingma_cifar": ((3, 32, 32), ("none", "vbd", "vd_b")),
}


def _stepper(model_name: str, method: str, input_shape, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(model_name, method, input_shape=input_shape)
    if channels_last:
        model = to_run_device(model, torch.device("cpu"))
    optimizer = make_adam(model.parameters(), 1e-3)
    x, y = torch.rand(100, *input_shape), torch.randint(0, 10, (100,))
    model.train()

    def step() -> None:
        loss = elbo_loss(model(x), y, model, dataset_size=60_000, reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _time(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    for model_name, (shape, methods) in CASES.items():
        for method in methods:
            steppers = {cl: _stepper(model_name, method, shape, cl) for cl in (False, True)}
            for step in steppers.values():
                step()  # warm-up: allocations, kernel selection
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for cl, step in steppers.items():
                    times[cl].append(_time(step, args.steps))
            contiguous, last = (statistics.median(times[cl]) for cl in (False, True))
            rows.append(
                {
                    "model": model_name,
                    "method": method,
                    "contiguous_ms": contiguous,
                    "channels_last_ms": last,
                    "speedup": contiguous / last,
                }
            )
            print(f"{model_name:13s} {method:15s} {contiguous:7.1f} ms {last:7.1f} ms "
                  f"{contiguous / last:5.2f}x", flush=True)  # fmt: skip
    machine = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layout.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [
        "# Convolutional training step: contiguous vs channels-last (CPU)",
        "",
        f"`python benchmarks/bench_layout.py --threads {args.threads} --steps {args.steps} "
        f"--repeats {args.repeats}`: batch 100, median of {args.repeats} × {args.steps} steps "
        f"each, interleaved; torch {torch.__version__}, "
        f"load average at the end {machine['load_average'][0]:.2f}.",
        "",
        "| network | method | contiguous ms/step | channels-last ms/step | speedup |",
        "|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['method']} | {r['contiguous_ms']:.1f} | "
            f"{r['channels_last_ms']:.1f} | {r['speedup']:.2f}× |"
            for r in rows
        ),
    ]
    (out / "layout.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
