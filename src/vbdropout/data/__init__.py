"""Datasets for vbdropout: MNIST, CIFAR-10, SVHN and sklearn digits as in-memory tensors.

Files live in a data dir (``--data-dir``, ``$VBD_DATA_DIR`` or ``~/.cache/vbdropout``)::

    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    cifar10/cifar-10-batches-py/   (or cifar10/cifar-10-python.tar.gz, extracted on use)
    svhn/{train,test}_32x32.mat

Every file problem raises :class:`DataError`. Files are only ever written by an explicit
download or by extracting the CIFAR-10 archive, always atomically.
"""

from ._files import DATA_DIR_ENV, DataError, resolve_data_dir
from .batches import iterate_batches
from .dataset import INPUT_SCALINGS, Dataset
from .registry import DATASETS, PACKAGED, load_dataset

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "INPUT_SCALINGS",
    "PACKAGED",
    "DataError",
    "Dataset",
    "iterate_batches",
    "load_dataset",
    "resolve_data_dir",
]
