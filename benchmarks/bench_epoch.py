"""One full MNIST training epoch of LeNet-300-100: data handling share and VBD vs plain.

Times, in one process and interleaved: a training epoch (60,000 examples,
batch 100, Adam, KL weight 1) with plain layers and with VBD layers, the same
epoch's data handling alone (shuffling and batching the in-memory tensors),
and the per-epoch test evaluation and checkpoint write that ``vbd train`` adds.

    python benchmarks/bench_epoch.py --data-dir ../shared/datasets [--repeats 3]
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
from vbdropout.data import iterate_batches, load_dataset
from vbdropout.io import save_checkpoint
from vbdropout.models import build_model
from vbdropout.train.loop import evaluate, make_adam, train_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    data = load_dataset("mnist", args.data_dir)
    models = {}
    for method in ("none", "vbd"):
        torch.manual_seed(0)
        model = build_model("lenet300_100", method)
        models[method] = (model, make_adam(model.parameters(), 1e-3))
    generator = torch.Generator().manual_seed(0)
    samples: dict[str, list[float]] = {
        "none": [],
        "vbd": [],
        "data": [],
        "eval": [],
        "checkpoint": [],
    }
    for _ in range(args.repeats):
        for method, (model, optimizer) in models.items():
            stats = train_epoch(
                model,
                optimizer,
                data.train_x,
                data.train_y,
                batch_size=100,
                kl_weight=1.0,
                generator=generator,
            )
            samples[method].append(stats["seconds"])
        start = time.perf_counter()
        for xb, yb in iterate_batches(
            data.train_x, data.train_y, 100, shuffle=True, generator=generator
        ):
            xb.sum(), yb.sum()  # touch the batch as training does
        samples["data"].append(time.perf_counter() - start)
        model, optimizer = models["vbd"]
        start = time.perf_counter()
        evaluate(model, data.test_x, data.test_y)
        samples["eval"].append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            save_checkpoint(
                Path(tmp) / "checkpoint.pt",
                {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            )
            samples["checkpoint"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in samples.items()}
    per_epoch_run = med["vbd"] + med["eval"] + med["checkpoint"]
    result = {
        "machine": {
            "cpu_kernels": kernels.status(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "repeats": args.repeats,
        "seconds": med,
        "vbd_over_plain": med["vbd"] / med["none"],
        "data_share_of_vbd_epoch": med["data"] / med["vbd"],
        "table4_run_minutes_estimate": 200 * per_epoch_run / 60,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "epoch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
