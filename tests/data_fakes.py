"""Small generated data files in the real on-disk formats, for tests of vbdropout.data."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def write_gz(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(payload)


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array (magic 0x08 << 8 | ndim unless given)."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 24, n_test: int = 12, seed: int = 0) -> dict:
    """Write the four MNIST files under ``root/mnist``; return {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        images_name, labels_name = MNIST_FILES[split]
        write_gz(root / "mnist" / images_name, idx_bytes(images))
        write_gz(root / "mnist" / labels_name, idx_bytes(labels))
        out[split] = (images, labels)
    return out


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))


def cifar_batch(data: np.ndarray, labels: list[int]) -> dict:
    return {
        b"batch_label": b"fake batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def write_cifar(folder: Path, n: int = 6, seed: int = 0) -> dict:
    """Write a cifar-10-batches-py folder with ``n`` images per batch; return the batches."""
    rng = np.random.default_rng(seed)
    batches = {}
    for k, name in enumerate(CIFAR_BATCHES):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(k + i) % 10 for i in range(n)]
        write_pickle(folder / name, cifar_batch(data, labels))
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": n, b"label_names": names})
    return batches


def write_tar(archive: Path, members: dict[str, bytes]) -> None:
    """A .tar.gz with the given regular-file members (names used verbatim)."""
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_svhn(
    folder: Path, name: str, n: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write an SVHN-style .mat (X 32×32×3×n uint8, y n×1 in 1..10); return (X, y)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / name, {"X": x, "y": y})
    return x, y


def write_sums(folder: Path, files: list[Path], alg: str = "sha256") -> Path:
    """Write SHA256SUMS/MD5SUMS in ``folder`` listing ``files`` relative to it."""
    lines = [
        f"{hashlib.new(alg, f.read_bytes()).hexdigest()}  {f.relative_to(folder).as_posix()}\n"
        for f in files
    ]
    sums = folder / {"sha256": "SHA256SUMS", "md5": "MD5SUMS"}[alg]
    sums.write_text("".join(lines))
    return sums


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }
