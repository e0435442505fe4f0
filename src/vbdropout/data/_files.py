"""File handling shared by the loaders: errors, data dir, checksums, downloads, archives.

Checksum policy (see :meth:`DataFile.verify`): a file listed in a ``SHA256SUMS`` or
``MD5SUMS`` file in its folder or any parent folder up to the data dir must match every
listing (entries are paths relative to the list's folder, coreutils format). A file that
is not listed is checked against its canonical md5, if it has one, only in strict mode.
Downloads are always checked against the canonical md5.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType

DATA_DIR_ENV = "VBD_DATA_DIR"
SUMS_FILES = {"SHA256SUMS": "sha256", "MD5SUMS": "md5"}
_HEX_LEN = {"sha256": 64, "md5": 32}
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DataError(Exception):
    """A data file is missing, unreadable, corrupt or not what it should be."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Pick the data folder: explicit argument, else ``$VBD_DATA_DIR``, else a user cache dir."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        cache = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
        data_dir = base / "vbdropout"
    return Path(os.path.abspath(Path(data_dir).expanduser()))


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or explain which pip extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs the optional package {top!r}; install it with: "
            f'pip install "vbdropout[{extra}]"'
        ) from exc


@dataclass(frozen=True)
class DataFile:
    """A file inside a data dir, with where to get it and its canonical md5 if known."""

    path: Path
    data_dir: Path
    urls: tuple[str, ...] = ()
    md5: str | None = None

    def error(self, problem: str) -> DataError:
        """A :class:`DataError` naming the file, the problem, the data dir and the remedy."""
        msg = f"{self.path}: {problem}. Data dir searched: {self.data_dir}."
        if self.urls:
            msg += f" Get it from {' or '.join(self.urls)}"
            if self.md5:
                msg += f" (md5 {self.md5})"
            dataset = self.path.relative_to(self.data_dir).parts[0]  # <data_dir>/<dataset>/...
            msg += (
                f", or download it: vbd download {dataset} on the command line, "
                f"load_dataset({dataset!r}, download=True) in Python."
            )
        msg += (
            f" Choose the data folder with --data-dir or the {DATA_DIR_ENV} environment variable."
        )
        return DataError(msg)

    def absent(self) -> str:
        """Why the file cannot be read as a file ("missing", a dangling or looping symlink)."""
        if self.path.is_symlink():
            return "a symbolic link that leads to no file (dangling, or a loop)"
        return "not a file" if self.path.exists() else "missing"

    def fetch(self, *, download: bool, strict: bool) -> None:
        """Make sure the file is present (downloading it if allowed) and verified."""
        if not self.path.is_file():
            if not download or self.path.is_symlink():
                raise self.error(self.absent())
            self.download()
        self.verify(strict=strict)

    def verify(self, *, strict: bool) -> None:
        """Check the file against listed checksums, or its canonical md5 when strict."""
        if not self.path.is_file():
            raise self.error(self.absent())
        expected = self._listed_checksums()
        if not expected and strict and self.md5:
            origin = (
                "canonical; to accept another copy, list its checksum in a SHA256SUMS beside "
                "it (in Python, or pass strict=False)"
            )
            expected = [("md5", self.md5, origin)]
        if not expected:
            return
        actual = self._hash({alg for alg, _, _ in expected})
        for alg, want, origin in expected:
            if actual[alg] != want:
                raise self.error(
                    f"checksum mismatch: {alg} expected {want} ({origin}), got {actual[alg]}"
                )

    def download(self) -> None:
        """Fetch the file from its URLs into a temp file, check the md5, then rename."""
        if not self.urls or not self.md5:
            raise self.error("missing and cannot be downloaded")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.error(f"cannot create folder for download ({exc})") from exc
        failures = []
        for url in self.urls:
            try:
                self._download_from(url)
                return
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures.append(f"{url}: {exc}")
        raise self.error("download failed (" + "; ".join(failures) + ")")

    def _download_from(self, url: str) -> None:
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part"
        )
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp,
            ):
                progress = _Progress(self.path.name, int(resp.headers.get("Content-Length") or 0))
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
                progress.close()
            if digest.hexdigest() != self.md5:
                raise ValueError(f"md5 mismatch: expected {self.md5}, got {digest.hexdigest()}")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _listed_checksums(self) -> list[tuple[str, str, str]]:
        """(algorithm, hex digest, origin) for every sums-file line that names this file."""
        found = []
        target = os.path.normpath(self.path)
        folder = self.path.parent
        while True:
            for list_name, alg in SUMS_FILES.items():
                sums = folder / list_name
                if sums.is_file():
                    for digest, name in self._parse_sums(sums, alg):
                        if os.path.normpath(folder / name) == target:
                            found.append((alg, digest, f"listed in {sums}"))
            if folder == self.data_dir or folder == folder.parent:
                return found
            folder = folder.parent

    def _parse_sums(self, sums: Path, alg: str) -> list[tuple[str, str]]:
        pattern = re.compile(rf"([0-9a-fA-F]{{{_HEX_LEN[alg]}}}) [ *](.+)")
        try:
            lines = sums.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(f"cannot read checksum list {sums} ({exc})") from exc
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            match = pattern.fullmatch(line)
            if match is None:
                raise self.error(f"malformed line {number} in checksum list {sums}")
            entries.append((match[1].lower(), match[2]))
        return entries

    def _hash(self, algorithms: set[str]) -> dict[str, str]:
        hashes = {alg: hashlib.new(alg, usedforsecurity=False) for alg in algorithms}
        try:
            with open(self.path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    for h in hashes.values():
                        h.update(chunk)
        except OSError as exc:
            raise self.error(f"cannot read ({exc})") from exc
        return {alg: h.hexdigest() for alg, h in hashes.items()}


def extract_tar(archive: DataFile, folder_name: str) -> None:
    """Safely extract ``folder_name/`` from a tar archive into the archive's folder.

    Only regular files and folders with relative, ``..``-free names are accepted. Files
    go into a temp folder next to the archive, which is renamed into place at the end.
    """
    dest = archive.path.parent
    try:
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    except OSError as exc:
        raise archive.error(f"cannot extract into {dest} ({exc})") from exc
    try:
        with tarfile.open(archive.path, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if PurePosixPath(member.name).is_absolute() or ".." in parts:
                    raise archive.error(f"refusing unsafe member path {member.name!r}")
                if member.isdir():
                    tmp.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                elif member.isfile() and parts:
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                else:
                    raise archive.error(f"refusing member {member.name!r} (not a file or folder)")
        extracted = tmp / folder_name
        if not extracted.is_dir():
            raise archive.error(f"archive has no {folder_name}/ folder")
        os.rename(extracted, dest / folder_name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise archive.error(f"cannot extract ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Progress:
    """A one-line download progress bar on stderr."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.shown = name, total, 0, -1

    def update(self, n: int) -> None:
        self.done += n
        step = self.done * 100 // self.total if self.total else self.done // _CHUNK
        if step != self.shown:
            self.shown = step
            size = f"{self.done / 1e6:.1f}" + (f"/{self.total / 1e6:.1f}" if self.total else "")
            pct = f" {step:3d}%" if self.total else ""
            sys.stderr.write(f"\rdownloading {self.name}:{pct} {size} MB")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
