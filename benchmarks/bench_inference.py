"""Inference speed of a trained run: dense vs masked vs shrunk vs sparse, side by side.

For every run directory given (e.g. a LeNet-300-100 VBD run and a LeNet-5
structured run), measures the latency at batch 1 and the throughput at batch 256
of

- dense: the same network with every weight kept (what compression saves from),
- masked: the trained model in evaluation mode (pruned weights multiplied by 0),
- shrunk: :func:`vbdropout.compress.shrink.shrink` (units physically removed),
- sparse: the CSR export run by :func:`vbdropout.compress.export.load_sparse`,

timed round-robin in one process; ratios are relative to dense.

    python benchmarks/bench_inference.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results]
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
from torch import nn

from vbdropout.compress.export import export_compressed, load_sparse
from vbdropout.compress.shrink import shrink
from vbdropout.nn.deterministic import to_deterministic
from vbdropout.train.runs import load_run


def unpruned(model: nn.Module) -> nn.Module:
    """The same architecture with nothing pruned (thresholds off)."""
    return to_deterministic(model, log_alpha_threshold=None, unit_threshold=None)


@torch.no_grad()
def timed(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - start) / repeats


def bench_run(run: str, rounds: int) -> dict[str, dict[str, float]]:
    trained = load_run(run)
    model, data, config = trained.model, trained.data, trained.config
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_compressed(model, tmp, data.input_shape, data.mean, data.std)
        sparse = load_sparse(Path(tmp) / "sparse.safetensors")
    variants = {
        "dense": unpruned(model),
        "masked": model,
        "shrunk": shrink(model),
        "sparse": sparse,
    }
    result = {}
    for batch, repeats in ((1, 200), (256, 20)):
        x = data.test_x[:batch]
        for m in variants.values():  # warm-up
            timed(m, x, 3)
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, m in variants.items():
                samples[name].append(timed(m, x, repeats))
        med = {k: statistics.median(v) for k, v in samples.items()}
        key = "latency_ms_batch1" if batch == 1 else "throughput_per_s_batch256"
        for name, seconds in med.items():
            value = 1000 * seconds if batch == 1 else batch / seconds
            speedup = med["dense"] / seconds
            result.setdefault(name, {})[key] = value
            result[name][f"speedup_batch{batch}"] = speedup
    return {"model": config.model, "method": config.method, "variants": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    results = {
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "runs": {run: bench_run(run, args.rounds) for run in args.runs},
    }
    lines = [
        "| run | variant | latency b1 (ms) | speedup b1 | throughput b256 (/s) | speedup b256 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"].values():
        for name, v in r["variants"].items():
            lines.append(
                f"| {r['model']}/{r['method']} | {name} | {v['latency_ms_batch1']:.3f} | "
                f"{v['speedup_batch1']:.2f}× | {v['throughput_per_s_batch256']:.0f} | "
                f"{v['speedup_batch256']:.2f}× |"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
