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

from .nn.gaussian import Conv1dVBD, Conv2dVBD, Conv3dVBD, GaussianWeight, LinearVBD
from .nn.geometry import layer_like

__all__ = ["convert"]

_PRIORS = {"vbd": "hierarchical", "sparse_vd": "log_uniform"}
_CONV = {nn.Conv1d: Conv1dVBD, nn.Conv2d: Conv2dVBD, nn.Conv3d: Conv3dVBD}


def _variational(module: nn.Module, options: dict[str, Any]) -> nn.Module | None:
    """The variational twin of a plain layer (weights copied), or None if unsupported."""
    cls = LinearVBD if type(module) is nn.Linear else _CONV.get(type(module))
    if cls is None:
        return None
    new = layer_like(module, cls, **options)
    new.load_state_dict(module.state_dict())
    return new.train(module.training)


def convert(
    model: nn.Module,
    method: str = "vbd",
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    inplace: bool = False,
    **layer_options: Any,
) -> nn.Module:
    """Replace the linear and convolutional layers of ``model`` by variational ones.

    method: ``vbd`` (hierarchical prior) or ``sparse_vd`` (log-uniform prior).
    skip: qualified module names to leave alone (a name also skips everything
        below it, e.g. ``"classifier"``), or a predicate ``(name, module) -> bool``.
    inplace: modify ``model`` itself instead of a deep copy.
    layer_options: passed to every new layer (``threshold``, ``train_clip``,
        ``init_log_sigma2``, ``alpha_per``, …).
    """
    if method not in _PRIORS:
        raise ValueError(f"convert supports methods {sorted(_PRIORS)}, got {method!r}")
    if "prior" in layer_options:
        raise ValueError("the prior comes from `method`; do not pass prior= as well")
    if callable(skip):
        skipped = skip
    else:
        names = list(skip)

        def skipped(name: str, module: nn.Module) -> bool:
            return any(name == n or name.startswith(n + ".") for n in names)

    target = model if inplace else copy.deepcopy(model)
    options = {"prior": _PRIORS[method], **layer_options}
    replaced = 0
    for name, module in list(target.named_modules()):
        if not name or isinstance(module, GaussianWeight) or skipped(name, module):
            continue
        new = _variational(module, options)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, new)  # also right for ModuleList/ModuleDict children
        replaced += 1
    if replaced == 0 and not isinstance(target, GaussianWeight):
        single = _variational(target, options)
        if single is not None and not skipped("", target):
            return single
    return target
