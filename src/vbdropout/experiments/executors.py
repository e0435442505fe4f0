"""Where ``vbd reproduce`` runs its cells: here, one after another, or as Ray tasks.

A cell job trains (or re-evaluates) one table cell for one seed and writes its
cell file; a job may need earlier jobs of the same seed (a row that starts from,
or re-evaluates, another row's trained network). Both executors take the same
jobs and one picklable ``run(job) -> cell`` that does the work and writes the
files, so a cell computed on a Ray worker is the same files as one computed here.

Ray (``pip install "vbdropout[ray]"``): one task per job, one CPU each, the
dependencies passed as task arguments (Ray starts a job when its parents are
done). A task whose worker dies is retried (``max_retries``); the retry finds the
run's last checkpoint and resumes from it, so a killed worker loses at most the
epoch in progress. Run directories must be on storage every worker sees.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tables import Row

__all__ = ["EXECUTORS", "RAY_MISSING", "CellJob", "check_executor", "run_jobs"]

EXECUTORS = ("local", "ray")
RAY_MISSING = 'vbd reproduce --executor ray needs ray: pip install "vbdropout[ray]"'
RAY_RETRIES = 3  # retries of a task whose worker died (a failing cell is not retried)


@dataclass(frozen=True)
class CellJob:
    """One cell and seed to compute; ``needs``: indices of earlier jobs to wait for."""

    row: Row
    seed: int
    path: Path  # the cell file it writes
    needs: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """The cell as an error message names it."""
        parts = dict.fromkeys(part for part in (self.row.model, self.row.column) if part)
        where = " ".join(parts)  # Table 4's column is its model
        return f"{self.row.label} ({where}) seed {self.seed}"


Run = Callable[[CellJob], dict[str, Any]]


def check_executor(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, a missing ray package or an
    unreachable cluster, before anything is written."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if executor == "local":
        if address is not None:
            raise ValueError("an address is for --executor ray (the local executor has none)")
        return
    _import_ray()
    if address is not None and address != "auto":
        _check_reachable(address)


def run_jobs(
    jobs: Sequence[CellJob],
    run: Run,
    executor: str = "local",
    address: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The cells of ``jobs``, in their order, computed by ``executor``. ``progress``: on
    Ray, one line on stderr as each cell finishes (locally, each run shows its own bar)."""
    if executor == "local":
        return [run(job) for job in jobs]
    return _run_on_ray(jobs, run, address, progress)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError(RAY_MISSING) from err
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Open and close a TCP connection to ``host:port`` (Ray's own connect retries for
    minutes before it gives up on an unreachable head)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT (or ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {err}") from err


def _after(run: Run, job: CellJob, *parents: dict[str, Any]) -> dict[str, Any]:
    """The task body: ``parents`` are the cells ``job`` needs, finished before it starts."""
    return run(job)


def _run_on_ray(
    jobs: Sequence[CellJob], run: Run, address: str | None, progress: bool
) -> list[dict[str, Any]]:
    """Submit every job, wait for all, then raise one error naming every failed cell."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        except ConnectionError as err:
            raise ConnectionError(
                f"cannot connect to Ray at {address}: {err} (a head with token authentication, "
                "as `ray start` sets up where ~/.ray/auth_token exists, needs RAY_AUTH_MODE=token "
                "here too)"
            ) from err
    try:
        task = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(_after)
        refs: list[Any] = []
        for job in jobs:
            refs.append(task.remote(run, job, *(refs[i] for i in job.needs)))
        cells: dict[int, dict[str, Any]] = {}
        failed: dict[str, list[str]] = {}  # why -> the cells that failed so
        index = {ref: i for i, ref in enumerate(refs)}
        remaining = list(refs)
        while remaining:
            [ref], remaining = ray.wait(remaining, num_returns=1)
            job = jobs[index[ref]]
            try:
                cells[index[ref]] = cell = ray.get(ref)
                outcome = f"test error {100 * cell['test_error']:.2f}%"
            except ray.exceptions.RayError as err:
                failed.setdefault(why := _cause(err, ray), []).append(job.name)
                outcome = f"failed: {why}"
            if progress:
                done = len(jobs) - len(remaining)
                print(f"vbd reproduce: [{done}/{len(jobs)}] {job.name}: {outcome}", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()
    if failed:
        count = sum(len(names) for names in failed.values())
        raise RuntimeError(
            f"{count} of {len(jobs)} cells failed on Ray: "
            + "; ".join(f"{', '.join(names)}: {why}" for why, names in failed.items())
        )
    return [cells[i] for i in range(len(jobs))]


def _cause(err: BaseException, ray: Any) -> str:
    """The first line of what a task raised (Ray wraps it with a traceback), or of why
    its worker was lost."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
