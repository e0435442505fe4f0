"""Build a layer with the same geometry as an existing linear or convolutional one."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["layer_like"]

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
