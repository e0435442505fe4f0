"""Artifact files: atomic writes and safe loading, shared by training, compression and
the experiments (so that none of them imports another for it).

A crash never leaves a half-written checkpoint, export or result.

Everything is written to a temporary file ``.<name>.<random>.tmp`` in the same
directory, flushed to disk, then renamed over the target (``os.replace`` is
atomic on POSIX) and the directory entry is synced, so a reader sees either the
old file or the new one. Readers only ever open the final names; temp files
left by a killed writer are ignored and removed by the next run that holds the
run lock (:func:`remove_stale_temp_files`). Checkpoints are read with
``torch.load(weights_only=True)``: a crafted file cannot run code.

Fault-injection hook (tests only, inert unless the variable is set): with
``VBD_FAULT_KILL_IN_WRITE=NAME:N`` in the environment, the N-th atomic write of
a file called NAME in this process writes half of its bytes to the temp file,
syncs them and then SIGKILLs its own process — a crash in the middle of the
write, at a deterministic point. ``tests/test_reliability.py`` uses it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FAULT_ENV",
    "CheckpointError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_checkpoint",
    "move_into",
    "new_folders",
    "remove_if_empty",
    "remove_stale_temp_files",
    "save_checkpoint",
]

FAULT_ENV = "VBD_FAULT_KILL_IN_WRITE"
_fault_counts: dict[str, int] = {}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours."""


def _fault_armed(name: str) -> bool:
    """Whether the test hook asks to crash in this write of ``name`` (see module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    target, _, nth = spec.partition(":")
    if target != name:
        return False
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    return _fault_counts[name] == int(nth or 1)


def _write_synced(f: IO[bytes], name: str, data: bytes) -> None:
    """Write ``data`` and fsync it (or, when the test hook is armed, half of it and die)."""
    if _fault_armed(name):
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open dirs)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename.

    A failed write (disk full, quota, I/O error) raises an ``OSError`` naming ``path``
    and saying that its previous content is kept.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 → the usual file permissions
        with os.fdopen(fd, "wb") as f:
            _write_synced(f, path.name, data)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise
    _sync_dir(path.parent)


def _write_error(path: Path, err: OSError) -> OSError:
    """``err`` as an error naming the file and what became of it."""
    kept = (
        f"the previous {path.name} is kept unchanged"
        if path.exists()
        else f"{path.name} was not written"
    )
    error = OSError(f"cannot write {path}: {err.strerror or err}; {kept}")
    error.errno = err.errno
    return error


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temp file beside ``path`` for a writer that needs a file name (the ONNX
    exporter); renamed over ``path`` when the block succeeds, removed when it fails.

    The temp file is created with ``O_EXCL`` (never a name someone could have planted
    as a symlink) and gets the usual permissions.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 → the usual file permissions
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def move_into(folder: Path, staging: Path, names: Iterable[str]) -> None:
    """Rename the files ``names`` from ``staging`` (a folder inside ``folder``, so on the
    same file system) into ``folder``, in the given order, and sync ``folder``. Each rename
    is atomic: a reader sees either the old file or the new one."""
    for name in names:
        os.replace(staging / name, folder / name)
    _sync_dir(folder)


def new_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what
    ``path.mkdir(parents=True)`` would create."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is an empty folder."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def remove_stale_temp_files(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temp files that a killed :func:`atomic_write_bytes` left for ``names``.

    Only call this while no other process writes into ``folder`` (i.e. under the
    run lock). Returns the removed paths.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically (see :func:`load_checkpoint`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_problem(err: Exception) -> str:
    """A one-line reason from torch.load's error (its weights-only text suggests unsafe loading)."""
    text = str(err).strip()
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if not text.startswith("Weights only load failed"):
        return text.splitlines()[0] if text else type(err).__name__
    detail = "unsupported content"
    for line in (line.strip() for line in text.splitlines()[1:]):
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        elif line.startswith(("(", "Check the documentation")):
            continue  # torch's advice on how to load it anyway
        if line:
            detail = line.split(". ", 1)[0].rstrip(".")
            break
    return (
        f"it holds something other than tensors and plain data ({detail}); it was not "
        f"unpickled, as that could run arbitrary code"
    )


def load_checkpoint(
    path: str | os.PathLike[str], required: Iterable[str] = ("model",)
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    ``path`` is a checkpoint file or a run directory. Raises :class:`CheckpointError`
    if it is missing, unreadable, would need arbitrary code to unpickle, or lacks
    one of the ``required`` entries.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        what = "a symbolic link that leads to no file (a loop?)" if path.is_symlink() else ""
        raise CheckpointError(f"no checkpoint at {path}" + (f": it is {what}" if what else ""))
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: zip, or pickle
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is not a PyTorch checkpoint (neither the zip "
            f"file nor the pickle that torch.save writes)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_problem(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a vbdropout checkpoint (not a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a vbdropout checkpoint (no {missing} entries)")
    return state
