"""scikit-learn's bundled 8×8 handwritten digits (1797 images, values 0..16); no files.

Split deterministically and stratified into 1437 train / 360 test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._files import require
from .dataset import RawData

TEST_SIZE = 360
SEED = 0


def read(data_dir: Path, *, download: bool, strict: bool) -> RawData:
    """Load and split the digits (images 1×8×8); the arguments are unused."""
    datasets = require("sklearn.datasets", "demo", "Loading the digits dataset")
    model_selection = require("sklearn.model_selection", "demo", "Loading the digits dataset")
    digits = datasets.load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images, digits.target, test_size=TEST_SIZE, stratify=digits.target, random_state=SEED
    )
    return RawData(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), max_value=16)
