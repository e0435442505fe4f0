"""In-memory datasets: raw uint8 splits from the loaders, normalized into float tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class RawData:
    """Splits as read from disk: uint8 images N×C×H×W with values 0..max_value, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    max_value: int = 255


@dataclass(frozen=True, eq=False)
class Dataset:
    """Normalized train/test tensors of one dataset.

    ``x`` tensors are float32 N×C×H×W: pixels scaled to [0, 1], then standardized with the
    per-channel ``mean``/``std`` of the full training split (given for [0, 1] pixels;
    with ``input_scaling="unit"`` the pixels stay in [0, 1]: mean 0 and std 1).
    ``y`` tensors are int64 class indices in ``0..num_classes-1``.
    """

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one input."""
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)

    def to(self, device: torch.device) -> Dataset:
        """The data set with its tensors on ``device`` (the same tensors where they are)."""
        tensors = ("train_x", "train_y", "test_x", "test_y")
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in tensors})


def channel_stats(x: np.ndarray, max_value: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images, scaled by ``max_value``."""
    values = torch.arange(256, dtype=torch.float64) / max_value
    images = torch.from_numpy(x)
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = float(counts @ values / counts.sum())
        var = float(counts @ (values - mean) ** 2 / counts.sum())
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)


INPUT_SCALINGS = ("standardize", "unit")
"""How pixels become inputs: ``standardize`` — scaled to [0, 1], then per channel
(x − mean)/std of the training split; ``unit`` — scaled to [0, 1] only (x/255), so a blank
pixel is exactly 0 (Table 5's input, docs/METHODS.md)."""


def build_dataset(
    name: str, raw: RawData, train_subset: int | None = None, input_scaling: str = "standardize"
) -> Dataset:
    """Normalize ``raw`` as ``input_scaling`` says (:data:`INPUT_SCALINGS`, statistics of the
    training split); keep the first ``train_subset``."""
    if input_scaling not in INPUT_SCALINGS:
        raise ValueError(
            f"input_scaling must be one of {', '.join(INPUT_SCALINGS)}, got {input_scaling!r}"
        )
    n_train = len(raw.train_x)
    if train_subset is not None and not 1 <= train_subset <= n_train:
        raise ValueError(
            f"train_subset must be between 1 and {n_train} for {name}, got {train_subset}"
        )
    mean, std = channel_stats(raw.train_x, raw.max_value)
    if input_scaling == "unit":
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    if min(std) == 0:
        raise ValueError(
            f"{name}: a channel of the training images is constant; cannot standardize"
        )
    train_x = raw.train_x if train_subset is None else raw.train_x[:train_subset]
    train_y = raw.train_y if train_subset is None else raw.train_y[:train_subset]
    scale = torch.tensor([1.0 / (raw.max_value * s) for s in std]).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)

    def normalize(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).float().mul_(scale).sub_(shift)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return Dataset(
        name=name,
        train_x=normalize(train_x),
        train_y=labels(train_y),
        test_x=normalize(raw.test_x),
        test_y=labels(raw.test_y),
        num_classes=10,
        mean=mean,
        std=std,
    )
