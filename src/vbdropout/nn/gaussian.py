"""Linear and convolutional layers with a Gaussian posterior on every weight.

q(w) = N(θ, αθ²) = N(θ, σ²). One layer class serves VBD, sparse VD and
Kingma's VD; the method is the prior (:mod:`vbdropout.priors`) and how α is
shared:

- ``alpha_per="weight"`` — the additive reparameterization of Molchanov et al.
  (2017): parameters ``weight`` (θ) and ``log_sigma2`` (log σ²), so that the
  gradient of θ carries no noise from α; α = σ²/θ².
- ``alpha_per="unit"`` / ``"layer"`` — Kingma et al. (2015): one log α per
  output unit (or channel) or per layer, parameter ``log_alpha_param``, and
  σ² = αθ².
- ``alpha_per="weight", parameterization="log_alpha"`` — one learned log α per
  weight (parameter ``log_alpha_param``, σ² = αθ²): the alternative some
  reimplementations of VBD use; see docs/PARAMETERIZATION.md for how the two
  compare on LeNet-300-100.

Training forward uses the local reparameterization trick: the pre-activation
b = x·W is Gaussian with mean x·θ and variance x²·σ², so b is sampled directly
(two matrix products or two convolutions, independent noise per example).
Evaluation is deterministic: the posterior mean with the weights whose log α
exceeds ``threshold`` set to zero. With ``mc = True`` evaluation samples the
same way as training, from the posterior of the kept weights.

log α is clipped to :data:`LOG_ALPHA_RANGE` = [−8, 8] (the sparse VD
reference range), further capped by the prior (α ≤ 1 for Kingma's), and is
computed as log σ² − log(θ² + 1e−8), finite as θ → 0. The KL uses the clipped
log α, except VBD's with the additive parameterization, which is evaluated
exactly as ½·log(1 + θ²/σ²) (see :meth:`~vbdropout.priors.Prior.kl_sum_additive`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import kernels
from ..priors import LOG_ALPHA_RANGE, THETA_EPS, Prior, get_prior
from .base import VariationalModule, standard_normal_like, state_key
from .geometry import conv_forward
from .plain_state import load_plain_or_variational
from .prunable import (
    LOG_ALPHA_THRESHOLD,
    PrunableWeight,
    Threshold,
    check_log_alpha_threshold,
    eval_cached,
)

__all__ = [
    "LOG_ALPHA_RANGE",
    "Conv1dVBD",
    "Conv2dVBD",
    "Conv3dVBD",
    "GaussianWeight",
    "LinearVBD",
]

_VAR_EPS = 1e-8
AlphaPer = Literal["weight", "unit", "layer"]

# The KL that a layer's last fused training forward computed, with the parameters'
# state key and the parameter tensors it was computed from; kept outside the module
# so that deepcopy and pickling never meet the non-leaf tensor.
_FORWARD_KL: weakref.WeakKeyDictionary[
    nn.Module, tuple[tuple[int, ...], Tensor, Tensor, Tensor]
] = weakref.WeakKeyDictionary()


class GaussianWeight(PrunableWeight, VariationalModule):
    """Mixin: Gaussian posterior on ``self.weight`` with the LRT forward.

    Subclasses combine it with a torch layer and implement :meth:`_apply_weight`.
    """

    weight: Tensor
    bias: Tensor | None
    check_inputs: bool = True
    threshold_option = "log_alpha_threshold"

    def __init__(
        self,
        *args: Any,
        prior: str | Prior = "hierarchical",
        alpha_per: AlphaPer = "weight",
        threshold: float | None = LOG_ALPHA_THRESHOLD,
        train_clip: bool = False,
        init_log_sigma2: float = -10.0,
        init_log_alpha: float = 0.0,
        parameterization: Literal["additive", "log_alpha"] = "additive",
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged (same signature).

        prior: ``hierarchical`` (VBD), ``log_uniform`` (sparse VD), ``kingma`` or a
            :class:`~vbdropout.priors.Prior`.
        alpha_per: ``weight`` (additive reparameterization), ``unit`` or ``layer``.
        threshold: log α above which a weight is pruned at evaluation; ``None``
            never prunes.
        train_clip: also drop the pruned weights while training (sparse VD protocol).
        init_log_sigma2: initial log σ² (``alpha_per="weight"``).
        init_log_alpha: initial log α (tied α, or the ``log_alpha`` parameterization).
        parameterization: ``additive`` (θ, log σ²) or ``log_alpha`` (θ, log α); tied α
            is always parameterized by log α.
        """
        super().__init__(*args, **kwargs)
        self.prior = get_prior(prior)
        if alpha_per not in ("weight", "unit", "layer"):
            raise ValueError(f"alpha_per must be 'weight', 'unit' or 'layer', got {alpha_per!r}")
        self.alpha_per = alpha_per
        self.threshold = threshold
        self.train_clip = bool(train_clip)
        self.init_log_sigma2 = float(init_log_sigma2)
        self.init_log_alpha = float(init_log_alpha)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        if parameterization not in ("additive", "log_alpha"):
            raise ValueError(
                f"parameterization must be 'additive' or 'log_alpha', got {parameterization!r}"
            )
        self.additive = alpha_per == "weight" and parameterization == "additive"
        if self.additive:
            self.log_sigma2 = nn.Parameter(torch.empty_like(self.weight))
        elif alpha_per == "weight":
            self.log_alpha_param = nn.Parameter(torch.empty_like(self.weight))
        else:
            ndim = self.weight.dim()
            out = self.weight.shape[0] if alpha_per == "unit" else 1
            self.log_alpha_param = nn.Parameter(torch.empty((out,) + (1,) * (ndim - 1), **factory))
        self.reset_variational_parameters()

    @property
    def threshold(self) -> float | None:
        """log α above which a weight is pruned at evaluation (``None``: never)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = check_log_alpha_threshold(value)

    def reset_parameters(self) -> None:
        """Reset θ and the bias as the torch layer does, then the variance."""
        super().reset_parameters()  # type: ignore[misc]
        if hasattr(self, "alpha_per"):  # not yet during the torch layer's __init__
            self.reset_variational_parameters()

    def reset_variational_parameters(self) -> None:
        with torch.no_grad():
            if self.additive:
                self.log_sigma2.fill_(self.init_log_sigma2)
            else:
                self.log_alpha_param.fill_(self.init_log_alpha)

    @property
    def log_alpha(self) -> Tensor:
        """Clipped log α, shaped like ``weight`` (per-weight) or broadcastable to it (tied)."""
        if self.additive:
            raw = self.log_sigma2 - torch.log(self.weight * self.weight + THETA_EPS)
        else:
            raw = self.log_alpha_param
        return self.prior.clip(raw)

    def sigma2(self) -> Tensor:
        """Posterior variance σ² of every weight."""
        if not self.additive:
            return self.log_alpha.exp() * (self.weight * self.weight)
        sigma2 = self.log_sigma2.exp()
        if self.prior.max_log_alpha is not None:
            cap = (self.weight * self.weight) * math.exp(self.prior.upper_log_alpha)
            sigma2 = torch.minimum(sigma2, cap)
        return sigma2

    def variance_overflows(self) -> Tensor | None:
        """Whether some σ² = exp(log σ²) overflows to inf: only an additive layer whose
        prior does not cap α can, when log σ² > log(dtype max) (``None``: it cannot)."""
        if not self.additive or self.prior.max_log_alpha is not None or not self.weight.numel():
            return None
        return self.log_sigma2.detach().amax() > math.log(torch.finfo(self.log_sigma2.dtype).max)

    def keep_mask(self, threshold: Threshold = "own") -> Tensor:
        """Boolean mask of the weights that survive pruning: log α ≤ threshold.

        ``threshold="own"`` uses the layer's :attr:`threshold`; ``None`` keeps all.
        """
        # the layer's own threshold was checked when it was set
        cut = self.threshold if threshold == "own" else check_log_alpha_threshold(threshold)
        if cut is None:
            return torch.ones_like(self.weight, dtype=torch.bool)
        return (self.log_alpha <= cut).expand_as(self.weight)

    def _eval_weight(self) -> Tensor:
        """:meth:`masked_weight`, cached across evaluation forwards (:func:`.eval_cached`)."""
        variance = self.log_sigma2 if self.additive else self.log_alpha_param
        return eval_cached(self, self.masked_weight, (self.weight, variance), self.threshold)

    def kl(self) -> Tensor:
        """KL(q(W) || p(W)) summed over the layer's weights (biases are deterministic).

        After a fused training forward (:meth:`_fused_training_forward`), the KL it
        computed alongside σ² is returned once, when it was computed from these
        very parameter tensors, they have not changed since (an optimizer step, an
        in-place update or ``load_state_dict``; writes through ``.data`` are not
        seen) and its graph has not been through a backward pass yet. Until then
        it keeps that forward's graph alive, as the forward's output does.
        """
        if self.additive:
            cached = _FORWARD_KL.pop(self, None)
            if (
                cached is not None
                and cached[1] is self.weight
                and cached[2] is self.log_sigma2
                and cached[0] == self._kl_key()
                and not getattr(cached[3].grad_fn, "backward_ran", False)
            ):
                return cached[3] if torch.is_grad_enabled() else cached[3].detach()
            return self.prior.kl_sum_additive(self.weight, self.log_sigma2)
        kl = self.prior.kl(self.log_alpha)
        return kl.sum() * (self.weight.numel() // kl.numel())

    def _kl_key(self) -> tuple[int, ...]:
        return state_key((self.weight, self.log_sigma2))

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        raise NotImplementedError

    def _fusable(self, x: Tensor) -> bool:
        """Whether the layer's geometry and ``x`` suit the fused training forward."""
        raise NotImplementedError

    def _geometry(self) -> kernels.ConvGeometry | None:
        """The geometry argument of :func:`~vbdropout.kernels.gaussian_training_forward`."""
        raise NotImplementedError

    def _fused_training_forward(self, x: Tensor) -> Tensor | None:
        """The sampling forward as one node of fused CPU kernels (:mod:`vbdropout.kernels`),
        or ``None`` where that does not apply: tied α or the log-α parameterization, a
        prior that caps α, pruning masks in use (``mc``/``train_clip``), a geometry
        or input the kernels do not take, or kernels unavailable or turned off.

        The KL (where the kernels implement the prior: VBD's, sparse VD's) is
        computed in the same pass as σ² and kept for :meth:`kl`.
        """
        if not self.additive or self.prior.max_log_alpha is not None or self.mc:
            return None
        if self.train_clip or not self._fusable(x):
            return None
        if self.weight.stride() != self.log_sigma2.stride():  # e.g. only θ made channels-last
            return None
        tensors = (x, self.weight, self.log_sigma2) + (() if self.bias is None else (self.bias,))
        if not kernels.supports(*tensors):
            return None
        out, kl = kernels.gaussian_training_forward(
            x, self.weight, self.log_sigma2, self.bias, self._geometry(), _VAR_EPS,
            self.prior.kernel_spec(),
        )  # fmt: skip
        if kl.requires_grad and not kernels.compiling():  # compiled graphs: kl() recomputes
            _FORWARD_KL[self] = (self._kl_key(), self.weight, self.log_sigma2, kl)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.check_inputs:
            self._check_input(x)
        if not self.sampling():
            out = self._apply_weight(x, self._eval_weight(), self.bias)
        elif (fused := self._fused_training_forward(x)) is not None:
            out = fused
        else:
            theta, sigma2 = self.weight, self.sigma2()
            if self.mc or self.train_clip:
                mask = self.keep_mask()
                theta, sigma2 = theta * mask, sigma2 * mask
            mean = self._apply_weight(x, theta, self.bias)
            var = self._apply_weight(x * x, sigma2, None)
            if mean.stride() == var.stride() and kernels.supports(mean, var):
                out = kernels.lrt_sample(mean, var, _VAR_EPS)
            else:
                out = mean + torch.sqrt(var + _VAR_EPS) * standard_normal_like(mean)
        if self.check_inputs and self.check_finite:
            self._check_finite(x, out)
        return out

    def _check_finite(self, x: Tensor, out: Tensor) -> None:
        """Raise on NaN/inf. A NaN or inf input always reaches every output (NaN·0 is NaN),
        so one sum over the output suffices; the input is scanned only when it fails."""
        if torch.isfinite(out.detach().sum()):
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__} got an input containing NaN or inf")
        raise FloatingPointError(
            f"{type(self).__name__} produced a non-finite output from a finite input: "
            "its parameters are non-finite or have diverged"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, prior={self.prior.name}, alpha_per={self.alpha_per}, "
            + (
                ""
                if self.additive or self.alpha_per != "weight"
                else "parameterization=log_alpha, "
            )
            + f"threshold={self.threshold}, train_clip={self.train_clip}"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Accept a plain layer's state_dict: θ and bias from it, the variance at its init
        (see :func:`~.plain_state.load_plain_or_variational`)."""
        names = ("log_sigma2",) if self.additive else ("log_alpha_param",)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if load_plain_or_variational(state_dict, prefix, names, missing_keys):
            self.reset_variational_parameters()


class LinearVBD(GaussianWeight, nn.Linear):
    """``nn.Linear`` with q(w) = N(θ, αθ²) per weight; see the module docstring.

    ``LinearVBD(in_features, out_features, bias=True, *, prior="hierarchical", ...)``.
    """

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    def _fusable(self, x: Tensor) -> bool:
        return x.dim() > 0

    def _geometry(self) -> None:
        return None

    def _check_input(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs whose last dimension is "
                f"in_features={self.in_features}, got shape {tuple(x.shape)}"
            )


class _ConvGaussianWeight(GaussianWeight):
    """Convolution with q(w) = N(θ, αθ²); the variance uses a second convolution."""

    in_channels: int
    _spatial_dims: int

    def _apply_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return conv_forward(self, x, weight, bias)  # type: ignore[arg-type]

    def _fusable(self, x: Tensor) -> bool:
        """Batched input, zero padding given as numbers (not ``"same"``/``"valid"``)."""
        padding = self.padding  # type: ignore[attr-defined]
        return (
            x.dim() == self._spatial_dims + 2
            and self.padding_mode == "zeros"  # type: ignore[attr-defined]
            and not isinstance(padding, str)
        )

    def _geometry(self) -> kernels.ConvGeometry:
        return kernels.ConvGeometry(
            tuple(self.stride),  # type: ignore[attr-defined]
            tuple(self.padding),  # type: ignore[attr-defined]
            tuple(self.dilation),  # type: ignore[attr-defined]
            self.groups,  # type: ignore[attr-defined]
        )

    def _check_input(self, x: Tensor) -> None:
        d = self._spatial_dims
        if x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (N, {self.in_channels}, "
                f"{', '.join('*' * d)}) or without the batch dimension, "
                f"got shape {tuple(x.shape)}"
            )


class Conv1dVBD(_ConvGaussianWeight, nn.Conv1d):
    """``nn.Conv1d`` with a Gaussian posterior per weight (same signature + VBD options)."""

    _spatial_dims = 1


class Conv2dVBD(_ConvGaussianWeight, nn.Conv2d):
    """``nn.Conv2d`` with a Gaussian posterior per weight (same signature + VBD options)."""

    _spatial_dims = 2


class Conv3dVBD(_ConvGaussianWeight, nn.Conv3d):
    """``nn.Conv3d`` with a Gaussian posterior per weight (same signature + VBD options)."""

    _spatial_dims = 3
