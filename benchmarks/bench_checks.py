"""A training epoch with the divergence checks at every step vs once per epoch.

``train_epoch(checks="step")`` reads the loss and the NaN checks on the host at every
step; ``checks="epoch"`` keeps them on the device and reads them once per epoch (the
trainer's choice on a GPU, where each read stalls the device queue). Times whole
MNIST epochs (60,000 examples, batch 100, fused Adam, KL weight 1) of LeNet-300-100
and LeNet-5-Caffe with VBD, both modes interleaved in one process:

    python benchmarks/bench_checks.py --data-dir ../shared/datasets [--device cuda] [--repeats 3]

Writes ``checks-<device>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from vbdropout import kernels
from vbdropout.data import load_dataset
from vbdropout.models import build_model
from vbdropout.train.loop import make_adam, train_epoch
from vbdropout.train.runs import resolve_device, to_run_device

NETWORKS = ("lenet300_100", "lenet5_caffe")
MODES = ("step", "epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset("mnist", args.data_dir)
    x, y = data.train_x.to(device), data.train_y.to(device)
    seconds: dict[str, dict[str, list[float]]] = {}
    for network in args.networks:
        runs = {}
        for mode in MODES:
            torch.manual_seed(0)
            model = to_run_device(build_model(network, "vbd"), device)
            runs[mode] = model, make_adam(model.parameters(), 1e-3)
        seconds[network] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats + 1):  # the first round warms up, not timed
            for mode, (model, optimizer) in runs.items():
                stats = train_epoch(
                    model, optimizer, x, y, batch_size=100, kl_weight=1.0,
                    generator=torch.Generator().manual_seed(repeat), checks=mode,
                )  # fmt: skip
                if repeat:
                    seconds[network][mode].append(stats["seconds"])
    median = {
        n: {m: statistics.median(s) for m, s in modes.items()} for n, modes in seconds.items()
    }
    result = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_kernels": kernels.status() if device.type == "cpu" else "unused",
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "epoch_over_step_speedup": {n: m["step"] / m["epoch"] for n, m in median.items()},
    }
    lines = [
        f"# Divergence checks per step vs per epoch ({result['machine']['device']})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
        f"{args.repeats} epochs after one warm-up epoch, VBD, batch 100.",
        "",
        "| network | checks every step, s/epoch | checks once per epoch, s/epoch | speedup |",
        "|---|---|---|---|",
        *(
            f"| {n} | {m['step']:.2f} | {m['epoch']:.2f} | {m['step'] / m['epoch']:.2f}× |"
            for n, m in median.items()
        ),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"checks-{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"checks-{device.type}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
