"""MNIST from the four canonical gzipped IDX files in ``<data_dir>/mnist/``.

Always checked: gzip integrity, magic numbers (2051 images, 2049 labels), that the byte
count matches the header, 28×28 images, as many images as labels, labels in 0..9.
In strict mode also the canonical md5s (unless a SHA256SUMS/MD5SUMS lists the file) and
the canonical counts 60000/10000; non-strict accepts e.g. small generated files.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ._files import DataFile
from .dataset import RawData

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_MAX_DEFLATE_RATIO = 1032  # deflate expands at most ~1032:1, which bounds what a header can claim
_CHUNK = 1 << 20


def read(data_dir: Path, *, download: bool, strict: bool) -> RawData:
    """Read and check both MNIST splits (images 1×28×28)."""
    train_x, train_y = _read_split(data_dir, *SPLITS["train"], download=download, strict=strict)
    test_x, test_y = _read_split(data_dir, *SPLITS["test"], download=download, strict=strict)
    return RawData(train_x[:, None], train_y, test_x[:, None], test_y)


def _file(data_dir: Path, name: str) -> DataFile:
    urls = tuple(mirror + name for mirror in MIRRORS)
    return DataFile(data_dir / "mnist" / name, data_dir, urls=urls, md5=MD5[name])


def _read_split(
    data_dir: Path, images_name: str, labels_name: str, count: int, *, download: bool, strict: bool
) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = _file(data_dir, images_name), _file(data_dir, labels_name)
    for f in (images_file, labels_file):
        f.fetch(download=download, strict=strict)
    images = read_idx(images_file, IMAGES_MAGIC)
    labels = read_idx(labels_file, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise images_file.error(f"wrong shape: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise images_file.error(
            f"holds {len(images)} images but {labels_file.path.name} holds {len(labels)} labels"
        )
    if strict and len(images) != count:
        raise images_file.error(f"wrong shape: {len(images)} examples, expected {count}")
    if len(labels) and labels.max() > 9:
        index = int(np.argmax(labels > 9))
        raise labels_file.error(
            f"label out of range: {labels[index]} at index {index}, expected 0..9"
        )
    return images, labels.astype(np.int64)


def read_idx(file: DataFile, magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes whose header must start with ``magic``."""
    ndim = magic & 0xFF
    try:
        with gzip.open(file.path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4 + 4 * ndim:
                raise file.error(f"truncated: IDX header is only {len(header)} bytes")
            found = int.from_bytes(header[:4], "big")
            if found != magic:
                raise _content_error(f, file, f"bad magic number {found}, expected {magic}")
            dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            size = math.prod(dims)
            most = file.path.stat().st_size * _MAX_DEFLATE_RATIO
            if size > most:  # a bad header: never try to read (or allocate) that much
                raise _content_error(
                    f,
                    file,
                    f"bad IDX header: dims {dims} need {size} data bytes, more than a gzip "
                    f"file of this size can hold",
                )
            payload = f.read(size)
            if len(payload) < size:
                raise file.error(
                    f"truncated: header {dims} needs {size} data bytes, found {len(payload)}"
                )
            if f.read(1):
                raise _content_error(
                    f, file, f"wrong shape: extra bytes after the {size} that header {dims} needs"
                )
    except (OSError, EOFError, zlib.error) as exc:
        raise file.error(f"corrupt or truncated gzip ({exc})") from exc
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy()


def _content_error(f: gzip.GzipFile, file: DataFile, problem: str) -> Exception:
    """The error for a content ``problem`` found before the end of the gzip stream.

    Reads on to the end first, where gzip checks its CRC-32: a corrupt file (whose
    damage may be what looks like the problem) raises there as corrupt.
    """
    while f.read(_CHUNK):
        pass
    return file.error(problem)
