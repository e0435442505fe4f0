"""Measure what a flipped byte does to each data format (for docs/RELIABILITY.md).

Usage: ``python tests/measure_bitflips.py [STRIDE]``. For a small generated file of
each format it flips every STRIDE-th byte (default 7), loads the data set without a
checksum list and then with the file listed in a SHA256SUMS, and counts the outcomes:
``error`` (a DataError naming the file), ``same`` (loaded, identical tensors: the byte
was padding or metadata) and ``SILENT`` (loaded, different tensors: undetected damage).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from data_fakes import flip_byte, write_cifar, write_mnist, write_sums, write_svhn

from vbdropout.data import DataError, Dataset, load_dataset

CASES = {
    "IDX (gzip)": ("mnist", "mnist/train-images-idx3-ubyte.gz"),
    "CIFAR pickle": ("cifar10", "cifar10/cifar-10-batches-py/data_batch_2"),
    "SVHN .mat": ("svhn", "svhn/test_32x32.mat"),
}


def write_all(root: Path) -> None:
    write_mnist(root)
    write_cifar(root / "cifar10" / "cifar-10-batches-py")
    write_svhn(root / "svhn", "train_32x32.mat")
    write_svhn(root / "svhn", "test_32x32.mat")


def same(a: Dataset, b: Dataset) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k))
        for k in ("train_x", "train_y", "test_x", "test_y")
    )


def outcomes(root: Path, dataset: str, name: str, stride: int) -> Counter[str]:
    """Flip every ``stride``-th byte of ``root/name`` in turn and classify each load."""
    path = root / name
    good, reference = path.read_bytes(), load_dataset(dataset, root, strict=False)
    counts: Counter[str] = Counter()
    for offset in range(0, len(good), stride):
        flip_byte(path, offset)
        try:
            loaded = load_dataset(dataset, root, strict=False)
            counts["same" if same(loaded, reference) else "SILENT"] += 1
        except DataError as err:
            assert str(err).startswith(str(path)), err
            counts["error"] += 1
        path.write_bytes(good)
    return counts


def main(stride: int) -> None:
    print("| format | checksum list | flips | error | same | SILENT |\n|---|---|---|---|---|---|")
    for label, (dataset, name) in CASES.items():
        for listed in (False, True):
            root = Path(tempfile.mkdtemp())
            try:
                write_all(root)
                if listed:
                    write_sums(root, [root / name])
                c = outcomes(root, dataset, name, stride)
                sums = "SHA256SUMS" if listed else "none"
                print(f"| {label} | {sums} | {sum(c.values())} | {c['error']} | {c['same']} "
                      f"| {c['SILENT']} |")  # fmt: skip
            finally:
                shutil.rmtree(root)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
