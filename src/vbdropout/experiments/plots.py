"""Pictures of a reproduced table: learning curves, log α histograms, sparsity bars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .tables import Table

__all__ = ["plot_cells", "seed_groups"]


def _name(cell: dict[str, Any]) -> str:
    return f"{cell['label']} · {cell['column']}" if cell["column"] else cell["label"]


def seed_groups(cells: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The cells grouped by table cell (label, model, column), one entry per seed, in the
    order the cells come; each group is sorted by seed."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["label"], cell["model"], cell["column"]), []).append(cell)
    return [sorted(group, key=lambda c: c["seed"]) for group in groups.values()]


def _curve(cell: dict[str, Any]) -> np.ndarray | None:
    """Test error (%) per epoch of a cell's run, or None when its metrics are gone."""
    metrics = Path(cell["run_dir"]) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return np.array([100 * r["test_error"] for r in rows])


def _learning_curves(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    """One line per table cell: the mean over its seeds, with a band of ± one sd (n ≥ 2)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for group in seed_groups(cells):
        curves = [c for c in map(_curve, group) if c is not None]
        if not curves:
            continue
        length = min(len(c) for c in curves)  # the epochs every seed has reached
        stacked = np.stack([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean = stacked.mean(0)
        label = _name(group[0]) + (f" (n={len(curves)})" if len(curves) > 1 else "")
        (line,) = ax.plot(epochs, mean, label=label)
        if len(curves) > 1:
            sd = stacked.std(0, ddof=1)
            ax.fill_between(epochs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(title + " (mean ± sd over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_alpha_histograms(cell: dict[str, Any], path: Path, data_dir: str | None) -> bool:
    """Draw the log α of a cell's Gaussian layers into ``path``; False when there are none,
    or when the run's checkpoint is gone (cells kept without their runs, docs/results).

    ``data_dir``: where the run's data set is read (None: the folder its config saved).
    """
    from ..nn.gaussian import GaussianWeight
    from ..train.runs import load_run

    if not (Path(cell["run_dir"]) / "checkpoint.pt").is_file():
        return False
    model = load_run(cell["run_dir"], data_dir).model
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
    """Per table cell and layer: the mean sparsity over its seeds, an error bar of ± one sd
    and every seed as a point (n ≥ 2)."""
    groups = seed_groups(cells)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(groups))
    for i, group in enumerate(groups):
        per_seed = np.array(
            [[layer["sparsity"] for layer in c["compression"]["layers"]] for c in group]
        )
        xs = np.arange(per_seed.shape[1]) + i * width
        label = _name(group[0]) + (f" (n={len(group)})" if len(group) > 1 else "")
        sd = per_seed.std(0, ddof=1) if len(group) > 1 else None
        ax.bar(xs, per_seed.mean(0), width=width, yerr=sd, capsize=2, label=label)
        if len(group) > 1:
            for row in per_seed:
                ax.plot(xs, row, "o", color="black", markersize=2, alpha=0.6)
    layers = len(groups[0][0]["compression"]["layers"]) if groups else 0
    ax.set_xticks(np.arange(layers) + width * (len(groups) - 1) / 2, range(1, layers + 1))
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title + " (mean ± sd over seeds, points: seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cells(
    spec: Table, cells: list[dict[str, Any]], base: Path, data_dir: str | None = None
) -> list[str]:
    """Write the plots of ``cells`` into ``base``; returns their paths.

    ``data_dir``: the data folder of the runs whose log α histograms are drawn (None: each
    run's own).
    """
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
        if _log_alpha_histograms(cell, path, data_dir):
            written.append(str(path))
    return written
