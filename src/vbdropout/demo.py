"""The quickstart: VBD vs no dropout on scikit-learn's bundled 8×8 digits (no download).

A LeNet-300-100-shaped MLP (64-300-100-10) is trained twice with the same seed,
schedule and optimizer — once with VBD layers, once with plain ones — and the
test error, per-layer sparsity and compression ratio are compared.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .compress import compression_report
from .data import load_dataset
from .models import build_model
from .train.loop import evaluate, make_adam, train_epoch
from .train.progress import ProgressBar
from .train.schedules import kl_weight

__all__ = ["run_demo"]


def run_demo(
    epochs: int = 200, seed: int = 0, lr: float = 3e-3, batch_size: int = 100, progress: bool = True
) -> dict[str, Any]:
    """Train both networks and return the comparison (see the module docstring)."""
    torch.set_flush_denormal(True)  # as `vbd train` does (see train.trainer.train)
    data = load_dataset("digits")
    results: dict[str, Any] = {"dataset": "sklearn digits", "epochs": epochs, "seed": seed}
    warmup = (epochs // 10, epochs // 3)
    for method in ("vbd", "none"):
        torch.manual_seed(seed)
        model = build_model("lenet300_100", method, input_shape=data.input_shape)
        optimizer = make_adam(model.parameters(), lr)
        generator = torch.Generator().manual_seed(seed)
        bar = ProgressBar(epochs, f"{method:>4}", enabled=None if progress else False)
        start = time.perf_counter()
        for epoch in range(epochs):
            stats = train_epoch(
                model,
                optimizer,
                data.train_x,
                data.train_y,
                batch_size=batch_size,
                kl_weight=kl_weight(epoch, *warmup),
                generator=generator,
            )
            bar.update(epoch + 1, f"loss {stats['loss']:.3f} train err {stats['train_error']:.3f}")
        bar.close()
        test = evaluate(model, data.test_x, data.test_y)
        results[method] = {
            "test_error": test["error"],
            "test_nll": test["nll"],
            "seconds": time.perf_counter() - start,
            "report": compression_report(model),
        }
    vbd, base = results.pop("vbd"), results.pop("none")
    report = vbd.pop("report")
    base.pop("report")
    results.update(
        {
            "test_error": vbd["test_error"],
            "baseline_test_error": base["test_error"],
            "test_nll": vbd["test_nll"],
            "baseline_test_nll": base["test_nll"],
            "compression_ratio": report.to_dict()["compression_ratio"],
            "sparsity_per_layer": report.sparsity_per_layer(),
            "per_layer": report.to_dict()["layers"],
            "seconds": vbd["seconds"] + base["seconds"],
            "report": report,
        }
    )
    return results


def format_demo(results: dict[str, Any]) -> str:
    """Human-readable summary of :func:`run_demo`'s results."""
    return "\n".join(
        [
            f"VBD vs no dropout, LeNet-300-100-shaped MLP on {results['dataset']} "
            f"({results['epochs']} epochs, seed {results['seed']})",
            f"  test error  VBD {100 * results['test_error']:.2f}%   "
            f"no dropout {100 * results['baseline_test_error']:.2f}%",
            f"  compression |W|/|W≠0| = {results['compression_ratio']:.1f}  "
            f"(sparsity per layer {results['sparsity_per_layer']} %)",
            "",
            str(results["report"]),
        ]
    )
