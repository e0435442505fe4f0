"""The method contract and its one registry.

A :class:`Method` builds a network's weight layers (``linear``/``conv2d``),
may wrap the finished network (``wrap``), declares the settings it takes from a
training run (``run_options``, built by :meth:`Method.from_run`) and runs its
training events after every epoch (:meth:`Method.epoch_end`). A method class
enters :data:`METHODS` with :func:`register`; :func:`method_class` is the one
lookup by name that the CLI, the config and :func:`get_method` use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from torch import nn

from ...nn.base import check_dataset_size
from ...nn.epoch_hooks import epoch_end

__all__ = [
    "METHODS",
    "RUN_OPTIONS",
    "Method",
    "Position",
    "get_method",
    "method_class",
    "register",
]

Position = Literal["input", "hidden", "output"]

RUN_OPTIONS: dict[str, str] = {
    "log_alpha_threshold": "weight layers: a weight is pruned when its log α exceeds this",
    "unit_threshold": "unit-noise layers: a unit is kept while its log α is at most this",
    "train_clip": "pruned weights or units are also dropped in training",
    "dataset_size": "N, the number of training examples",
}
"""The settings a training run can hand to a method, by the option name the method takes."""

METHODS: dict[str, type[Method]] = {}
"""Every method class by name, in the order they were registered."""

MethodClass = TypeVar("MethodClass", bound="type[Method]")


def register(cls: MethodClass) -> MethodClass:
    """Class decorator: enter ``cls`` into :data:`METHODS` under ``cls.name``."""
    unknown = sorted(set(cls.run_options) - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(f"method {cls.name!r} declares unknown run options {unknown}")
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method class called ``name``, else a ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def get_method(method: str | Method, **options: Any) -> Method:
    """A :class:`Method` from its name and options (e.g. ``log_alpha_threshold`` for vbd)."""
    if isinstance(method, Method):
        if options:
            raise ValueError("options can only be given with a method name")
        return method
    cls = method_class(method)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"bad options for method {method!r}: {err}") from None


class Method:
    """Builds the weight layers of a network for one regularization method.

    ``position`` tells a layer's place: ``input`` (reads the network input),
    ``hidden`` or ``output`` (the classifier); methods that drop inputs use it
    to pick their rate.

    ``run_options`` declares which settings of a training run the method takes as
    constructor options of the same name (see :data:`RUN_OPTIONS`); a run passes
    exactly those (:meth:`from_run`), so no run setting reaches a method that means
    something else by the name.

    ``no_replicas_reason``: why the method's training step cannot be batched over
    replicas (``vbd train --replicas``, :mod:`vbdropout.train.replicas`); ``None`` when
    it can: its forward pass and objective are pure functions of the parameters,
    buffers and batch (no host reads, no state changed during a step).

    ``no_compile_reason``: why the method's training step is not compiled (``vbd train
    --compile``, :mod:`vbdropout.train.compiled`); ``None`` when its forward pass traces
    as one graph (what CUDA graphs need) that later steps do not retrace.
    """

    name: ClassVar[str]
    run_options: ClassVar[tuple[str, ...]] = ()
    no_replicas_reason: ClassVar[str | None] = None
    no_compile_reason: ClassVar[str | None] = None

    @classmethod
    def from_run(cls, run: Mapping[str, Any]) -> Method:
        """The method with the run settings it declares (``run`` maps :data:`RUN_OPTIONS`)."""
        return cls(**{key: run[key] for key in cls.run_options})

    def linear(self, in_features: int, out_features: int, position: Position) -> nn.Module:
        raise NotImplementedError

    def conv2d(
        self, in_channels: int, out_channels: int, kernel_size: int, position: Position, **kw: Any
    ) -> nn.Module:
        raise NotImplementedError

    def wrap(self, network: nn.Module) -> nn.Module:
        """What :func:`~vbdropout.models.build_model` returns; the network itself by default."""
        return network

    def epoch_end(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """The method's training events after epoch ``epoch`` (from 0) of ``epochs``.

        Every training loop calls it once after each epoch's optimizer steps; by
        default it runs the layers' ``on_epoch_end`` hooks
        (:func:`~vbdropout.nn.epoch_hooks.epoch_end`).
        """
        epoch_end(model, epoch, epochs)

    def require_dataset_size(self, dataset_size: int | None, term: str | None = None) -> int:
        """``dataset_size`` validated, with a message naming the method when it is missing."""
        need = f" for its {term}" if term else ""
        missing = (
            f"method {self.name!r} needs the option dataset_size (N, the number of training "
            f"examples){need}, e.g. method_options={{'dataset_size': 60000}}"
        )
        checked = check_dataset_size(dataset_size, missing=missing)
        assert checked is not None
        return checked

    def __repr__(self) -> str:
        options = getattr(self, "options", {})
        args = ", ".join(f"{k}={v!r}" for k, v in options.items())
        return f"{type(self).__name__}({args})"


def weights_per_input_unit(layer: nn.Linear | nn.Conv2d) -> int:
    """How many weights of ``layer`` one input unit (feature or channel) multiplies."""
    weight = layer.weight
    return weight.shape[0] * math.prod(weight.shape[2:])
