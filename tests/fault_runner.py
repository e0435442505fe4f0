"""A fork server that starts ``vbd`` runs as real, killable child processes in ~1 s each.

Starting ``python -m vbdropout`` costs 3-5 s of imports on a 2-core machine, which
would make a kill test with many trials slow. This server (a separate process)
imports vbdropout and torch once; each run is then an ``os.fork()`` of it that
calls :func:`vbdropout.cli.main` with its own argv, environment and log file and
ends with ``os._exit``. The tests SIGKILL those children by pid like any other
process; the server only reaps them and reports how they ended.

Protocol, one JSON object per line on stdin/stdout:
``{"spawn": argv, "env": {...}, "log": path}`` -> ``{"pid": N}``;
``{"poll": N}`` -> ``{"status": S or null}``; ``{"wait": N}`` -> ``{"status": S}``,
where S is the exit code, or ``-signal`` for a child killed by a signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

Status = int | None


def _status(raw: int) -> int:
    """Exit code of a reaped child, or ``-signal`` if a signal ended it."""
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Run ``vbd ARGV`` in this forked process and exit with its status (never returns)."""
    code = 1
    # Ctrl-C as in a terminal: a process ignores SIGINT for good if its parent did at its
    # start (e.g. the test process, after a library set SIGINT to SIG_IGN), and then Python
    # never installs the handler that raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.update(env)
        sys.argv = ["vbd", *argv]
        from vbdropout.cli import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Import everything a run needs, then answer requests until stdin closes."""
    import torch

    import vbdropout.cli
    import vbdropout.train.trainer  # noqa: F401  (models, data, compress)

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once
    done: dict[int, int] = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "spawn" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["spawn"], request.get("env", {}), request["log"])
            reply: dict[str, Any] = {"pid": pid}
        else:
            pid = request.get("poll", request.get("wait"))
            if pid not in done:
                reaped, raw = os.waitpid(pid, os.WNOHANG if "poll" in request else 0)
                if reaped:
                    done[pid] = _status(raw)
            reply = {"status": done.get(pid)}
        print(json.dumps(reply), flush=True)


class ForkServer:
    """Client side: start the server, spawn runs, poll/wait them, SIGKILL them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            cwd=Path(__file__).resolve().parent,
        )
        self._ask_raw(None)  # the "ready" line

    def _ask_raw(self, request: dict[str, Any] | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        return json.loads(line)

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        """Start ``vbd ARGV`` (stdout and stderr to ``log``); returns its pid."""
        return self._ask_raw({"spawn": argv, "env": env or {}, "log": str(log)})["pid"]

    def poll(self, pid: int) -> Status:
        """The child's status if it has ended, else None."""
        return self._ask_raw({"poll": pid})["status"]

    def wait(self, pid: int, timeout: float = 120.0) -> int:
        """Wait (at most ``timeout`` s, then SIGKILL and fail) for the child's status."""
        deadline = time.monotonic() + timeout
        while (status := self.poll(pid)) is None:
            if time.monotonic() > deadline:
                self.kill(pid)
                raise TimeoutError(f"run {pid} did not end within {timeout} s")
            time.sleep(0.02)
        return status

    def kill(self, pid: int) -> int:
        """SIGKILL the child and return its status (``-9`` unless it had already ended)."""
        if self.poll(pid) is None:
            os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid cannot have been reused
        return self._ask_raw({"wait": pid})["status"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def kill_a_run_midway(runs: Path, done: threading.Event) -> tuple[Path, str]:
    """SIGKILL the process training the first run seen under ``runs`` between its second
    epoch and its end (the pid in the run's lock); returns that run and its metrics as
    they were at the kill. Gives up when ``done`` is set or after 300 s."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not done.is_set():
        for run in sorted(runs.glob("*-seed*")):
            metrics = run / "metrics.jsonl"
            lines = metrics.read_text() if metrics.is_file() else ""
            if lines.count("\n") >= 2 and not (run / "summary.json").exists():
                os.kill(int((run / ".lock").read_text()), signal.SIGKILL)
                return run, lines
        time.sleep(0.02)
    raise AssertionError("no run was caught in the middle of its epochs")


def reproduce_killing_a_run_midway(argv: list[str], runs: Path) -> tuple[int | None, Path, str]:
    """``vbd ARGV`` (a ``vbd reproduce`` whose workers are other processes) in a thread of
    this process, with one of its runs under ``runs`` SIGKILLed midway
    (:func:`kill_a_run_midway`); returns its exit status (``None`` if it did not end in
    600 s), the killed run and its metrics at the kill."""
    from vbdropout.cli import main

    status: list[int] = []
    done = threading.Event()

    def reproduce() -> None:
        status.append(main(argv))
        done.set()

    thread = threading.Thread(target=reproduce)
    thread.start()
    killed, before = kill_a_run_midway(runs, done)
    thread.join(timeout=600)
    return (status[0] if status else None), killed, before


if __name__ == "__main__":
    serve()
