"""The layer kinds vbdropout handles, and a layer built with another one's geometry.

One table for everything that walks a model's weight layers (the compression
report, shrinking, export, loading initial weights): :data:`WEIGHT_LAYERS` are
the layers whose ``weight`` counts, :func:`is_plain_conv` says whether a
convolution has the geometry the shrinking and the exporters' sparse formats
take (one group, zero padding given as numbers).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["WEIGHT_LAYERS", "is_plain_conv", "layer_like"]

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
