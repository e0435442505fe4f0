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
the masked model's outputs on a random input. The files are written into a
hidden staging folder inside the output directory and renamed into place only
when all of them are written, the report last: a failed export leaves the
directory as it was (a killed one may leave its ``.export.*`` folder behind).

Each file is written by one function registered with :func:`exporter` (in
:data:`EXPORTERS`): a new format is one more such function.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    move_into,
    new_folders,
    remove_if_empty,
)
from ..nn.deterministic import to_deterministic
from ..nn.prunable import Threshold
from .architecture import (
    architecture_metadata,
    floating_dtype,
    load_shrunk,
    safetensors_module,
)
from .report import CompressionReport, compression_report
from .shrink import fold_scales_with_parts, neurons_per_layer, shrink_with_parts
from .sparse import csr_layers, load_sparse, sparse_tensors

__all__ = [
    "EXPORTERS",
    "Compressed",
    "export_compressed",
    "exporter",
    "format_report",
    "load_shrunk",
    "load_sparse",
    "macs",
]


@dataclass(frozen=True)
class Compressed:
    """A model ready to be written: its weight counts and the two forms that are exported."""

    weights: CompressionReport  # of the masked model, at the export's thresholds
    dense: nn.Module  # its noise scales folded into the weights; pruned weights are zeros
    dense_parts: list[str]  # the names of its plain Sequential parts ([""]: the whole model)
    small: nn.Module  # pruned units and channels removed
    small_parts: list[str]
    input_shape: tuple[int, ...]  # one example's shape

    @property
    def example(self) -> Tensor:
        """A batch of two zero inputs in the model's precision, for tracing."""
        return torch.zeros(
            2, *self.input_shape, dtype=floating_dtype(self.small.state_dict().values())
        )


# Writes one export file to the given path; returns None, or why it was not written.
Writer = Callable[[Compressed, Path], str | None]


@dataclass(frozen=True)
class Exporter:
    """How one export file is written. ``skippable``: the report key that says why the
    file was not written, for a format that may be skipped (its writer returns the reason)."""

    write: Writer
    skippable: str | None = None


# The export files by name, in the order they are written and listed in the report.
EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str, skippable: str | None = None) -> Callable[[Writer], Writer]:
    """Register the decorated function as the writer of the export file ``name``."""

    def register(write: Writer) -> Writer:
        EXPORTERS[name] = Exporter(write, skippable)
        return write

    return register


@exporter("shrunk.pt")
def _write_program(c: Compressed, path: Path) -> None:
    """The shrunk network as a ``torch.export`` program with a dynamic batch size."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(c.small, (c.example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@exporter("shrunk.safetensors")
def _write_shrunk(c: Compressed, path: Path) -> None:
    """The shrunk network's weights, with its architecture in the metadata."""
    tensors = {k: v.contiguous() for k, v in c.small.state_dict().items()}
    _write_safetensors(path, tensors, architecture_metadata(c.small, c.small_parts))


@exporter("sparse.safetensors")
def _write_sparse(c: Compressed, path: Path) -> None:
    """The unshrunk pruned weights in CSR form (see :mod:`.sparse`)."""
    layers = csr_layers(c.dense)
    metadata = architecture_metadata(c.dense, c.dense_parts)
    metadata["csr_layers"] = json.dumps(layers)
    _write_safetensors(path, sparse_tensors(c.dense, layers), metadata)


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` as a safetensors file, atomically."""
    atomic_write_bytes(path, safetensors_module().save(tensors, metadata=metadata))


@exporter("shrunk.onnx", skippable="onnx")
def _write_onnx(c: Compressed, path: Path) -> str | None:
    """The shrunk network as ONNX; returns why not when onnx is missing or cannot express it."""
    if find_spec("onnx") is None:
        return 'not written: pip install "vbdropout[export]" for ONNX'
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                c.small,
                (c.example,),
                str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as err:  # the exporter raises many types for unsupported operators
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"shrunk.onnx not written: {first_line}", stacklevel=3)
        return f"not written: {first_line}"
    return None


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
        dtype = floating_dtype(network.state_dict().values())
        network.eval()(torch.zeros(1, *input_shape, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def _check_same_function(model: nn.Module, small: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse to export a shrunk model whose outputs differ from the masked model's.

    Both are compared in float64 (on copies), so that the check is of the shrink rules
    whatever precision the model computes in."""
    x = torch.randn(
        4, *input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    reference, got = copy.deepcopy(model).double()(x), copy.deepcopy(small).double()(x)
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
    *,
    log_alpha_threshold: Threshold = "own",
    unit_threshold: Threshold = "own",
) -> dict[str, Any]:
    """Write the files listed in the module docstring; returns the report.

    input_shape: one example's shape (e.g. ``(1, 28, 28)``), for tracing and MACs.
    mean, std: the input normalization the model was trained with (recorded only).
    log_alpha_threshold, unit_threshold: where to cut the weights and the structured
    units (``"own"``: each layer's own cut; see :mod:`~vbdropout.nn.prunable`).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot export into {out}: it is a file, not a folder")
    thresholds = {"log_alpha_threshold": log_alpha_threshold, "unit_threshold": unit_threshold}
    compressed = _compress(model, input_shape, thresholds)
    created = new_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".export.") as staging:
            report = _write_files(compressed, Path(staging), mean, std, source)
            move_into(out, Path(staging), report["files"])
            for name in EXPORTERS.keys() - report["files"].keys():
                (out / name).unlink(missing_ok=True)  # never leave a stale file from before
            move_into(out, Path(staging), ["report.md", "report.json"])
    except BaseException:
        remove_if_empty(created)
        raise
    return report


def _write_files(
    c: Compressed,
    folder: Path,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write every export file and the report into ``folder``; returns the report."""
    files: dict[str, int] = {}
    skipped: dict[str, str] = {}  # the skippable files not written: why
    for name, export in EXPORTERS.items():
        why = export.write(c, folder / name)
        if why is None:
            files[name] = (folder / name).stat().st_size
        elif export.skippable is None:
            raise RuntimeError(f"the writer of {name} skipped it ({why}) but may not skip it")
        else:
            skipped[export.skippable] = why
    report = _report(c, mean, std, source) | {"files": files, **skipped}
    atomic_write_json(folder / "report.json", report)
    atomic_write_bytes(folder / "report.md", format_report(report).encode())
    return report


def _compress(
    model: nn.Module, input_shape: tuple[int, ...], thresholds: dict[str, Threshold]
) -> Compressed:
    """``model``'s dense and shrunk forms at ``thresholds``, checked to compute what the
    model pruned at them computes."""
    weights = compression_report(model, **thresholds)  # validates the thresholds first
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where it was
    dense, dense_parts = fold_scales_with_parts(model, **thresholds)
    small, small_parts = shrink_with_parts(model, **thresholds)
    _check_same_function(to_deterministic(model, **thresholds), small, input_shape)
    return Compressed(weights, dense, dense_parts, small, small_parts, tuple(input_shape))


def _report(
    c: Compressed,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's entries about the model (all but the files)."""
    weights = c.weights
    return {
        "source": source or {},
        "input_normalization": {
            "mean": None if mean is None else list(mean),
            "std": None if std is None else list(std),
            "pixels": "scaled to [0, 1]",
        },
        "input_shape": list(c.input_shape),
        "shrunk_parts": "whole model" if c.small_parts == [""] else c.small_parts,
        "compression_ratio": weights.to_dict()["compression_ratio"],
        "sparsity_per_layer": weights.sparsity_per_layer(),
        "weights": weights.to_dict(),
        "neurons_per_layer": {
            "dense": neurons_per_layer(c.dense),
            "shrunk": neurons_per_layer(c.small),
        },
        "parameters": {
            "dense": sum(p.numel() for p in c.dense.parameters()),
            "shrunk": sum(p.numel() for p in c.small.parameters()),
        },
        "macs": {"dense": macs(c.dense, c.input_shape), "shrunk": macs(c.small, c.input_shape)},
    }


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
        *(
            f"- {name}: {report[e.skippable]}"
            for name, e in EXPORTERS.items()
            if e.skippable is not None and e.skippable in report
        ),
        "",
        "| file | bytes |",
        "|---|---|",
        *(f"| {name} | {size} |" for name, size in report["files"].items()),
    ]
    return "\n".join(lines) + "\n"
