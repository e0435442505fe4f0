"""CIFAR-10 from the "python version" batches in ``<data_dir>/cifar10/cifar-10-batches-py/``.

If that folder is missing, ``cifar10/cifar-10-python.tar.gz`` (downloaded when allowed) is
verified and safely extracted. Batches are unpickled with a restricted unpickler that only
allows the numpy array reconstruction globals the real files use. Always checked: the five
train batches, ``test_batch`` and ``batches.meta`` exist, each batch has uint8 ``b'data'``
of shape n×3072 and n ``b'labels'`` in 0..9. Files listed in a SHA256SUMS/MD5SUMS beside
them must match it. Strict mode also requires the canonical 10000 images per batch and the
canonical md5 of the archive (unless a sums file lists it).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ._files import DataFile, extract_tar
from .dataset import RawData

ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
BATCH_SIZE = 10000

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's ndarray _reconstruct, any numpy version
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def read(data_dir: Path, *, download: bool, strict: bool) -> RawData:
    """Read and check all CIFAR-10 batches (images 3×32×32, channels R, G, B)."""
    folder = data_dir / "cifar10" / FOLDER
    if not folder.is_dir():
        archive = DataFile(
            data_dir / "cifar10" / ARCHIVE_NAME, data_dir, (ARCHIVE_URL,), ARCHIVE_MD5
        )
        if not archive.path.is_file() and not download:
            raise _file(folder, data_dir).error(f"missing (and no {ARCHIVE_NAME} beside it)")
        archive.fetch(download=download, strict=strict)
        extract_tar(archive, FOLDER)
    _read_meta(_file(folder / META, data_dir), strict=strict)
    train = [_read_batch(_file(folder / name, data_dir), strict=strict) for name in TRAIN_BATCHES]
    test_x, test_y = _read_batch(_file(folder / TEST_BATCH, data_dir), strict=strict)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return RawData(train_x, train_y, test_x, test_y)


def _file(path: Path, data_dir: Path) -> DataFile:
    return DataFile(path, data_dir, urls=(ARCHIVE_URL,))


def _unpickle(file: DataFile, *, strict: bool) -> dict:
    file.fetch(download=False, strict=strict)
    try:
        with open(file.path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # an untrusted pickle can fail in many ways
        raise file.error(f"not a valid CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise file.error(f"wrong content: a {type(obj).__name__}, expected a dict")
    return obj


def _read_meta(file: DataFile, *, strict: bool) -> None:
    names = _unpickle(file, strict=strict).get(b"label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise file.error("wrong content: expected b'label_names' with 10 class names")


def _read_batch(file: DataFile, *, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(file, strict=strict)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise file.error("wrong content: b'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32 or len(data) == 0:
        raise file.error(f"wrong shape: b'data' is {data.shape}, expected (n, 3072)")
    if strict and len(data) != BATCH_SIZE:
        raise file.error(f"wrong shape: {len(data)} images, expected {BATCH_SIZE}")
    y = np.asarray(labels if isinstance(labels, list) else None)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(data):
        raise file.error(f"wrong content: b'labels' must be a list of {len(data)} integers")
    if y.min() < 0 or y.max() > 9:
        index = int(np.argmax((y < 0) | (y > 9)))
        raise file.error(f"label out of range: {y[index]} at index {index}, expected 0..9")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)
