"""Many seeds at once: ``vbd train --replicas`` (one batched model) vs one run per seed.

Two measurements, side by side in one process:

1. **One training step of K replicas** (batch 100 each) of LeNet-300-100 and LeNet-5 VBD:
   "replicas": :class:`vbdropout.train.replicas.ReplicaStack` (the step ``vbd train
   --replicas K`` runs: ``vmap`` over stacked parameters, one fused Adam, the per-step
   checks); "K single": K single runs' steps one after another (fused CPU kernels,
   the per-step checks of ``train_epoch``). Also the fit t(batch) = per-weight cost +
   per-example cost · batch of one model's step at batch 100 and 1000 (LeNet-300-100):
   the per-weight part (σ² = exp(log σ²), the KL, Adam over every weight, whatever the
   batch) is what K replicas cannot share. ``--device cuda`` times the same on a GPU
   (there ``--replicas 1 16`` gives the issue's K = 16 vs one replica).
2. **K seeds of one cell through ``vbd reproduce``** (CPU): the local executor one cell
   after another (``--replicas off``), as replicas (``--replicas on``), ``--executor
   processes`` (one worker process per core, the cores shared out) and ``--executor
   ray`` on a local Ray instance; wall time of the whole call. Ray is left out without
   ray.

Both need MNIST (``$VBD_DATA_DIR``).

    python benchmarks/bench_replicas.py [--rounds 7] [--steps 20] [--seeds 4] [--epochs 2]
        [--device cpu|cuda] [--replicas 4 8] [--skip-seeds]
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
from pathlib import Path

import torch

from vbdropout.losses import elbo_terms
from vbdropout.train import TrainConfig, replica_configs, resolve_config
from vbdropout.train.loop import _checked_step
from vbdropout.train.replicas import ReplicaStack
from vbdropout.train.runs import resolve_device, run_data
from vbdropout.train.trainer import restore_run

MODELS = ("lenet300_100", "lenet5_caffe")


def _runs(model: str, replicas: int, device: str, folder: str) -> list:
    """``replicas`` fresh VBD runs of ``model`` (seeds 0..K−1, run directories in ``folder``)
    on ``device``."""
    base = TrainConfig(model=model, method="vbd", dataset="mnist", out=folder, device=device)
    configs = [resolve_config(c) for c in replica_configs(base, replicas)]
    data = run_data(configs[0])
    runs = []
    for config in configs:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        runs.append(restore_run(config, resolve_device(device), Path(config.out), False, data))
    for run in runs:
        run.model.train()
    return runs


def replicas_step(runs: list, batch: int) -> Callable[[], None]:
    """One step of the runs as replicas (:class:`ReplicaStack`), read back as a run reads it."""
    stack = ReplicaStack(runs, 1e-3)
    k = len(runs)
    x = runs[0].train_x[: k * batch].reshape(k, batch, *runs[0].train_x.shape[1:])
    y = runs[0].train_y[: k * batch].reshape(k, batch)
    return lambda: stack.step(x, y, 1.0).tolist()


def single_steps(runs: list, batch: int) -> Callable[[], None]:
    """One step of each run in turn, as ``train_epoch(checks="step")`` takes it."""
    x, y = runs[0].train_x[:batch], runs[0].train_y[:batch]
    n = runs[0].train_x.shape[0]

    def step() -> None:
        for run in runs:
            terms = elbo_terms(run.model(x), y, run.model, n, 1.0, reduction="mean")
            _checked_step(run.model, run.optimizer, terms, "bench")

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


def step_results(rounds: int, n: int, device: str, counts: list[int]) -> dict:
    out: dict = {}
    for model in MODELS:
        for k in counts:
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                t = time_round_robin(
                    {
                        "replicas": replicas_step(_runs(model, k, device, a), 100),
                        "single": single_steps(_runs(model, k, device, b), 100),
                    },
                    rounds,
                    n,
                )
            out[f"{model} K={k}"] = {
                "replicas_s": t["replicas"],
                "single_s": t["single"],
                "replicas_speedup": t["single"] / t["replicas"],
                "examples_per_s": 100 * k / t["replicas"],
            }
    with tempfile.TemporaryDirectory() as folder:
        runs = _runs("lenet300_100", 1, device, folder)
        t = time_round_robin(
            {"b100": single_steps(runs, 100), "b1000": single_steps(runs, 1000)}, rounds, n
        )
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
    ways = {"local": {}, "replicas": {"replicas": "on"}, "processes": {"executor": "processes"}}
    try:
        import ray  # noqa: F401

        ways["ray"] = {"executor": "ray"}
    except ImportError:
        pass
    walls = {}
    for name, options in ways.items():
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            reproduce(
                "table4", only="^Ours \\(low.*lenet300_100", seeds=seeds, epochs=epochs,
                out=out, data_dir=data, progress=False, device="cpu",
                **{"replicas": "off", **options},
            )  # fmt: skip
            walls[name] = time.perf_counter() - start
    return {
        "cell": f"table4 Ours (low test error) lenet300_100, {epochs} epochs, all 60k examples",
        "seeds": seeds,
        "wall_s": walls,
        "speedup_vs_local": {k: walls["local"] / v for k, v in walls.items() if k != "local"},
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['platform']}, {m['threads']} threads, torch {m['torch']}, "
        f"device {m['device']}.",
        "",
        "| VBD, batch 100 each | K single runs s/step | K replicas s/step | replicas speedup "
        "| replicas examples/s |",
        "|---|---|---|---|---|",
    ]
    for key, row in result["step"].items():
        if "K=" in key:
            lines.append(
                f"| {key} | {row['single_s']:.4f} | {row['replicas_s']:.4f} | "
                f"{row['replicas_speedup']:.2f}× | {row['examples_per_s']:.0f} |"
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
            f"{'--replicas on' if k == 'replicas' else '--executor ' + k} {s['wall_s'][k]:.1f} s "
            f"({x:.2f}×)"
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--skip-seeds", action="store_true", help="only the step timings")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    result = {
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        },
        "step": step_results(args.rounds, args.steps, args.device, args.replicas),
        "seeds": "skipped (--skip-seeds)"
        if args.skip_seeds
        else seeds_results(args.seeds, args.epochs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "replicas" if args.device == "cpu" else f"replicas-{args.device}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
