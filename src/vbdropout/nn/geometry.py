"""The layer kinds vbdropout handles, and a layer built with another one's geometry.

One table for everything that walks a model's weight layers (the compression
report, shrinking, export, loading initial weights): :data:`WEIGHT_LAYERS` are
the layers whose ``weight`` counts, :func:`is_plain_conv` says whether a
convolution has the geometry the shrinking and the exporters' sparse formats
take (one group, zero padding given as numbers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WEIGHT_LAYERS", "conv_forward", "is_plain_conv", "layer_like"]

#: The layers whose ``weight`` is a network weight (and subclasses: the vbdropout layers).
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def is_plain_conv(module: nn.modules.conv._ConvNd) -> bool:
    """One group and zero padding given as numbers (not ``"same"``/``"valid"``)."""
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


_PLAIN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def layer_like(module: nn.Module, cls: type[nn.Module] | None = None, **options: Any) -> nn.Module:
    """A new ``cls`` with the features or channels, kernel, stride, padding, dilation,
    groups, bias, device and dtype of ``module`` (an ``nn.Linear`` or ``nn.ConvNd``,
    or a subclass). ``cls`` defaults to the plain torch class; ``options`` go to it."""
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    bias = module.bias is not None
    if isinstance(module, nn.modules.conv._ConvNd):
        cls = cls or _PLAIN_CONV[len(module.kernel_size)]
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias,
            padding_mode=module.padding_mode,
            **factory,
            **options,
        )
    if isinstance(module, nn.Linear):
        return (cls or nn.Linear)(
            module.in_features, module.out_features, bias, **factory, **options
        )
    raise TypeError(
        f"layer_like needs a linear or convolutional layer, got {type(module).__name__}"
    )


def conv_forward(
    module: nn.modules.conv._ConvNd, x: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """``module``'s convolution of ``x`` with ``weight`` and ``bias``, also when a side has
    no channels (a shrunk layer), which torch refuses (no output channels) or gets wrong
    (no input channels: it returns no output channels, not the bias). There the empty
    side gets one zero channel per group, cut off afterwards."""
    if weight.shape[0] and weight.shape[1]:
        return module._conv_forward(x, weight, bias)  # type: ignore[operator]
    groups = module.groups
    channel = x.dim() - weight.dim() + 1  # 1 for a batch, 0 for one example
    if weight.shape[1] == 0:
        shape = list(x.shape)
        shape[channel] = groups
        x = torch.cat([x, x.new_zeros(shape)], channel)
        weight = torch.cat([weight, weight.new_zeros((weight.shape[0], 1, *weight.shape[2:]))], 1)
    if weight.shape[0] == 0:
        weight = torch.cat([weight, weight.new_zeros((groups, *weight.shape[1:]))])
        return module._conv_forward(x, weight, None).narrow(channel, 0, 0)  # type: ignore[operator]
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]
