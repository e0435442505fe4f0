"""Dataset names, their readers, and :func:`load_dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from . import cifar10, digits, mnist, svhn
from ._files import resolve_data_dir
from .dataset import Dataset, RawData, build_dataset


class Reader(Protocol):
    """Reads one dataset's files from a data dir into uint8 arrays."""

    def __call__(self, data_dir: Path, *, download: bool, strict: bool) -> RawData: ...


DATASETS: dict[str, Reader] = {
    "mnist": mnist.read,
    "cifar10": cifar10.read,
    "svhn": svhn.read,
    "digits": digits.read,
}
# The data sets that come with a Python package (scikit-learn), not as files in a data dir.
PACKAGED = frozenset({"digits"})


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    train_subset: int | None = None,
    strict: bool = True,
    input_scaling: str = "standardize",
) -> Dataset:
    """Load a dataset into memory as normalized tensors.

    Args:
        name: one of :data:`DATASETS` (``mnist``, ``cifar10``, ``svhn``, ``digits``).
        data_dir: folder holding ``mnist/``, ``cifar10/``, ``svhn/``; see
            :func:`resolve_data_dir` for the default.
        download: fetch missing files from their canonical URLs (md5-checked, atomic).
        train_subset: keep only the first ``train_subset`` training examples
            (normalization still uses the statistics of the full training split).
        strict: require canonical example counts and, for files not listed in a
            SHA256SUMS/MD5SUMS beside them, canonical md5s. ``strict=False`` accepts
            any well-formed files (e.g. small generated ones) on structure checks alone.
        input_scaling: ``standardize`` (per-channel mean/std) or ``unit`` (x/255), see
            :data:`~vbdropout.data.dataset.INPUT_SCALINGS`.

    Raises:
        ValueError: unknown ``name`` or invalid ``train_subset``.
        DataError: a data file is missing, corrupt or fails a check.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ValueError(f"train_subset must be a positive int or None, got {train_subset!r}")
    raw = DATASETS[name](resolve_data_dir(data_dir), download=download, strict=strict)
    return build_dataset(name, raw, train_subset, input_scaling)
