"""Export a compressed model: shrunk dense files, a sparse file, ONNX and a report.

Files written by :func:`export_compressed` into an output directory:

- ``shrunk.pt`` — the shrunk network as a ``torch.export`` program: load with
  ``torch.export.load(open(path, "rb")).module()``, needs torch only (no
  vbdropout code);
- ``shrunk.safetensors`` — its weights with the architecture in the metadata;
  :func:`load_shrunk` rebuilds the plain ``nn.Sequential``;
- ``shrunk.onnx`` — when the ``onnx`` package is installed and the exporter can
  express the model (otherwise the report's ``onnx`` entry says why not);
- ``sparse.safetensors`` — the unshrunk pruned weights in CSR form
  (``crow_indices``, ``col_indices``, ``values`` per layer; convolutions as
  out × (in·kh·kw) matrices); :func:`load_sparse` runs sparse inference;
- ``report.json`` and ``report.md``.

Every model expects inputs normalized as ``(pixels / 255 − mean) / std``, with
the mean and std recorded in the report as ``input_normalization``.

A model that is not one supported ``Sequential`` (a user's network after
:func:`vbdropout.convert`) is exported the same way with its supported
``Sequential`` parts shrunk (see :mod:`.shrink`): the metadata then names those
parts, and :func:`load_shrunk`/:func:`load_sparse` need the model's own code
(``like=`` an instance of it, plain, converted or trained) to rebuild the rest;
``shrunk.pt`` and ``shrunk.onnx`` never need it. In ``sparse.safetensors``
the weights of plain Linear and zero-padded, ungrouped Conv2d layers are CSR
(``<layer>.weight.crow_indices/col_indices/values``, listed in the metadata);
all other state (other layers, normalization statistics) is stored dense under
its own key. Before anything is written, the shrunk model is checked to give
the masked model's outputs on a random input.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.deterministic import InputSelect, to_deterministic
from ..nn.geometry import is_plain_conv
from ..train.checkpoint import atomic_write_bytes, atomic_write_json
from .report import compression_report
from .shrink import fold_scales_with_parts, neurons_per_layer, shrink_with_parts

__all__ = ["export_compressed", "load_shrunk", "load_sparse", "macs"]


def _spec(network: nn.Sequential) -> list[dict[str, Any]]:
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


def _build(spec: list[dict[str, Any]]) -> nn.Sequential:
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


def _safetensors() -> Any:
    if find_spec("safetensors") is None:
        raise ImportError('exporting needs safetensors: pip install "vbdropout[export]"')
    import safetensors.torch

    return safetensors.torch


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of an exported safetensors file and its metadata."""
    tensors = _safetensors().load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tensors, f.metadata() or {}


def _architecture_metadata(model: nn.Module, parts: list[str]) -> dict[str, str]:
    if parts == [""]:  # the whole model is one plain Sequential
        return {"architecture": json.dumps(_spec(model))}
    specs = {name: _spec(model.get_submodule(name)) for name in parts}
    return {"parts": json.dumps(specs), "model_class": type(model).__qualname__}


def _skeleton(
    path: str | os.PathLike[str], metadata: dict[str, str], like: nn.Module | None
) -> nn.Module:
    """The exported model's module tree, without its trained values."""
    if "architecture" in metadata:
        return _build(json.loads(metadata["architecture"]))
    if "parts" not in metadata:
        raise ValueError(f"{path} holds no architecture: was it written by vbd compress?")
    if like is None:
        raise ValueError(
            f"{path} was exported from a custom model ({metadata.get('model_class', '?')}): "
            "pass like=<an instance of that model> to rebuild it"
        )
    skeleton = to_deterministic(like)
    for name, spec in json.loads(metadata["parts"]).items():
        _set_submodule(skeleton, name, _build(spec))
    return skeleton


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_shrunk(path: str | os.PathLike[str], like: nn.Module | None = None) -> nn.Module:
    """Rebuild the plain shrunk model from ``shrunk.safetensors``.

    like: for a model exported from custom code, an instance of that model.
    """
    tensors, metadata = _read(path)
    network = _skeleton(path, metadata, like)
    network.load_state_dict(tensors)
    return network.eval()


class SparseLinear(nn.Module):
    """y = W x + b with W stored as a CSR tensor."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch.sparse.mm(self.weight, flat.t()).t()
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class SparseConv2d(nn.Module):
    """A convolution as a CSR matrix product over unfolded input patches."""

    def __init__(self, weight: Tensor, bias: Tensor | None, spec: dict[str, Any]) -> None:
        super().__init__()
        self.weight, self.bias, self.spec = weight, bias, spec

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        k, stride, pad, dil = s["kernel_size"], s["stride"], s["padding"], s["dilation"]
        patches = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # (N, C·k·k, L)
        n, ckk, length = patches.shape
        y = torch.sparse.mm(self.weight, patches.transpose(0, 1).reshape(ckk, n * length))
        y = y.reshape(s["out"], n, length).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        h = (x.shape[2] + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // stride[0] + 1
        w = (x.shape[3] + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // stride[1] + 1
        return y.reshape(n, s["out"], h, w)


def _csr_layers(network: nn.Module) -> list[str]:
    """Names of the layers stored as CSR: plain Linear and zero-padded, ungrouped Conv2d."""
    return [
        name
        for name, m in network.named_modules()
        if type(m) is nn.Linear or (type(m) is nn.Conv2d and is_plain_conv(m))
    ]


def _sparse_tensors(network: nn.Module, csr_layers: list[str]) -> dict[str, Tensor]:
    """``<layer>.weight.{crow_indices,col_indices,values}`` per CSR layer; all other state as is."""
    tensors: dict[str, Tensor] = {}
    for name in csr_layers:
        weight = network.get_submodule(name).weight.detach()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()
        key = f"{name}.weight" if name else "weight"
        tensors[f"{key}.crow_indices"] = csr.crow_indices().to(torch.int32).contiguous()
        tensors[f"{key}.col_indices"] = csr.col_indices().to(torch.int32).contiguous()
        tensors[f"{key}.values"] = csr.values().contiguous()
    dense_weights = {f"{name}.weight" if name else "weight" for name in csr_layers}
    for key, value in network.state_dict().items():
        if key not in dense_weights:
            tensors[key] = value.detach().contiguous()
    return tensors


def load_sparse(path: str | os.PathLike[str], like: nn.Module | None = None) -> nn.Module:
    """A network running sparse (CSR) inference from ``sparse.safetensors``.

    like: for a model exported from custom code, an instance of that model.
    """
    tensors, metadata = _read(path)
    network = _skeleton(path, metadata, like)
    for name in json.loads(metadata.get("csr_layers", "[]")):
        module = network.get_submodule(name)
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise ValueError(
                f"{path}: layer {name!r} is stored as CSR but the model has a "
                f"{type(module).__name__} there"
            )
        key = f"{name}.weight" if name else "weight"
        s = _spec(nn.Sequential(module))[0]
        cols = s["in"] * (math.prod(s["kernel_size"]) if s["type"] == "conv2d" else 1)
        weight = torch.sparse_csr_tensor(
            tensors.pop(f"{key}.crow_indices"),
            tensors.pop(f"{key}.col_indices"),
            tensors.pop(f"{key}.values"),
            (s["out"], cols),
            check_invariants=True,  # the file may come from elsewhere
        )
        prefix = f"{name}." if name else ""
        bias = tensors.pop(f"{prefix}bias", None)
        if s["type"] == "linear":
            sparse: nn.Module = SparseLinear(weight, bias)
        else:
            sparse = SparseConv2d(weight, bias, s)
        if not name:
            return sparse.eval()
        _set_submodule(network, name, sparse)
    network.load_state_dict(tensors)
    return network.eval()


@torch.no_grad()
def macs(network: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply–accumulate operations of one forward pass (linear and conv layers; zeros count)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        else:
            total += output[0].numel() * module.weight[0].numel()

    handles = [
        m.register_forward_hook(hook)
        for m in network.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        network.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, _safetensors().save(tensors, metadata=metadata))


def _write_onnx(model: nn.Module, example: Tensor, path: Path) -> str | None:
    """Write ``model`` as ONNX; returns why not when onnx is missing or cannot express it."""
    if find_spec("onnx") is None:
        path.unlink(missing_ok=True)  # never leave a stale file from an earlier export
        return 'not written: pip install "vbdropout[export]" for ONNX'
    # a fresh file (O_EXCL), never a name someone could have planted as a symlink
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp's 0600 → the usual permissions
    os.close(fd)
    tmp = Path(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as err:  # the exporter raises many types for unsupported operators
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # never leave a stale file from an earlier export
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"shrunk.onnx not written: {first_line}", stacklevel=3)
        return f"not written: {first_line}"
    os.replace(tmp, path)
    return None


@torch.no_grad()
def _check_same_function(model: nn.Module, small: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse to export a shrunk model whose outputs differ from the masked model's."""
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    reference, got = model(x), small(x)
    scale = 1.0 + float(reference.abs().max())
    if got.shape != reference.shape or not torch.allclose(got, reference, atol=1e-4 * scale):
        raise ValueError(
            "shrinking changed the model's outputs on a random input (a layer that the "
            "shrink rules misread); nothing was written. Please report the model's structure."
        )


def export_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    input_shape: tuple[int, ...],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the files listed in the module docstring; returns the report.

    input_shape: one example's shape (e.g. ``(1, 28, 28)``), for tracing and MACs.
    mean, std: the input normalization the model was trained with (recorded only).
    """
    out = Path(out_dir)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it was
    dense, dense_parts = fold_scales_with_parts(model)
    small, small_parts = shrink_with_parts(model)
    example = torch.zeros(2, *input_shape)
    _check_same_function(model, small, input_shape)
    out.mkdir(parents=True, exist_ok=True)

    tensors = {k: v.contiguous() for k, v in small.state_dict().items()}
    _write_safetensors(
        out / "shrunk.safetensors", tensors, _architecture_metadata(small, small_parts)
    )
    csr_layers = _csr_layers(dense)
    _write_safetensors(
        out / "sparse.safetensors",
        _sparse_tensors(dense, csr_layers),
        {**_architecture_metadata(dense, dense_parts), "csr_layers": json.dumps(csr_layers)},
    )
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(small, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(out / "shrunk.pt", buffer.getvalue())
    files = ["shrunk.pt", "shrunk.safetensors", "sparse.safetensors"]
    onnx_problem = _write_onnx(small, example, out / "shrunk.onnx")
    if onnx_problem is None:
        files.append("shrunk.onnx")

    weights = compression_report(model)
    dense_params = sum(p.numel() for p in dense.parameters())
    small_params = sum(p.numel() for p in small.parameters())
    report = {
        "source": source or {},
        "input_normalization": {
            "mean": None if mean is None else list(mean),
            "std": None if std is None else list(std),
            "pixels": "scaled to [0, 1]",
        },
        "input_shape": list(input_shape),
        "shrunk_parts": "whole model" if small_parts == [""] else small_parts,
        "compression_ratio": weights.to_dict()["compression_ratio"],
        "sparsity_per_layer": weights.sparsity_per_layer(),
        "weights": weights.to_dict(),
        "neurons_per_layer": {
            "dense": neurons_per_layer(dense),
            "shrunk": neurons_per_layer(small),
        },
        "parameters": {"dense": dense_params, "shrunk": small_params},
        "macs": {"dense": macs(dense, input_shape), "shrunk": macs(small, input_shape)},
        "files": {name: (out / name).stat().st_size for name in files},
    }
    if onnx_problem is not None:
        report["onnx"] = onnx_problem
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", format_report(report).encode())
    return report


def _normalization_text(normalization: dict[str, Any]) -> str:
    mean, std = normalization["mean"], normalization["std"]
    if mean is None and std is None:
        return "not recorded (give --mean and --std)"
    return f"(x − {mean}) / {std} on pixels in [0, 1]"


def _parts_text(parts: str | list[str]) -> str:
    if isinstance(parts, str):
        return parts
    return ", ".join(f"`{p}`" for p in parts) if parts else "nothing (no supported Sequential part)"


def format_report(report: dict[str, Any]) -> str:
    """The export report as markdown."""
    n = {k: "-".join(map(str, v)) for k, v in report["neurons_per_layer"].items()}
    params, ops = report["parameters"], report["macs"]
    ratio = report["compression_ratio"]
    lines = [
        "# Compression report",
        "",
        f"- weight compression |W|/|W≠0|: {ratio:.1f}"
        if ratio
        else "- weight compression: all pruned",
        f"- sparsity per layer (%): {report['sparsity_per_layer']}",
        f"- neurons per layer: {n['dense']} → {n['shrunk']}",
        f"- parameters: {params['dense']} → {params['shrunk']}",
        f"- multiply–accumulates per example: {ops['dense']} → {ops['shrunk']}",
        f"- input normalization: {_normalization_text(report['input_normalization'])}",
        f"- shrunk: {_parts_text(report['shrunk_parts'])}",
        *([f"- shrunk.onnx: {report['onnx']}"] if "onnx" in report else []),
        "",
        "| file | bytes |",
        "|---|---|",
        *(f"| {name} | {size} |" for name, size in report["files"].items()),
    ]
    return "\n".join(lines) + "\n"
