"""Shared fixtures: where the real data sets are; one intra-op thread for tiny ops."""

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real MNIST/CIFAR-10 folder beside the repository (skip when absent)."""
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    intra-op threads cost more than they give there (10× slower on a busy 2-core machine),
    and one thread also fixes the summation order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
