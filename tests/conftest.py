"""Shared fixtures: where the real data sets are."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real MNIST/CIFAR-10 folder beside the repository (skip when absent)."""
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA
