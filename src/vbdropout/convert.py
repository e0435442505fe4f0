"""Turn any PyTorch model into a variational one, and back.

:func:`convert` replaces every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of a model —
at any depth: ``Sequential``, ``ModuleList``, ``ModuleDict``, custom blocks —
by the Gaussian-weight layer with the same geometry, keeping the trained weights
as θ and the biases. :func:`~vbdropout.nn.deterministic.to_deterministic` is the
inverse: plain layers holding the pruned posterior means.

>>> model = convert(my_convnet, method="vbd", skip=["classifier"])
>>> loss = elbo_loss(model(x), y, model, dataset_size=50_000)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .models.methods import METHODS, GaussianWeightMethod
from .nn.gaussian import GaussianWeight

__all__ = ["convert"]


def convert(
    model: nn.Module,
    method: str = "vbd",
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    inplace: bool = False,
    **layer_options: Any,
) -> nn.Module:
    """Replace the linear and convolutional layers of ``model`` by variational ones.

    method: ``vbd`` (hierarchical prior) or ``sparse_vd`` (log-uniform prior): the
        registered Gaussian-weight methods, whose ``twin`` makes each new layer.
    skip: qualified module names to leave alone (a name also skips everything
        below it, e.g. ``"classifier"``), or a predicate ``(name, module) -> bool``.
    inplace: modify ``model`` itself instead of a deep copy.
    layer_options: passed to every new layer (``threshold``, ``train_clip``,
        ``init_log_sigma2``, ``alpha_per``, …).
    """
    cls = METHODS.get(method)
    if cls is None or not issubclass(cls, GaussianWeightMethod):
        supported = sorted(n for n, c in METHODS.items() if issubclass(c, GaussianWeightMethod))
        raise ValueError(f"convert supports methods {supported}, got {method!r}")
    twins = cls()
    if "prior" in layer_options:
        raise ValueError("the prior comes from `method`; do not pass prior= as well")
    if callable(skip):
        skipped = skip
    else:
        names = list(skip)

        def skipped(name: str, module: nn.Module) -> bool:
            return any(name == n or name.startswith(n + ".") for n in names)

    target = model if inplace else copy.deepcopy(model)
    replaced = 0
    for name, module in list(target.named_modules()):
        if not name or isinstance(module, GaussianWeight) or skipped(name, module):
            continue
        new = twins.twin(module, **layer_options)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, new)  # also right for ModuleList/ModuleDict children
        replaced += 1
    if replaced == 0 and not isinstance(target, GaussianWeight):
        single = twins.twin(target, **layer_options)
        if single is not None and not skipped("", target):
            return single
    return target
