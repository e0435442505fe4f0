"""Networks of the paper, built with any method: ``build_model(name, method, ...)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from . import networks
from .methods import METHODS, Method, get_method

__all__ = ["METHODS", "MODELS", "Method", "build_model", "get_method"]

MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp_srivastava": networks.mlp_srivastava,
    "lenet300_100": networks.lenet300_100,
    "lenet500_300": networks.lenet500_300,
    "lenet5_caffe": networks.lenet5_caffe,
    "kingma_cifar": networks.kingma_cifar,
}


def build_model(
    name: str,
    method: str | Method = "vbd",
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    method_options: dict[str, Any] | None = None,
    **network_options: Any,
) -> nn.Module:
    """Build network ``name`` with the layers of ``method``.

    method_options go to the method (e.g. ``{"threshold": 3.0}``); network_options
    to the network (e.g. ``width=340`` for ``mlp_srivastava``). The result is the
    network (an ``nn.Sequential``) or, for methods that act on the whole network
    (``adversarial``), the method's wrapper around it (``Method.wrap``).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    resolved = get_method(method, **(method_options or {}))
    try:
        network = MODELS[name](resolved, tuple(input_shape), num_classes, **network_options)
    except TypeError as err:
        raise ValueError(f"bad options for model {name!r}: {err}") from None
    return resolved.wrap(network)
