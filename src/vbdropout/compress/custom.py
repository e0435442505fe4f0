"""Load a user's own (converted) model for export: its code from a factory, its values from a file.

``vbd compress model.pt --factory mypackage.nets:make_model`` imports
``make_model`` (the current directory is searched first, as ``python -m``
does), calls it without arguments to get the model skeleton — with the same
:func:`vbdropout.convert` call as in training — and loads the trained values
from ``model.pt``: a ``state_dict`` saved with ``torch.save``, or a checkpoint
dict holding one under ``"model"`` or ``"state_dict"``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from torch import Tensor, nn

from ..io import CheckpointError, load_checkpoint

__all__ = ["load_custom_model"]


def _import_factory(spec: str):
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--factory must look like 'package.module:function', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {module_name!r} for --factory {spec}: {err}") from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--factory {spec} is not callable")
    return factory


def _state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    state = load_checkpoint(path, required=())
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds no state_dict (expected torch.save(model.state_dict()), or a dict "
            "with one under 'model' or 'state_dict')"
        )
    return state


def load_custom_model(checkpoint: str | os.PathLike[str], factory: str) -> nn.Module:
    """The model that ``factory`` builds, with the values stored in ``checkpoint``."""
    if Path(checkpoint).is_dir():
        raise ValueError(f"{checkpoint} is a directory: with --factory give the state_dict file")
    model = _import_factory(factory)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--factory {factory} returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(_state_dict(checkpoint))
    except RuntimeError as err:
        raise CheckpointError(
            f"{checkpoint} does not fit the model of --factory {factory}: {err}"
        ) from None
    return model.eval()
