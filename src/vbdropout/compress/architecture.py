"""The architecture of an exported model, stored in its safetensors metadata, and the
rebuilding of the model from it (:func:`load_shrunk`).

A plain ``nn.Sequential`` of supported layers is described whole (``architecture``);
a custom model by its shrunk ``Sequential`` parts (``parts``), which
:func:`skeleton` puts into a plain copy of the model given as ``like``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib.util import find_spec
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.deterministic import InputSelect, to_deterministic

__all__ = [
    "architecture_metadata",
    "floating_dtype",
    "load_shrunk",
    "read",
    "safetensors_module",
    "set_submodule",
    "skeleton",
    "spec",
]


def spec(network: nn.Sequential) -> list[dict[str, Any]]:
    """A JSON description of a plain sequential network, enough to rebuild it."""
    spec: list[dict[str, Any]] = []
    for m in network:
        if isinstance(m, nn.Linear):
            spec.append(
                {
                    "type": "linear",
                    "in": m.in_features,
                    "out": m.out_features,
                    "bias": m.bias is not None,
                }
            )
        elif isinstance(m, nn.Conv2d):
            spec.append(
                {
                    "type": "conv2d",
                    "in": m.in_channels,
                    "out": m.out_channels,
                    "kernel_size": list(m.kernel_size),
                    "stride": list(m.stride),
                    "padding": list(m.padding),
                    "dilation": list(m.dilation),
                    "bias": m.bias is not None,
                }
            )
        elif isinstance(m, nn.MaxPool2d):
            spec.append(
                {
                    "type": "maxpool2d",
                    **{k: getattr(m, k) for k in ("kernel_size", "stride", "padding", "dilation")},
                    "ceil_mode": m.ceil_mode,
                }
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            spec.append({"type": "adaptive_avgpool2d", "output_size": m.output_size})
        elif isinstance(m, nn.ReLU):
            spec.append({"type": "relu"})
        elif isinstance(m, nn.Flatten):
            spec.append({"type": "flatten"})
        elif isinstance(m, InputSelect):
            spec.append({"type": "input_select", "in": m.in_features, "kept": m.index.numel()})
        else:
            raise ValueError(f"cannot export layer {type(m).__name__}")
    return spec


def build(spec: list[dict[str, Any]]) -> nn.Sequential:
    """The plain ``nn.Sequential`` that :func:`spec` described (untrained values)."""
    layers: list[nn.Module] = []
    for s in spec:
        kind = s["type"]
        if kind == "linear":
            layers.append(nn.Linear(s["in"], s["out"], s["bias"]))
        elif kind == "conv2d":
            geometry = {k: tuple(s[k]) for k in ("stride", "padding", "dilation")}
            conv = nn.Conv2d(s["in"], s["out"], tuple(s["kernel_size"]), bias=s["bias"], **geometry)
            layers.append(conv)
        elif kind == "maxpool2d":
            geometry = {k: s.get(k, d) for k, d in (("padding", 0), ("dilation", 1))}
            pool = nn.MaxPool2d(
                s["kernel_size"], s["stride"], ceil_mode=s.get("ceil_mode", False), **geometry
            )
            layers.append(pool)
        elif kind == "adaptive_avgpool2d":
            size = s["output_size"]
            layers.append(nn.AdaptiveAvgPool2d(tuple(size) if isinstance(size, list) else size))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "flatten":
            layers.append(nn.Flatten())
        elif kind == "input_select":
            layers.append(InputSelect(torch.zeros(s["kept"], dtype=torch.long), s["in"]))
        else:
            raise ValueError(f"unknown layer type {kind!r} in the exported architecture")
    return nn.Sequential(*layers)


def safetensors_module() -> Any:
    """The safetensors.torch module (an ImportError naming the extra when it is missing)."""
    if find_spec("safetensors") is None:
        raise ImportError('exporting needs safetensors: pip install "vbdropout[export]"')
    import safetensors.torch

    return safetensors.torch


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of an exported safetensors file and its metadata."""
    tensors = safetensors_module().load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tensors, f.metadata() or {}


def floating_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor (float32 when there is none): the
    precision a model computes in, kept by export and loading."""
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def architecture_metadata(model: nn.Module, parts: list[str]) -> dict[str, str]:
    """The metadata entries that describe ``model``: the whole of it, or its ``parts``."""
    if parts == [""]:  # the whole model is one plain Sequential
        return {"architecture": json.dumps(spec(model))}
    specs = {name: spec(model.get_submodule(name)) for name in parts}
    return {"parts": json.dumps(specs), "model_class": type(model).__qualname__}


def skeleton(
    path: str | os.PathLike[str], metadata: dict[str, str], like: nn.Module | None
) -> nn.Module:
    """The exported model's module tree, without its trained values."""
    if "architecture" in metadata:
        return build(json.loads(metadata["architecture"]))
    if "parts" not in metadata:
        raise ValueError(f"{path} holds no architecture: was it written by vbd compress?")
    if like is None:
        raise ValueError(
            f"{path} was exported from a custom model ({metadata.get('model_class', '?')}): "
            "pass like=<an instance of that model> to rebuild it"
        )
    skeleton = to_deterministic(like)
    for name, spec in json.loads(metadata["parts"]).items():
        set_submodule(skeleton, name, build(spec))
    return skeleton


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` in ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_shrunk(path: str | os.PathLike[str], like: nn.Module | None = None) -> nn.Module:
    """Rebuild the plain shrunk model from ``shrunk.safetensors``.

    like: for a model exported from custom code, an instance of that model.
    """
    tensors, metadata = read(path)
    network = skeleton(path, metadata, like).to(floating_dtype(tensors.values()))
    network.load_state_dict(tensors)
    return network.eval()
