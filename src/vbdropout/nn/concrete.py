"""Concrete dropout (Gal, Hron & Kendall 2017): a dropout rate learned by gradient descent.

The layer's inputs are multiplied by a continuous relaxation of the Bernoulli
keep mask, the concrete (relaxed Bernoulli) distribution with temperature t,

    z̃ = 1 − σ((log p − log(1 − p) + log u − log(1 − u)) / t),   u ~ U(0, 1),

then divided by 1 − p (inverted scaling), so the gradient reaches p through
the reparameterized noise. As t → 0, z̃ → z ~ Bernoulli(1 − p); the paper and
its reference code use t = 0.1.

Regularizer. For weights W applied to the dropped-out inputs, Gal et al. give
KL(q || p) ∝ (l²(1 − p)/2)·‖M‖² − K·H(p) with M = W/(1 − p) (the weights
before the inverted scaling), K the number of dropped input elements and
H(p) = −p·log p − (1 − p)·log(1 − p). The reference code adds, per example,

    weight_regularizer · ‖W‖²/(1 − p) + dropout_regularizer · K · (−H(p)),

and :meth:`ConcreteDropout.kl` returns N times this (nats for the whole
training set, the convention of :class:`~vbdropout.nn.VariationalModule`).
Defaults: ``weight_regularizer = l²/N`` (the reference's l²/(τN) with τ = 1,
prior length-scale l = ``length_scale``) and ``dropout_regularizer = 1/N``, the
paper's coefficient of −K·H(p) for a categorical likelihood (the reference's
2/(τN) is for its regression loss, the squared error without the ½). With the
defaults the term is l²·‖W‖²/(1 − p) − K·H(p), which is the paper's KL with
its length-scale equal to √2·l. N is needed only to convert per-example
coefficients given in the reference's units. Only the weight is penalized
(the reference's Keras layer; the bias carries no dropout).

K is the number of input elements the noise is drawn for: ``in_features`` for
a linear layer; C·H·W for a convolution (elementwise noise on its input),
known after the first forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import VariationalModule, check_dataset_size
from .deterministic import to_deterministic
from .dropout import check_rate

__all__ = ["ConcreteDropout"]

_U_EPS = 1e-7


class ConcreteDropout(VariationalModule):
    """``layer`` applied to its input after concrete dropout with a learned rate p.

    ``ConcreteDropout(nn.Linear(784, 300), dataset_size=60000)``.

    Args:
        layer: the weight layer (anything with a ``weight``; linear or convolution).
        dataset_size: N, the number of training examples.
        length_scale: prior length-scale l; sets the default weight_regularizer l²/N.
        weight_regularizer: per-example coefficient of ‖W‖²/(1 − p) (reference units).
        dropout_regularizer: per-example coefficient of −K·H(p) (reference units).
        init_p: initial dropout rate (reference code: 0.1).
        temperature: t of the concrete distribution (paper: 0.1).
    """

    def __init__(
        self,
        layer: nn.Module,
        dataset_size: int,
        length_scale: float = 1e-4,
        weight_regularizer: float | None = None,
        dropout_regularizer: float | None = None,
        init_p: float = 0.1,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(layer, "weight", None), Tensor):
            raise TypeError(
                f"ConcreteDropout needs a layer with a weight, got {type(layer).__name__}"
            )
        check_dataset_size(dataset_size)
        for name, value in (("length_scale", length_scale), ("temperature", temperature)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name, value in (
            ("weight_regularizer", weight_regularizer),
            ("dropout_regularizer", dropout_regularizer),
        ):
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a number >= 0 or None, got {value!r}")
        self.layer = layer
        self.dataset_size = dataset_size
        self.length_scale = float(length_scale)
        self.weight_regularizer = (
            length_scale**2 / dataset_size if weight_regularizer is None else weight_regularizer
        )
        self.dropout_regularizer = (
            1.0 / dataset_size if dropout_regularizer is None else dropout_regularizer
        )
        self.init_p = check_rate(init_p, "init_p")
        self.temperature = float(temperature)
        in_features = getattr(layer, "in_features", None)
        self.input_dim: int | None = in_features if isinstance(in_features, int) else None
        self.p_logit = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """p = init_p (the wrapped layer keeps its own initialization)."""
        with torch.no_grad():
            self.p_logit.fill_(math.log(self.init_p) - math.log1p(-self.init_p))

    @property
    def p(self) -> Tensor:
        """The dropout rate σ(p_logit)."""
        return torch.sigmoid(self.p_logit)

    def sample_mask(
        self, shape: torch.Size | tuple[int, ...], temperature: float | None = None
    ) -> Tensor:
        """A relaxed keep mask z̃ ∈ (0, 1) of ``shape`` (before the 1/(1 − p) scaling)."""
        t = self.temperature if temperature is None else temperature
        u = torch.rand(shape, device=self.p_logit.device, dtype=self.p_logit.dtype)
        u = u.clamp(_U_EPS, 1.0 - _U_EPS)
        drop_logit = (self.p_logit + torch.log(u) - torch.log1p(-u)) / t
        return torch.sigmoid(-drop_logit)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.layer, nn.modules.conv._ConvNd):  # (N,) C, *spatial
            self.input_dim = math.prod(x.shape[-len(self.layer.kernel_size) - 1 :])
        elif not isinstance(self.layer, nn.Linear) and x.dim() >= 2:
            self.input_dim = x[0].numel()
        if self.sampling():
            x = x * self.sample_mask(x.shape) / (1.0 - self.p)
        return self.layer(x)

    def deterministic(self) -> nn.Module:
        """Evaluation is the wrapped layer alone (inverted scaling)."""
        return to_deterministic(self.layer)

    def kl(self) -> Tensor:
        """N·[wr·‖W‖²/(1 − p) − dr·K·H(p)] in nats for the whole training set."""
        if self.input_dim is None:
            raise RuntimeError(
                "ConcreteDropout.kl() needs K, the number of input elements, which a "
                "convolution learns from its first forward pass; run one forward first"
            )
        log_p, log_q = F.logsigmoid(self.p_logit), F.logsigmoid(-self.p_logit)
        p = log_p.exp()
        neg_entropy = p * log_p + (1.0 - p) * log_q
        weight = self.layer.weight
        weight_term = self.weight_regularizer * weight.pow(2).sum() / (1.0 - p)
        dropout_term = self.dropout_regularizer * self.input_dim * neg_entropy
        return self.dataset_size * (weight_term + dropout_term)

    def extra_repr(self) -> str:
        return (
            f"p={self.p.item():.4f}, dataset_size={self.dataset_size}, "
            f"length_scale={self.length_scale}, temperature={self.temperature}"
        )
