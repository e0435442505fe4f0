"""The training step compiled (``vbd train --compile on``) vs eager, side by side.

1. **Single runs**: whole MNIST epochs (60,000 examples, batch 100, fused Adam, KL
   weight 1) of LeNet-300-100 and LeNet-5-Caffe with VBD, through
   :func:`vbdropout.train.loop.train_epoch` with the trainer's checks for the device
   (``checks="epoch"`` on a GPU) and its objective: :class:`BatchObjective` (eager) or
   :class:`CompiledObjective` (``torch.compile``; CUDA graphs on a GPU). The first
   epoch, which compiles, is reported apart; then the modes alternate.
2. **Replicas**: steps of K VBD replicas of LeNet-300-100 (:class:`ReplicaStack`, the
   step of ``vbd train --replicas K``; ``--replica-network``) eager vs compiled, read
   back once at the end as an epoch reads them; reported per step and as a 600-step
   epoch.

    python benchmarks/bench_compile.py --data-dir ../shared/datasets [--device cuda]
        [--repeats 3] [--replicas 4] [--replica-steps 100]

Writes ``compile-<device>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vbdropout import kernels
from vbdropout.data import load_dataset
from vbdropout.models import build_model
from vbdropout.train import TrainConfig, replica_configs, resolve_config
from vbdropout.train.compiled import CompiledObjective, CompiledStep, compile_mode
from vbdropout.train.loop import BatchObjective, checks_for, finite_checks, make_adam, train_epoch
from vbdropout.train.replicas import ReplicaStack
from vbdropout.train.runs import resolve_device, run_data, to_run_device
from vbdropout.train.trainer import restore_run

NETWORKS = ("lenet300_100", "lenet5_caffe")
MODES = ("eager", "compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_runs(network: str, device: torch.device, data, repeats: int) -> dict:
    """Seconds of the first epoch and of each later epoch, per mode."""
    x, y = data.train_x.to(device), data.train_y.to(device)
    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = to_run_device(build_model(network, "vbd"), device)
        optimizer = make_adam(model.parameters(), 1e-3)
        objective = (
            CompiledObjective(model, x.shape[0], device)
            if mode == "compiled"
            else BatchObjective(model, x.shape[0])
        )
        runs[mode] = model, optimizer, objective
    first: dict[str, float] = {}
    later: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats + 1):
        for mode, (model, optimizer, objective) in runs.items():
            start = time.perf_counter()
            train_epoch(
                model, optimizer, x, y, batch_size=100, kl_weight=1.0,
                generator=torch.Generator().manual_seed(repeat),
                checks=checks_for(device, optimizer), objective=objective,
            )  # fmt: skip
            _sync(device)
            seconds = time.perf_counter() - start
            if repeat:
                later[mode].append(seconds)
            else:
                first[mode] = seconds
    median = {mode: statistics.median(s) for mode, s in later.items()}
    return {
        "first_epoch_s": first,
        "epoch_s": later,
        "median_epoch_s": median,
        "compiled_speedup": median["eager"] / median["compiled"],
        "compiled_status": runs["compiled"][2].status,
    }


def replica_steps(
    network: str, device: torch.device, replicas: int, steps: int, repeats: int
) -> dict:
    """Seconds per step of ``replicas`` VBD replicas of ``network``, eager vs compiled."""
    stacks, inputs = {}, None
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            base = TrainConfig(
                model=network, method="vbd", out=f"{folder}/{mode}", device=device.type
            )
            configs = [resolve_config(c) for c in replica_configs(base, replicas)]
            data = run_data(configs[0])
            runs = []
            for config in configs:
                Path(config.out).mkdir(parents=True, exist_ok=True)
                runs.append(restore_run(config, device, Path(config.out), False, data))
                runs[-1].model.train()
            compiled = CompiledStep(
                ReplicaStack.batched_terms,
                lambda rows: rows[:, 0].sum(),
                device,
                compile_mode(device),
            )
            stacks[mode] = ReplicaStack(runs, 1e-3, compiled if mode == "compiled" else None)
            if inputs is None:
                n = replicas * 100
                x = runs[0].train_x[:n].reshape(replicas, 100, *runs[0].train_x.shape[1:])
                inputs = x, runs[0].train_y[:n].reshape(replicas, 100)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    first: dict[str, float] = {}
    for repeat in range(repeats + 1):
        for mode, stack in stacks.items():
            with finite_checks(stack.model, enabled=False):
                start = time.perf_counter()
                rows = [stack.step(*inputs, 1.0) for _ in range(1 if repeat == 0 else steps)]
                torch.stack(rows).tolist()  # the epoch's one read
                seconds = time.perf_counter() - start
            if repeat:
                times[mode].append(seconds / steps)
            else:
                first[mode] = seconds
    median = {mode: statistics.median(t) for mode, t in times.items()}
    return {
        "network": network,
        "replicas": replicas,
        "first_step_s": first,
        "step_s": times,
        "median_step_s": median,
        "epoch_600_steps_s": {mode: 600 * s for mode, s in median.items()},
        "compiled_speedup": median["eager"] / median["compiled"],
        "compiled_status": stacks["compiled"].compiled.status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--replicas", type=int, default=4, help="K of the replica steps")
    parser.add_argument("--replica-network", default="lenet300_100", choices=NETWORKS)
    parser.add_argument("--replica-steps", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset("mnist", args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"compile-{device.type}-partial.json"  # each measurement as it ends
    singles: dict = {}
    for network in args.networks:
        singles[network] = single_runs(network, device, data, args.repeats)
        partial.write_text(json.dumps({"single_runs": singles}, indent=2) + "\n")
    stack = replica_steps(
        args.replica_network, device, args.replicas, args.replica_steps, args.repeats
    )
    partial.unlink()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "machine": {
            "device": name,
            "cpu_kernels": kernels.status() if device.type == "cpu" else "unused",
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "single_runs": singles,
        "replicas": stack,
    }
    lines = [
        f"# Compiled vs eager training step ({name})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, VBD, batch 100, "
        f"median of {args.repeats} rounds after the first (which compiles), modes alternating.",
        "",
        "| network | eager s/epoch | compiled s/epoch | speedup | first epoch eager / "
        "compiled, s | step |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {r['median_epoch_s']['eager']:.3f} | {r['median_epoch_s']['compiled']:.3f}"
            f" | {r['compiled_speedup']:.2f}× | {r['first_epoch_s']['eager']:.1f} / "
            f"{r['first_epoch_s']['compiled']:.1f} | {r['compiled_status']} |"
            for n, r in singles.items()
        ),
        "",
        f"{stack['replicas']} replicas of {stack['network']} ({args.replica_steps} steps per "
        "round): "
        f"eager {1000 * stack['median_step_s']['eager']:.2f} ms/step "
        f"({stack['epoch_600_steps_s']['eager']:.2f} s per 600-step epoch), compiled "
        f"{1000 * stack['median_step_s']['compiled']:.2f} ms/step "
        f"({stack['epoch_600_steps_s']['compiled']:.2f} s), speedup "
        f"{stack['compiled_speedup']:.2f}× ({stack['compiled_status']}).",
    ]
    (out / f"compile-{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"compile-{device.type}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
