"""The paper's networks, each built from its method's layers.

Every builder takes a :class:`~vbdropout.models.methods.Method`, the input
shape (C, H, W) and the number of classes, and returns an ``nn.Sequential``
whose weight layers come from the method. Choices the paper leaves to its
supplement are stated in each docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from torch import nn

from .methods import Method

__all__ = [
    "kingma_cifar",
    "lenet5_caffe",
    "lenet300_100",
    "lenet500_300",
    "mlp",
    "mlp_srivastava",
]


def mlp(
    method: Method, input_shape: Sequence[int], hidden: Sequence[int], num_classes: int
) -> nn.Sequential:
    """Flatten → [Linear → ReLU] per hidden width → Linear to ``num_classes``."""
    widths = [math.prod(input_shape), *hidden, num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        last = i == len(widths) - 2
        position = "output" if last else ("input" if i == 0 else "hidden")
        layers.append(method.linear(fan_in, fan_out, position))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet300_100(method: Method, input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10, ReLU (Table 4)."""
    return mlp(method, input_shape, (300, 100), num_classes)


def lenet500_300(method: Method, input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """LeNet-500-300: 784-500-300-10, ReLU (Table 5)."""
    return mlp(method, input_shape, (500, 300), num_classes)


def mlp_srivastava(
    method: Method, input_shape: Sequence[int], num_classes: int, width: int = 1060
) -> nn.Sequential:
    """Table 1's network: 3 hidden ReLU layers of ``width`` units (Srivastava et al. 2014).

    The paper gives widths 100, 340, 580, 820, 1060 and defers the rest to its
    supplement. Our choices: plain ReLU layers without max-norm constraints
    (every method gets the same network), Adam instead of momentum SGD.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return mlp(method, input_shape, (width, width, width), num_classes)


def lenet5_caffe(method: Method, input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """LeNet-5-Caffe: conv 20@5×5 → max-pool 2 → conv 50@5×5 → max-pool 2 → fc 500 → fc 10.

    Caffe's example has no nonlinearity after the convolutions; like the sparse
    VD and SBP reimplementations we put a ReLU after each convolution and after
    fc 500.
    """
    channels, height, width = input_shape
    side = [((n - 4) // 2 - 4) // 2 for n in (height, width)]
    if min(side) < 1:
        raise ValueError(f"lenet5_caffe needs inputs of at least 16×16, got {height}×{width}")
    flat = 50 * side[0] * side[1]
    return nn.Sequential(
        method.conv2d(channels, 20, 5, "input"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        method.conv2d(20, 50, 5, "hidden"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        method.linear(flat, 500, "hidden"),
        nn.ReLU(),
        method.linear(500, num_classes, "output"),
    )


def kingma_cifar(
    method: Method, input_shape: Sequence[int], num_classes: int, scale: float = 1.0
) -> nn.Sequential:
    """Tables 2–3's convolutional network with a width ``scale`` k ∈ {1, 1.5, 2}.

    The paper follows Kingma et al. (2015) and defers the architecture to its
    supplement, which we do not have. Our reading, stated here so it can be
    checked: three 'same'-padded convolutions of 32k, 64k and 128k channels
    (5×5, 5×5, 3×3), each followed by ReLU and 2×2 max-pooling, then a hidden
    fully connected layer of 256k units and the classifier. No batch norm, no
    augmentation (so that dropout is the only regularizer compared).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    channels, height, width = input_shape
    c1, c2, c3, hidden = (max(1, round(n * scale)) for n in (32, 64, 128, 256))
    flat = c3 * (height // 8) * (width // 8)
    if flat == 0:
        raise ValueError(f"kingma_cifar needs inputs of at least 8×8, got {height}×{width}")
    return nn.Sequential(
        method.conv2d(channels, c1, 5, "input", padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        method.conv2d(c1, c2, 5, "hidden", padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        method.conv2d(c2, c3, 3, "hidden", padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        method.linear(flat, hidden, "hidden"),
        nn.ReLU(),
        method.linear(hidden, num_classes, "output"),
    )
