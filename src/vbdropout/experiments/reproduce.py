"""``vbd reproduce``: rerun a table of the paper, cell by cell, resumably.

Layout under ``out`` (default ``results/``)::

    results/tableN.md                       (tableN-quick.md for the quick budget)
    results/tableN[-quick]/cells/KEY/seedS.json   one finished cell
    results/tableN[-quick]/runs/KEY-seedS/        its training run (checkpoints, metrics)
    results/tableN[-quick]/*.png                  plots

A finished cell is never recomputed; an interrupted one resumes from its
run's last checkpoint. Each cell records its command, seed, versions, wall
time and device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes, atomic_write_json
from ..models import METHODS
from ..models.methods import method_class
from ..train.config import TrainConfig
from ..train.loop import DivergenceError
from .executors import CellJob, check_executor, run_jobs
from .stats import prediction_interval, welch_interval
from .tables import TABLES, Budget, Row, Table

__all__ = ["PLOTS_NEED_MATPLOTLIB", "cell_config", "reproduce", "table_markdown"]

PLOTS_NEED_MATPLOTLIB = (
    'vbd reproduce: no plots written: matplotlib is missing (pip install "vbdropout[plots]")'
)


def _cell_dir(out: Path, table: str, budget: str) -> Path:
    return out / (table if budget == "paper" else f"{table}-{budget}")


def cell_config(
    row: Row,
    table: Table,
    budget: str,
    seed: int,
    base: Path,
    device: str = "auto",
    data_dir: str | None = None,
    compile: str = "auto",
) -> TrainConfig:
    """The training config of one cell under ``budget`` (its run directory under ``base``).

    The budget sets the epochs and the training size (and, through ``per_method``,
    the epochs or lr of one method's rows); the protocol's lr-decay start and KL
    warm-up scale with the epochs when the config is resolved.
    """
    b = table.budgets[budget]
    options = {"epochs": b.epochs, **row.method_options, **b.per_method.get(row.method, {})}
    init = None
    if row.init_from is not None:
        parent = next(r for r in table.rows if r.label == row.init_from and r.model == row.model)
        init = str(base / "runs" / f"{parent.key}-seed{seed}")
    return TrainConfig(
        model=row.model,
        method=row.method,
        dataset=table.dataset,
        out=str(base / "runs" / f"{row.key}-seed{seed}"),
        train_subset=b.train_subset,
        seed=seed,
        device=device,
        compile=compile,
        data_dir=data_dir,
        network=dict(row.network),
        init=init,
        **options,
    )


@dataclass(frozen=True)
class _CellRunner:
    """Computes and writes one cell of ``table`` (picklable, so that a Ray task can run it)."""

    table: Table
    budget: str
    base: Path
    device: str
    data_dir: str | None
    progress: bool
    command: str  # the command that asked for the cell, recorded in it
    replica_seeds: tuple[int, ...] = ()  # trained together where the method can (--replicas)
    compile: str = "auto"  # the training step compiled (TrainConfig.compile)

    def _config(self, row: Row, seed: int) -> TrainConfig:
        return cell_config(
            row, self.table, self.budget, seed, self.base, self.device, self.data_dir, self.compile
        )

    def __call__(self, job: CellJob) -> dict[str, Any]:
        cell = self._compute(job.row, job.seed)
        atomic_write_json(job.path, cell)
        return cell

    def _compute(self, row: Row, seed: int) -> dict[str, Any]:
        """Train the cell's run (resuming it) or re-evaluate its parent's; its record."""
        from ..compress.shrink import neurons_per_layer, shrink
        from ..train.runs import load_run
        from ..train.trainer import train

        b = self.table.budgets[self.budget]
        config = self._config(row, seed)
        run_dir = Path(config.out)
        start = time.perf_counter()
        if row.evaluate_run_of is None:
            self._train_replicas(row)
            summary = _summary_of_finished(run_dir)  # trained as a replica, or before
            if summary is None:
                summary = train(
                    config, resume=(run_dir / "checkpoint.pt").exists(), progress=self.progress
                )
            model = load_run(run_dir, self.data_dir).model
        else:
            parent = next(
                r
                for r in self.table.rows
                if r.label == row.evaluate_run_of and r.model == row.model
            )
            run_dir = self.base / "runs" / f"{parent.key}-seed{seed}"
            threshold = row.method_options.get(
                "log_alpha_threshold", TrainConfig.log_alpha_threshold
            )
            summary, model = _reevaluate(run_dir, self.data_dir, threshold)
        neurons = neurons_per_layer(shrink(model))
        return {
            "table": self.table.number,
            "label": row.label,
            "model": row.model,
            "method": row.method,
            "column": row.column,
            "budget": self.budget,
            "seed": seed,
            "epochs": summary["epochs"],
            "train_subset": b.train_subset,
            "test_error": summary["test_error"],
            "compression": summary["compression"],
            "neurons_per_layer": neurons,
            "device": summary["device"],
            # compiled or eager (TrainConfig.compile); runs older than --compile: eager
            "step": summary.get("step", "eager"),
            "wall_seconds": time.perf_counter() - start,
            "train_seconds": summary["train_seconds"],
            "replicas": summary.get("replicas", 1),  # trained as one of this many
            "versions": summary["versions"],
            "command": self.command,
            "run_dir": str(run_dir),
        }

    def _train_replicas(self, row: Row) -> None:
        """Train the unfinished runs of ``row``'s :attr:`replica_seeds` as replicas of one
        batched model (:func:`~vbdropout.train.train_replicas`), when two or more are
        left and the method can; each cell then finds its run finished. Replicas that
        diverged are tried again by the next cell of the row: together while two or more
        are left, else alone by their own cell."""
        from ..train import train_replicas

        if method_class(row.method).no_replicas_reason is not None:
            return
        configs = [self._config(row, s) for s in self.replica_seeds]
        left = [c for c in configs if not _finished(Path(c.out))]
        if len(left) < 2:
            return
        with contextlib.suppress(DivergenceError):  # its summary says so; its cell's own
            train_replicas(left, resume=True, progress=self.progress)  # train() continues it


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that trained to its end (a summary, not a divergence)."""
    path = run_dir / "summary.json"
    return path.is_file() and "diverged" not in json.loads(path.read_text())


def _summary_of_finished(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, as its training wrote it (how its steps ran
    included); ``None`` for an unfinished run, or a summary of an older version that lacks
    an entry a cell records (``train`` then rewrites it)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())  # one read for both checks (was two)
    needed = ("epochs", "test_error", "compression", "device", "train_seconds", "versions")
    finished = "diverged" not in summary and all(key in summary for key in needed)
    return summary if finished else None


def _reevaluate(
    run_dir: Path, data_dir: str | None, threshold: float
) -> tuple[dict[str, Any], Any]:
    """Test error and compression of a finished run pruned at another log α threshold."""
    from ..compress import compression_report
    from ..nn.deterministic import to_deterministic
    from ..train.loop import evaluate
    from ..train.runs import load_run

    summary = json.loads((run_dir / "summary.json").read_text())
    run = load_run(run_dir, data_dir)
    model, data = run.model, run.data
    pruned = to_deterministic(model, log_alpha_threshold=threshold)
    test = evaluate(pruned, data.test_x, data.test_y)
    report = compression_report(model, log_alpha_threshold=threshold)
    summary.update(test_error=test["error"], compression=report.to_dict())
    return summary, pruned


def reproduce(
    table: str,
    budget: str = "quick",
    only: str | None = None,
    seeds: int | range = 1,
    device: str = "auto",
    out: str | Path = "results",
    data_dir: str | None = None,
    progress: bool = True,
    epochs: int | None = None,
    train_subset: int | None = None,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    replicas: str = "auto",
    compile: str = "auto",
) -> dict[str, Any]:
    """Run every (matching) cell of ``table`` and write its markdown and plots.

    The markdown and plots show every finished cell of the table and budget under
    ``out``, also those that earlier calls with another ``only`` ran; the returned
    ``cells`` are the matching ones.

    ``seeds``: how many seeds (0 .. seeds − 1), or a ``range`` of them (e.g. ``range(1, 3)``
    to run seeds 1 and 2 in another process beside one running seed 0).
    ``epochs``/``train_subset`` override the budget's (a custom, labelled budget).
    ``executor``: ``"local"`` (here, one cell after another), ``"processes"`` (cells in
    ``workers`` processes on this machine at once, default one per core) or ``"ray"``
    (cells as tasks on the Ray cluster at ``address``, default a local instance or
    ``$RAY_ADDRESS``; ``out`` must then be on storage the workers share); see
    :mod:`.executors`.
    ``replicas``: ``"on"`` trains the seeds of a row together as replicas of one batched
    model where the method can (:func:`~vbdropout.train.train_replicas`; the local
    executor only), ``"off"`` one run after another, ``"auto"`` (default) on where the
    cells train on a GPU: on a CPU replicas are slower than single runs with the fused
    kernels (docs/PERFORMANCE.md).
    ``compile``: the cells' :attr:`~vbdropout.train.TrainConfig.compile` (``"auto"``: their
    training steps compiled on a GPU, and for replicas).
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    spec = TABLES[table]
    if budget not in spec.budgets:
        raise ValueError(f"unknown budget {budget!r}; known: {', '.join(spec.budgets)}")
    if epochs is not None or train_subset is not None:
        base_budget = spec.budgets[budget]
        per_method = base_budget.per_method
        if epochs is not None:  # the user's epochs for every row
            per_method = {
                m: {k: v for k, v in o.items() if k != "epochs"} for m, o in per_method.items()
            }
        custom = Budget(
            epochs or base_budget.epochs,
            train_subset or base_budget.train_subset,
            base_budget.columns,
            per_method,
        )
        budget = f"custom-e{custom.epochs}-n{custom.train_subset}"
        spec = dataclasses.replace(spec, budgets={**spec.budgets, budget: custom})
    seed_list = seeds if isinstance(seeds, range) else range(seeds)
    if len(seed_list) < 1 or seed_list.start < 0:
        raise ValueError(f"seeds must name at least one seed >= 0, got {seeds}")
    check_executor(executor, address, workers)
    together = _use_replicas(replicas, executor, device)
    try:
        pattern = re.compile(only, re.IGNORECASE) if only else None
    except re.error as err:
        raise ValueError(f"only: {only!r} is not a regular expression ({err})") from None
    out = Path(out)
    base = _cell_dir(out, table, budget).resolve()  # absolute: also a Ray worker's path
    slots: list[dict[str, Any] | None] = []  # a finished cell, or None: computed by a job
    jobs: list[CellJob] = []
    pending: dict[tuple[str, str, int], int] = {}  # (label, model, seed) -> its job's index
    skipped: list[str] = []
    columns = spec.budgets[budget].columns
    chosen = [
        row
        for row in spec.rows
        if (columns is None or row.column in columns)
        and (
            pattern is None or pattern.search(f"{row.label} {row.method} {row.model} {row.column}")
        )
    ]
    if not chosen:
        first = spec.rows[0]
        raise ValueError(
            f"only: {only!r} matches no row of {table} at the {budget} budget (each row is "
            f"matched as 'label method model column', e.g. '{first.label} {first.method} "
            f"{first.model} {first.column}')"
        )
    for row in chosen:
        if row.method not in METHODS:
            skipped.append(f"{row.label} ({row.method}): method not implemented yet")
            continue
        parent = row.init_from or row.evaluate_run_of
        for seed in seed_list:
            path = base / "cells" / row.key / f"seed{seed}.json"
            if path.is_file():
                slots.append(json.loads(path.read_text()))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            needs = (
                (pending[parent, row.model, seed],) if (parent, row.model, seed) in pending else ()
            )
            pending[row.label, row.model, seed] = len(jobs)
            jobs.append(CellJob(row, seed, path, needs))
            slots.append(None)
    data_dir = str(Path(data_dir).resolve()) if data_dir else None
    bars = progress and executor == "local"  # workers' bars would interleave or reach nothing
    runner = _CellRunner(
        spec,
        budget,
        base,
        device,
        data_dir,
        bars,
        " ".join(sys.argv),
        tuple(seed_list) if together else (),
        compile=compile,
    )
    computed = iter(run_jobs(jobs, runner, executor, address, progress, workers))
    cells = [cell if cell is not None else next(computed) for cell in slots]
    name = f"{table}.md" if budget == "paper" else f"{table}-{budget}.md"
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished_cells(spec, base)  # also those of earlier runs with other --only
    markdown = table_markdown(spec, budget, finished, skipped)
    atomic_write_bytes(out / name, markdown.encode())
    plots = _plots(spec, finished, base, data_dir)
    return {
        "table": table,
        "budget": budget,
        "cells": cells,
        "skipped": skipped,
        "markdown": str(out / name),
        "plots": plots,
    }


def _use_replicas(replicas: str, executor: str, device: str) -> bool:
    """Whether the seeds of a row train together (see :func:`reproduce`'s ``replicas``)."""
    from ..train.runs import resolve_device

    if replicas not in ("auto", "on", "off"):
        raise ValueError(f"replicas must be 'auto', 'on' or 'off', got {replicas!r}")
    if replicas == "on" and executor != "local":
        raise ValueError(
            f"replicas train in one process: use them with the local executor, not {executor}"
        )
    if replicas == "auto":
        return executor == "local" and resolve_device(device).type == "cuda"
    return replicas == "on"


def _finished_cells(spec: Table, base: Path) -> list[dict[str, Any]]:
    """Every finished cell of the table under ``base``, in row order, all seeds."""
    return [
        json.loads(path.read_text())
        for row in spec.rows
        for path in sorted((base / "cells" / row.key).glob("seed*.json"))
    ]


def _mean_sd(values: list[float], digits: int = 2) -> str:
    """``mean ± sd`` over seeds (the value itself for one seed)."""
    if not all(math.isfinite(v) for v in values):
        return "inf" if all(v == math.inf for v in values) else "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _per_layer(vectors: list[list[float]], digits: int = 0) -> str:
    """Per-layer means joined by dashes, with the per-layer sd in brackets for n ≥ 2."""
    layers = list(zip(*vectors, strict=True))
    means = "-".join(f"{statistics.fmean(layer):.{digits}f}" for layer in layers)
    if len(vectors) < 2:
        return means
    spreads = "-".join(f"{statistics.stdev(layer):.{digits}f}" for layer in layers)
    return f"{means} (± {spreads})"


def _paper_inside(values: list[float], paper: float) -> str:
    """Whether the paper's value lies in the 95% prediction interval of one more run of
    ours (n ≥ 2): the paper reports a run, not a mean, and a run of a method that behaves
    as ours falls outside our mean's interval far more often than 5% of the time."""
    inside = prediction_interval(values).contains(paper)
    return "–" if inside is None else ("yes" if inside else "no")


def _markdown_row(cells: list[str]) -> str:
    """A markdown table row; a ``|`` inside a cell (as in |W|/|W≠0|) is escaped."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _cells_of(row: Row, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for c in cells
        if c["label"] == row.label and c["model"] == row.model and c["column"] == row.column
    ]


def _errors(cells: list[dict[str, Any]]) -> list[float]:
    return [100 * c["test_error"] for c in cells]


def _per_method_text(b: Budget) -> str:
    """`` (sbp: epochs 30, lr 0.003; ...)`` for a budget's per-method overrides, else ``""``."""
    if not b.per_method:
        return ""
    parts = [
        f"{method}: "
        + ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in options.items()
        )
        for method, options in b.per_method.items()
    ]
    return " (" + "; ".join(parts) + ")"


def table_markdown(
    spec: Table, budget: str, cells: list[dict[str, Any]], skipped: list[str]
) -> str:
    """Paper value next to ours for every row: mean ± sd over seeds, whether the paper's
    error lies in our 95% interval, and the paper's comparisons (ours vs each baseline) as
    differences of means with Welch's 95% interval (:mod:`.stats`)."""
    quick = budget != "paper"
    ours = "ours (QUICK)" if quick else "ours"
    b = spec.budgets[budget]
    lines = [
        f"# Table {spec.number}: {spec.title}" + (" — QUICK budget" if quick else ""),
        "",
        f"Dataset {spec.dataset}; budget `{budget}`: epochs "
        f"{b.epochs or 'per protocol'}{_per_method_text(b)} (lr decay and KL warm-up "
        f"scaled with them), training examples {b.train_subset or 'all'}"
        + (f", columns {', '.join(b.columns)} only. " if b.columns else ". ")
        + (
            "Quick numbers are from short runs and are NOT comparable to the paper's. "
            if quick
            else ""
        )
        + "Ours: mean ± sd over the seeds; 'paper in our 95% PI': whether the paper's "
        "error lies in the 95% prediction interval of one more run of ours, "
        "m ± t(0.975, n − 1)·s·√(1 + 1/n) (n ≥ 2 seeds).",
        "",
    ]
    extra = {
        "compression": [
            "paper sparsity %",
            f"{ours} sparsity %",
            "paper |W|/|W≠0|",
            f"{ours} |W|/|W≠0|",
        ],
        "neurons": ["paper neurons", f"{ours} neurons"],
    }.get(spec.metric, [])
    header = [
        "method", "network", "paper error %", f"{ours} error %", "paper in our 95% PI",
        *extra, "epochs", "seeds",
    ]  # fmt: skip
    lines += [_markdown_row(header), "|" + "---|" * len(header)]
    for row in spec.rows:
        mine = _cells_of(row, cells)
        if not mine:
            continue
        errors = _errors(mine)
        values = [
            row.label, row.column, f"{row.paper_error:.2f}", _mean_sd(errors),
            _paper_inside(errors, row.paper_error),
        ]  # fmt: skip
        if spec.metric == "compression":
            ratios = [c["compression"]["compression_ratio"] or math.inf for c in mine]
            sparsity = [[layer["sparsity"] for layer in c["compression"]["layers"]] for c in mine]
            values += [
                row.paper_sparsity or "–",
                _per_layer(sparsity, digits=1),
                f"{row.paper_ratio:g}" if row.paper_ratio else "–",
                _mean_sd(ratios, digits=1),
            ]
        elif spec.metric == "neurons":
            values += [row.paper_neurons or "–", _per_layer([c["neurons_per_layer"] for c in mine])]
        values += [str(mine[0]["epochs"]), str(len(mine))]
        lines.append(_markdown_row(values))
    lines += _comparisons(spec, cells)
    if skipped:
        lines += ["", "Not run:", *(f"- {s}" for s in skipped)]
    return "\n".join(lines) + "\n"


def _comparisons(spec: Table, cells: list[dict[str, Any]]) -> list[str]:
    """The paper's comparison, ours minus each baseline of the same column, for the pairs
    with at least two seeds on both sides: error in points (and, for the compression
    tables, |W|/|W≠0| or the number of kept units) with Welch's 95% interval."""
    lines = []
    for row in spec.rows:
        mine = _cells_of(row, cells)
        if not row.label.startswith("Ours") or len(mine) < 2:
            continue
        for other in spec.rows:
            theirs = _cells_of(other, cells)
            if other.column != row.column or other.label.startswith("Ours") or len(theirs) < 2:
                continue
            parts = [_difference("error", _errors(mine), _errors(theirs), "points")]
            if spec.metric == "neurons":
                kept = [[sum(c["neurons_per_layer"]) for c in group] for group in (mine, theirs)]
                parts.append(_difference("units kept", *kept, "", digits=0))
            if spec.metric == "compression":
                ratios = [[c["compression"]["compression_ratio"] or math.inf for c in group]
                          for group in (mine, theirs)]  # fmt: skip
                if all(math.isfinite(v) for group in ratios for v in group):
                    parts.append(_difference("|W|/|W≠0|", *ratios, "", digits=1))
            lines.append(
                f"- {row.label} − {other.label} ({row.column}, n = {len(mine)} vs "
                f"{len(theirs)}): " + "; ".join(parts)
            )
    if lines:
        lines = ["", "Ours minus each baseline, difference of means [Welch 95% interval]:", *lines]
    return lines


def _difference(name: str, a: list[float], b: list[float], unit: str, digits: int = 2) -> str:
    d = welch_interval(a, b)
    unit = f" {unit}" if unit else ""
    return f"{name} {d.estimate:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]{unit}"


def _plots(spec: Table, cells: list[dict[str, Any]], base: Path, data_dir: str | None) -> list[str]:
    """Learning curves, log α histograms and per-layer sparsity bars (needs matplotlib).

    Without matplotlib no plot is written and one line on stderr says which extra to install.
    """
    try:
        from .plots import plot_cells
    except ImportError:
        print(PLOTS_NEED_MATPLOTLIB, file=sys.stderr)
        return []
    return plot_cells(spec, cells, base, data_dir)
