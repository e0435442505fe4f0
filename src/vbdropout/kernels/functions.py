"""Autograd functions over the fused CPU kernels (each differentiable once).

Callers check :func:`~vbdropout.kernels.supports` first and otherwise run
their eager PyTorch versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .build import require

__all__ = ["ConvGeometry", "KLSpec", "gaussian_training_forward", "kl_sum", "lrt_sample"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _draw_seed() -> Tensor:
    """A 63-bit seed from torch's default CPU generator (follows ``torch.manual_seed``),
    as a tensor: no conversion to a Python int, which would break torch.compile graphs."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


def _like(reference: Tensor, t: Tensor) -> Tensor:
    """``t`` with ``reference``'s strides (a copy only when they differ)."""
    return t if t.stride() == reference.stride() else torch.empty_like(reference).copy_(t)


class _LRTSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mean: Tensor, var: Tensor, eps: float) -> Tensor:
        out, dvar = torch.ops.vbdropout.lrt_sample(mean, var, _draw_seed(), eps)
        ctx.save_for_backward(dvar)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (dvar,) = ctx.saved_tensors
        grad_var = grad * dvar if ctx.needs_input_grad[1] else None
        return grad if ctx.needs_input_grad[0] else None, grad_var, None


def lrt_sample(mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """b = μ + sqrt(v + ε)·z, z ~ N(0, 1) per element; ``mean`` and ``var`` share strides."""
    require()
    return _LRTSample.apply(mean, var, eps)


KLSpec = tuple[int, tuple[float, ...]]
"""A prior's KL in the kernels: (id, constants), 0 = hierarchical (no constants),
1 = log-uniform (k1, k2, k3, low, high); see ``Prior.kernel_spec``."""


class _KLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: Tensor, log_sigma2: Tensor, spec: KLSpec) -> Tensor:
        ctx.save_for_backward(theta, log_sigma2)
        ctx.spec = spec
        return torch.ops.vbdropout.kl_sum(theta, log_sigma2, spec[0], list(spec[1]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        theta, log_sigma2 = ctx.saved_tensors
        grad_theta, grad_log_sigma2 = torch.ops.vbdropout.kl_sum_backward(
            theta, log_sigma2, ctx.spec[0], list(ctx.spec[1]), grad
        )
        return (
            grad_theta if ctx.needs_input_grad[0] else None,
            grad_log_sigma2 if ctx.needs_input_grad[1] else None,
            None,
        )


def kl_sum(theta: Tensor, log_sigma2: Tensor, spec: KLSpec) -> Tensor:
    """Σ KL over the weights of the prior ``spec``; ``theta`` and ``log_sigma2`` share strides."""
    require()
    return _KLSum.apply(theta, log_sigma2, spec)


@dataclass(frozen=True)
class ConvGeometry:
    """A zero-padded convolution's stride, padding and dilation (one int per spatial
    dimension) and groups."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = _CONV[len(self.stride)]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self, grad: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Gradients of :meth:`apply` for the input, the weight and the bias."""
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if need_bias else None,
            self.stride, self.padding, self.dilation, False, [0] * len(self.stride),
            self.groups, [need_input, True, need_bias],
        )  # fmt: skip


def _linear_apply(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.mm(weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_bias: bool
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    return (
        grad.mm(weight) if need_input else None,
        grad.t().mm(x),
        grad.sum(0) if need_bias else None,
    )


class _GaussianTrainingForward(torch.autograd.Function):
    """The LRT forward of a layer with q(w) = N(θ, σ²), σ² = exp(log σ²), in one node.

    b = x·θ + bias + sqrt(x²·σ² + ε)·z ("·" a matrix product or a convolution).
    The second output is the KL of the prior ``spec``, computed in the same pass
    as σ² (a constant zero when ``spec`` is ``None``). Backward: with
    g_v = ∂L/∂b · z/(2·sqrt(v + ε)), ∂L/∂x = ∂L/∂b·θᵀ + 2x·(g_v·σ²ᵀ),
    ∂L/∂θ = xᵀ·∂L/∂b + g·∂KL/∂θ, ∂L/∂log σ² = ((x²)ᵀ·g_v) ⊙ σ² + g·∂KL/∂log σ²
    (g the KL's gradient), the last two in one pass (``weight_grads_``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        theta: Tensor,
        log_sigma2: Tensor,
        bias: Tensor | None,
        geometry: ConvGeometry | None,
        eps: float,
        spec: KLSpec | None,
    ) -> tuple[Tensor, Tensor]:
        if spec is None:
            sigma2, kl = log_sigma2.exp(), theta.new_zeros(())
            ctx.mark_non_differentiable(kl)
        else:
            sigma2, kl = torch.ops.vbdropout.sigma2_and_kl(
                theta, log_sigma2, spec[0], list(spec[1])
            )
        apply = _linear_apply if geometry is None else geometry.apply
        x2 = x * x
        mean = apply(x, theta, bias)
        var = _like(mean, apply(x2, sigma2, None))
        out, dvar = torch.ops.vbdropout.lrt_sample(mean, var, _draw_seed(), eps)
        ctx.save_for_backward(x, x2, theta, log_sigma2, sigma2, dvar)
        ctx.geometry, ctx.spec, ctx.has_bias = geometry, spec, bias is not None
        return out, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        ctx.backward_ran = True  # tells a layer's kl() not to hand out this graph's KL again
        x, x2, theta, log_sigma2, sigma2, dvar = ctx.saved_tensors
        backward = _linear_backward if ctx.geometry is None else ctx.geometry.backward
        need_input = ctx.needs_input_grad[0]
        grad_var = grad * dvar
        grad_x, grad_theta, grad_bias = backward(grad, x, theta, need_input, ctx.has_bias)
        grad_x_var, grad_sigma2, _ = backward(grad_var, x2, sigma2, need_input, False)
        grad_theta, grad_sigma2 = _like(theta, grad_theta), _like(theta, grad_sigma2)
        if ctx.spec is None:
            grad_sigma2.mul_(sigma2)  # now ∂L/∂log σ²
        else:
            torch.ops.vbdropout.weight_grads_(
                theta, log_sigma2, sigma2, grad_theta, grad_sigma2,
                ctx.spec[0], list(ctx.spec[1]), grad_kl,
            )  # fmt: skip
        if need_input:
            grad_x = grad_x.addcmul_(x, grad_x_var, value=2.0)
        return grad_x, grad_theta, grad_sigma2, grad_bias, None, None, None


def gaussian_training_forward(
    x: Tensor,
    theta: Tensor,
    log_sigma2: Tensor,
    bias: Tensor | None,
    geometry: ConvGeometry | None,
    eps: float,
    spec: KLSpec | None,
) -> tuple[Tensor, Tensor]:
    """(LRT sample, KL) of a linear (``geometry=None``, inputs of any shape (…, in))
    or convolutional layer; see :class:`_GaussianTrainingForward`."""
    require()
    if geometry is not None:
        return _GaussianTrainingForward.apply(x, theta, log_sigma2, bias, geometry, eps, spec)
    flat = x.reshape(-1, x.shape[-1])
    out, kl = _GaussianTrainingForward.apply(flat, theta, log_sigma2, bias, None, eps, spec)
    return out.reshape(*x.shape[:-1], theta.shape[0]), kl
