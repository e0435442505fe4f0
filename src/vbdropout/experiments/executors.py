"""Where ``vbd reproduce`` runs its cells: here, one after another; in worker processes
on this machine; or as Ray tasks.

A cell job trains (or re-evaluates) one table cell for one seed and writes its
cell file; a job may need earlier jobs of the same seed (a row that starts from,
or re-evaluates, another row's trained network). Every executor takes the same
jobs and one picklable ``run(job) -> cell`` that does the work and writes the
files, so a cell computed in a worker is the same files as one computed here.

Worker processes (``processes``, no extra package): up to ``workers`` jobs at once,
each in a fresh process (spawned, so no thread pool is inherited) with
:func:`threads_per_worker` threads, a job started once the jobs it needs are done.
A job whose process dies without an answer (killed, out of memory) is started
again, at most ``RETRIES`` times, and resumes from its run's last checkpoint; a job
that raises is not retried, and the jobs that need it are not started.

Ray (``pip install "vbdropout[ray]"``): one task per job, one CPU each, the
dependencies passed as task arguments (Ray starts a job when its parents are
done). A task whose worker dies is retried (``max_retries = RETRIES``); the retry finds the
run's last checkpoint and resumes from it, so a killed worker loses at most the
epoch in progress. Run directories must be on storage every worker sees.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from .tables import Row

__all__ = [
    "EXECUTORS",
    "RAY_MISSING",
    "CellJob",
    "check_executor",
    "machine_cores",
    "run_jobs",
    "threads_per_worker",
]

EXECUTORS = ("local", "processes", "ray")
RAY_MISSING = 'vbd reproduce --executor ray needs ray: pip install "vbdropout[ray]"'
RETRIES = 3  # restarts of a job whose worker died (a failing cell is not retried)
STOP_GRACE_SECONDS = 5.0  # what an interrupted worker gets to stop by itself


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


def machine_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` worker processes: the cores shared out, at least 1."""
    return max(1, machine_cores() // workers)


def check_executor(executor: str, address: str | None, workers: int | None = None) -> None:
    """Refuse an unknown executor, an address without Ray, a worker count without worker
    processes, a missing ray package or an unreachable cluster, before anything is written."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if workers is not None and executor != "processes":
        raise ValueError(f"a worker count is for --executor processes, not {executor}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if executor != "ray":
        if address is not None:
            raise ValueError(f"an address is for --executor ray (the {executor} executor has none)")
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
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """The cells of ``jobs``, in their order, computed by ``executor``. ``progress``: in
    worker processes or on Ray, one line on stderr as each cell finishes (locally, each
    run shows its own bar). ``workers``: how many worker processes (default: one per core)."""
    if executor == "local":
        return [run(job) for job in jobs]
    if executor == "processes":
        return _run_in_processes(jobs, run, workers or machine_cores(), progress)
    return _run_on_ray(jobs, run, address, progress)


def _report(progress: bool, done: int, total: int, job: CellJob, outcome: str) -> None:
    """One progress line on stderr for a finished (or failed) cell."""
    if progress:
        print(f"vbd reproduce: [{done}/{total}] {job.name}: {outcome}", file=sys.stderr)


def _outcome(cell: dict[str, Any]) -> str:
    return f"test error {100 * cell['test_error']:.2f}%"


def _raise_failures(failed: dict[str, list[str]], total: int, where: str) -> None:
    """One error naming every failed cell, each reason once (nothing if none failed)."""
    if failed:
        count = sum(len(names) for names in failed.values())
        raise RuntimeError(
            f"{count} of {total} cells failed {where}: "
            + "; ".join(f"{', '.join(names)}: {why}" for why, names in failed.items())
        )


def _work(run: Run, job: CellJob, threads: int, answer: Connection) -> None:
    """A worker process's body: compute the cell, send ("cell", cell) or ("error", first
    line). Interrupted (SIGINT, or SIGTERM from the driver) it sends nothing: the driver
    counts it as stopped, and the run keeps its last checkpoint."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cell = run(job)
    except KeyboardInterrupt:
        return
    except Exception as err:  # the cell failed: say why in one line
        answer.send(("error", _first_line(err)))
    else:
        answer.send(("cell", cell))


def _run_in_processes(
    jobs: Sequence[CellJob], run: Run, workers: int, progress: bool
) -> list[dict[str, Any]]:
    """Run the jobs in at most ``workers`` spawned processes at once (see the module
    docstring); then raise one error naming every failed cell."""
    context = multiprocessing.get_context("spawn")
    threads = threads_per_worker(workers)
    cells: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}  # job -> why it failed (or was not started)
    starts = [0] * len(jobs)
    waiting = list(range(len(jobs)))  # not started yet, in order
    running: dict[int, tuple[Any, Connection]] = {}  # job -> (its process, its answer's end)

    def fail(index: int, why: str) -> None:
        failures[index] = why
        _report(progress, len(cells) + len(failures), len(jobs), jobs[index], f"failed: {why}")

    try:
        while waiting or running:
            for index in list(waiting):
                needs = jobs[index].needs
                if any(n in failures for n in needs):
                    waiting.remove(index)
                    fail(index, "a cell it starts from failed")
                elif len(running) < workers and all(n in cells for n in needs):
                    waiting.remove(index)
                    receive, send = context.Pipe(duplex=False)
                    process = context.Process(
                        target=_work, args=(run, jobs[index], threads, send), daemon=True
                    )
                    process.start()
                    send.close()  # the worker holds its end: EOF here once it is gone
                    running[index] = (process, receive)
                    starts[index] += 1
            if not running:
                continue
            # an answer's end is ready when the answer comes (read before the worker can
            # end: a large one would fill the pipe) or when the worker is gone (EOF)
            ready = wait([receive for _, receive in running.values()])
            for index in [i for i, (_, r) in running.items() if r in ready]:
                process, receive = running.pop(index)
                try:
                    answer = receive.recv()
                except EOFError:  # it died without answering
                    answer = None
                receive.close()
                process.join()
                if answer is None and starts[index] <= RETRIES:
                    waiting.insert(0, index)  # died: start again, resuming the run
                elif answer is None:
                    fail(index, f"its worker process died {starts[index]} times "
                                f"(last exit code {process.exitcode})")  # fmt: skip
                elif answer[0] == "error":
                    fail(index, answer[1])
                else:
                    cells[index] = answer[1]
                    _report(progress, len(cells) + len(failures), len(jobs), jobs[index],
                            _outcome(answer[1]))  # fmt: skip
    finally:  # interrupted: let the workers stop at their checkpoints, then make them
        for process, _ in running.values():
            process.join(STOP_GRACE_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join()
    named: dict[str, list[str]] = {}  # why -> the cells that failed so, in table order
    for index in sorted(failures):
        named.setdefault(failures[index], []).append(jobs[index].name)
    _raise_failures(named, len(jobs), "in worker processes")
    return [cells[i] for i in range(len(jobs))]


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
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_after)
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
                outcome = _outcome(cell)
            except ray.exceptions.RayError as err:
                failed.setdefault(why := _cause(err, ray), []).append(job.name)
                outcome = f"failed: {why}"
            _report(progress, len(jobs) - len(remaining), len(jobs), job, outcome)
    finally:
        if started:
            ray.shutdown()
    _raise_failures(failed, len(jobs), "on Ray")
    return [cells[i] for i in range(len(jobs))]


def _cause(err: BaseException, ray: Any) -> str:
    """The first line of what a task raised (Ray wraps it with a traceback), or of why
    its worker was lost."""
    return _first_line(err.cause if isinstance(err, ray.exceptions.RayTaskError) else err)


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
