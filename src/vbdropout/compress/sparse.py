"""Sparse export: pruned weights as CSR matrices (``sparse.safetensors``) and the network
that runs sparse inference from them (:func:`load_sparse`).

The weights of plain Linear and zero-padded, ungrouped Conv2d layers are stored as
``<layer>.weight.crow_indices/col_indices/values`` (convolutions as out × (in·kh·kw)
matrices) and listed in the metadata's ``csr_layers``; all other state is dense under
its own key.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.geometry import is_plain_conv
from .architecture import floating_dtype, read, set_submodule, skeleton, spec

__all__ = ["SparseConv2d", "SparseLinear", "csr_layers", "load_sparse", "sparse_tensors"]


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


def csr_layers(network: nn.Module) -> list[str]:
    """Names of the layers stored as CSR: plain Linear and zero-padded, ungrouped Conv2d."""
    return [
        name
        for name, m in network.named_modules()
        if type(m) is nn.Linear or (type(m) is nn.Conv2d and is_plain_conv(m))
    ]


def sparse_tensors(network: nn.Module, csr_layers: list[str]) -> dict[str, Tensor]:
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
    """A network running sparse (CSR) inference from ``sparse.safetensors``, in the
    file's precision; a bfloat16 or float16 file in float32 (torch's CPU CSR product has
    no kernel for them).

    like: for a model exported from custom code, an instance of that model.
    """
    tensors, metadata = read(path)
    dtype = floating_dtype(tensors.values())
    if dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    network = skeleton(path, metadata, like).to(dtype)
    for name in json.loads(metadata.get("csr_layers", "[]")):
        module = network.get_submodule(name)
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise ValueError(
                f"{path}: layer {name!r} is stored as CSR but the model has a "
                f"{type(module).__name__} there"
            )
        key = f"{name}.weight" if name else "weight"
        s = spec(nn.Sequential(module))[0]
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
        set_submodule(network, name, sparse)
    network.load_state_dict(tensors)
    return network.eval()
