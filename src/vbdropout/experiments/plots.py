"""Pictures of a reproduced table: learning curves, log α histograms, sparsity bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .tables import Table

__all__ = ["plot_cells"]


def _name(cell: dict[str, Any]) -> str:
    return f"{cell['label']} · {cell['column']}" if cell["column"] else cell["label"]


def _learning_curves(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for cell in cells:
        metrics = Path(cell["run_dir"]) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        ax.plot(
            [r["epoch"] for r in rows], [100 * r["test_error"] for r in rows], label=_name(cell)
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_alpha_histograms(cell: dict[str, Any], path: Path) -> bool:
    from ..nn.gaussian import GaussianWeight
    from ..train.runs import load_run

    model, _, _ = load_run(cell["run_dir"])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GaussianWeight)]
    if not layers:
        return False
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for ax, (name, layer) in zip(axes[0], layers, strict=True):
        values = layer.log_alpha.detach().expand_as(layer.weight).flatten().numpy()
        ax.hist(values, bins=60, color="tab:blue")
        if layer.threshold is not None:
            ax.axvline(layer.threshold, color="tab:red", linestyle="--", label="threshold")
        ax.set_title(f"layer {name}", fontsize=9)
        ax.set_xlabel("log α")
    axes[0][0].set_ylabel("weights")
    fig.suptitle(_name(cell), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _sparsity_bars(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        layers = cell["compression"]["layers"]
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(xs, [layer["sparsity"] for layer in layers], width=width, label=_name(cell))
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells(spec: Table, cells: list[dict[str, Any]], base: Path) -> list[str]:
    """Write the plots of ``cells`` into ``base``; returns their paths."""
    if not cells:
        return []
    base.mkdir(parents=True, exist_ok=True)
    written = []
    curves = base / "learning_curves.png"
    _learning_curves(cells, curves, f"Table {spec.number}: test error per epoch")
    written.append(str(curves))
    bars = base / "sparsity_per_layer.png"
    _sparsity_bars(cells, bars, f"Table {spec.number}: sparsity per layer")
    written.append(str(bars))
    for cell in cells:
        path = base / f"log_alpha_{Path(cell['run_dir']).name}.png"
        if cell["seed"] != 0 or str(path) in written:  # rows may share a run
            continue
        if _log_alpha_histograms(cell, path):
            written.append(str(path))
    return written
