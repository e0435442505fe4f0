"""A run directory: its lock, its marker, its metrics files and TensorBoard.

``vbd train`` writes into one directory (:func:`prepare_out` creates or accepts it and
marks it with :data:`RUN_MARKER`); only one process trains into it at a time
(:func:`run_lock`). Every file is written atomically (:mod:`vbdropout.io`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from ..io import atomic_write_bytes, new_folders, remove_if_empty
from .config import ConfigError

__all__ = [
    "RUN_FILES",
    "RUN_MARKER",
    "Claim",
    "RunLockedError",
    "check_out",
    "check_replica_folder",
    "claim",
    "claimed",
    "holds_a_run",
    "log_scalars",
    "prepare_out",
    "run_lock",
    "tensorboard",
    "write_metrics",
]

# The files of a run directory, all written with atomic_write_bytes.
RUN_FILES = ("checkpoint.pt", "config.toml", "metrics.jsonl", "metrics.csv", "summary.json")
# Written first into every run directory: it marks the directory as one of ours.
RUN_MARKER = ".vbdropout-run"


class RunLockedError(RuntimeError):
    """Another live process is training into the same run directory."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run: refuse if another live process holds it.

    The lock is an exclusive ``flock`` on ``out/.lock`` (released by the kernel
    even when the holder is SIGKILLed), and the file names the holder's pid. A
    file naming a live pid whose holder has no flock (a writer without flock
    support) also refuses; a file left by a dead process is taken over.
    """
    lock = out / ".lock"
    while True:
        try:  # O_NOFOLLOW: a planted symlink must not make us truncate its target
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise ConfigError(f"cannot open the run lock {lock}: {_why(err, lock)}") from None
        try:
            held = _try_flock(fd)
            if held and not _same_file(fd, lock):
                os.close(fd)  # its previous holder unlinked it after we opened it: retry
                continue
            pid = _read_pid(fd) if held else _holder_pid(fd)
            if not held or (pid and _alive(pid)):
                raise RunLockedError(
                    f"{out} is in use by another training process (pid {pid or 'unknown'}); "
                    f"wait for it or choose another --out (if no such process is running, "
                    f"delete {lock})"
                )
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _try_flock(fd: int) -> bool:
    """Take an exclusive non-blocking flock on ``fd``; False if someone else holds one."""
    if fcntl is None:  # pragma: no cover - platforms without flock: pid check only
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int:
    """The pid written in the lock file (0 when empty or unreadable)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def _holder_pid(fd: int, patience: float = 1.0) -> int:
    """The pid of a lock's live holder, which writes it just after taking the flock:
    wait up to ``patience`` seconds for it to appear (0 if it never does)."""
    deadline = time.monotonic() + patience
    while not (pid := _read_pid(fd)) and time.monotonic() < deadline:
        time.sleep(0.005)
    return pid


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie — dead, not yet reaped, which happens to
    the workers of a killed multi-process run until init collects them — does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux), or it just exited
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the state follows "(comm)"


def _why(err: OSError, path: Path) -> str:
    """``err``'s reason in words; a symlink (loop) where a file belongs is named as such."""
    if path.is_symlink():
        return "it is a symbolic link (refused: writing through it would change another file)"
    return err.strerror or str(err)


@dataclass(frozen=True)
class Claim:
    """What :func:`claim` did to a run directory, so that a run failing before it wrote
    anything can undo it (:meth:`release_if_unused`)."""

    out: Path
    marked: bool  # this claim wrote the marker
    created: list[Path]  # the folders it created, deepest first
    run_files: dict[str, tuple[int, int] | None]  # each run file's (inode, mtime) before

    def release_if_unused(self) -> None:
        """Undo the claim when the run changed none of its :data:`RUN_FILES` (it failed on
        missing data, a bad ``--init``, a model that does not fit the data): remove the
        marker, then the folders created for it when empty. Done under the run lock, and
        not at all while another process holds it (it is training there). A folder that
        held files before (``--force``), run-file names included, so never stays a run
        directory by a failed run."""
        if not self.marked:
            return
        try:
            with run_lock(self.out):
                if _run_files_state(self.out) != self.run_files:
                    return
                (self.out / RUN_MARKER).unlink(missing_ok=True)
        except (RunLockedError, ConfigError):
            return
        remove_if_empty(self.created)


def claim(out: Path, force: bool = False) -> Claim:
    """:func:`prepare_out`, remembering what it changed."""
    created, before = new_folders(out), _run_files_state(out)
    return Claim(out, prepare_out(out, force), created, before)


def _run_files_state(out: Path) -> dict[str, tuple[int, int] | None]:
    """Each run file's inode and modification time (``None``: absent); a run that writes
    one (atomically: a new inode) changes it."""
    state: dict[str, tuple[int, int] | None] = {}
    for name in RUN_FILES:
        try:
            st = (out / name).stat()
        except OSError:
            state[name] = None
        else:
            state[name] = (st.st_ino, st.st_mtime_ns)
    return state


@contextmanager
def claimed(out: Path, force: bool = False) -> Iterator[None]:
    """:func:`claim` and :func:`run_lock` for the block; a block that fails before its run
    wrote any run file leaves ``out`` as it was (:meth:`Claim.release_if_unused`)."""
    taken = claim(out, force)
    try:
        with run_lock(out):
            yield
    except BaseException:
        taken.release_if_unused()
        raise


def prepare_out(out: Path, force: bool = False) -> bool:
    """Create (or accept) the run directory ``out``, check that it is writable and mark it;
    whether this call marked it (``out`` was not yet one of ours).

    Refused: a directory holding files that is not one of our run directories (no
    :data:`RUN_MARKER`, no checkpoint), unless ``force``; and one whose lock or run
    files are symbolic links (we would write or read through them).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass  # a unique name: concurrent runs must not trip over each other's probe
    except OSError as err:
        raise ConfigError(
            f"cannot write to output directory {out}: {err.strerror or err}"
        ) from None
    if check_out(out, force):
        return False
    atomic_write_bytes(out / RUN_MARKER, b"vbdropout run directory (written by vbd train)\n")
    return True


def check_out(out: Path, force: bool = False) -> bool:
    """Refuse ``out`` as :func:`prepare_out` would (writes nothing); whether it is already
    marked as one of our run directories (or holds a checkpoint)."""
    if not out.is_dir():
        return False
    links = [out / name for name in (".lock", RUN_MARKER, *RUN_FILES) if (out / name).is_symlink()]
    if links:
        raise ConfigError(
            f"{links[0]} is a symbolic link; a run directory's files must be its own "
            f"(remove the link or choose another --out)"
        )
    if _is_ours(out):
        return True  # (a checkpoint: a run of an earlier version, or one to be refused)
    foreign = sorted(p.name for p in out.iterdir() if not _in_the_making(p.name))
    if foreign and not force:
        raise ConfigError(
            f"{out} is not empty ({_shown(foreign)}) and is not a vbd run directory; choose an "
            f"empty or new --out, or pass --force to train into it (its "
            f"{', '.join(RUN_FILES)} and .lock would be replaced)"
        )
    return False


def holds_a_run(out: Path, replicas: bool = False) -> bool:
    """Whether ``out`` holds a run (one of its ``seedN`` folders does, for a replica group):
    what ``--resume`` would continue."""
    runs = [out / p.name for p in out.glob("seed*")] if replicas else [out]
    return any(_is_ours(run) for run in runs)


def check_replica_folder(group: Path, force: bool = False) -> None:
    """Refuse ``group`` as the folder of a replica group (which holds the replicas' run
    directories ``seedN``): a run directory itself, or, unless ``force``, a folder holding
    anything but ``seedN`` folders that holds no replica group yet (a group's folder may
    gather other things, e.g. exports of its replicas)."""
    if not group.is_dir():
        return
    if _is_ours(group):
        raise ConfigError(
            f"{group} is a run directory; --replicas trains into OUT/seedN folders: choose a "
            f"new or empty --out"
        )
    foreign = sorted(
        p.name for p in group.iterdir() if not (p.is_dir() and re.fullmatch(r"seed\d+", p.name))
    )
    if foreign and not force and not holds_a_run(group, replicas=True):
        raise ConfigError(
            f"{group} is not empty ({_shown(foreign)}) and holds no replica group; choose an "
            f"empty or new --out, or pass --force to put the replicas' seedN folders into it"
        )


def _shown(names: list[str]) -> str:
    """The first three of ``names``, for a message."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _is_ours(folder: Path) -> bool:
    """Whether ``folder`` is one of our run directories: marked, or holding a checkpoint."""
    return (folder / RUN_MARKER).is_file() or (folder / "checkpoint.pt").is_file()


def _in_the_making(name: str) -> bool:
    """Whether ``name`` is a transient file of a run starting at the same moment in the same
    directory (its write probe, or its marker before the rename): such a directory is ours
    (the run lock then decides which of the two runs)."""
    return name.startswith(".write-test-") or fnmatch.fnmatch(name, f".{RUN_MARKER}.*.tmp")


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """Write the rows of ``history`` (one per epoch) as ``metrics.jsonl`` and ``metrics.csv``
    (whose columns are every key of any row, in the order they first appear: a run resumed
    by a newer version may add one)."""
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
        writer.writeheader()
        writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())


def tensorboard(out: Path) -> Any:
    """A TensorBoard writer into ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def log_scalars(board: Any, row: dict[str, Any], step: int) -> None:
    """Add the numbers of ``row`` (but its ``epoch``) to the TensorBoard ``board`` at ``step``."""
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            board.add_scalar(key, value, step)
    board.flush()
