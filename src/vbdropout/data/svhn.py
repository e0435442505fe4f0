"""SVHN (cropped digits) from ``<data_dir>/svhn/{train,test}_32x32.mat``; needs scipy.

Each file holds ``X`` (uint8, 32×32×3×N) and ``y`` (N×1, values 1..10 where 10 is the digit
0). Always checked: keys, dtypes, shapes and the label range. In strict mode also the
canonical md5s (unless a SHA256SUMS/MD5SUMS lists the file) and the canonical counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._files import DataFile, require
from .dataset import RawData

BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164a9d4a0",
}
COUNTS = {"train_32x32.mat": 73257, "test_32x32.mat": 26032}


def read(data_dir: Path, *, download: bool, strict: bool) -> RawData:
    """Read and check both SVHN splits (images 3×32×32, labels 0..9)."""
    train_x, train_y = _read_mat(data_dir, "train_32x32.mat", download=download, strict=strict)
    test_x, test_y = _read_mat(data_dir, "test_32x32.mat", download=download, strict=strict)
    return RawData(train_x, train_y, test_x, test_y)


def _read_mat(
    data_dir: Path, name: str, *, download: bool, strict: bool
) -> tuple[np.ndarray, np.ndarray]:
    sio = require("scipy.io", "data", "Loading SVHN")
    file = DataFile(data_dir / "svhn" / name, data_dir, urls=(BASE_URL + name,), md5=MD5[name])
    file.fetch(download=download, strict=strict)
    try:
        mat = sio.loadmat(file.path)
    except Exception as exc:  # scipy raises many types for damaged files
        raise file.error(f"not a readable MATLAB file ({type(exc).__name__}: {exc})") from exc
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise file.error("wrong content: expected variables 'X' and 'y'")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] == 0:
        raise file.error(f"wrong shape: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    n = x.shape[3]
    if y.shape != (n, 1) or not np.issubdtype(y.dtype, np.integer):
        raise file.error(f"wrong shape: y is {y.dtype} {y.shape}, expected integers ({n}, 1)")
    if strict and n != COUNTS[name]:
        raise file.error(f"wrong shape: {n} images, expected {COUNTS[name]}")
    y = y[:, 0]
    if y.min() < 1 or y.max() > 10:
        index = int(np.argmax((y < 1) | (y > 10)))
        raise file.error(f"label out of range: {y[index]} at index {index}, expected 1..10")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, (y % 10).astype(np.int64)
