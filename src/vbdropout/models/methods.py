"""Where dropout goes: each method says how to build a network's weight layers.

A network (see :mod:`vbdropout.models.networks`) asks its method for every
weight layer with ``method.linear(...)`` / ``method.conv2d(...)``; the method
returns the plain torch layer, a variational layer, or a noise module followed
by the layer. Adding a method is one small class plus a registry entry: no
network is copied.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import nn

from ..nn.gaussian import Conv2dVBD, LinearVBD

__all__ = ["METHODS", "GaussianWeightMethod", "Method", "NoDropout", "get_method"]

Position = Literal["input", "hidden", "output"]


class Method:
    """Builds the weight layers of a network for one regularization method.

    ``position`` tells a layer's place: ``input`` (reads the network input),
    ``hidden`` or ``output`` (the classifier); methods that drop inputs use it
    to pick their rate.
    """

    name: ClassVar[str]

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        raise NotImplementedError

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoDropout(Method):
    """Plain torch layers: the no-dropout baseline."""

    name = "none"

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return nn.Linear(in_features, out_features)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size, **kw)


class GaussianWeightMethod(Method):
    """A Gaussian posterior on every weight; the prior is what defines the method."""

    prior: ClassVar[str]

    def __init__(self, threshold: float | None = 3.0, train_clip: bool = False) -> None:
        self.options = {"prior": self.prior, "threshold": threshold, "train_clip": train_clip}

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        return LinearVBD(in_features, out_features, **self.options)

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        return Conv2dVBD(in_channels, out_channels, kernel_size, **kw, **self.options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "prior")
        return f"{type(self).__name__}({args})"


class VBD(GaussianWeightMethod):
    """Variational Bayesian dropout (this paper): hierarchical prior, KL = ½·log(1 + 1/α)."""

    name = "vbd"
    prior = "hierarchical"


class SparseVD(GaussianWeightMethod):
    """Sparse variational dropout (Molchanov et al. 2017): log-uniform prior."""

    name = "sparse_vd"
    prior = "log_uniform"


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NoDropout, VBD, SparseVD)}


def get_method(method: str | Method, **options: Any) -> Method:
    """A :class:`Method` from its name and options (e.g. ``threshold`` for vbd)."""
    if isinstance(method, Method):
        if options:
            raise ValueError("options can only be given with a method name")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    try:
        return METHODS[method](**options)
    except TypeError as err:
        raise ValueError(f"bad options for method {method!r}: {err}") from None
