"""Fast dropout (Wang & Manning 2013): the Gaussian approximation of a dropped-out layer.

With inverted dropout of rate p on the inputs, the pre-activation
b_j = Σ_i x_i·(z_i/(1 − p))·W_ji, z_i ~ Bernoulli(1 − p), has

    E[b_j] = Σ_i x_i·W_ji,    Var[b_j] = p/(1 − p) · Σ_i x_i²·W_ji²,

and fast dropout samples b from the Gaussian with these moments (the
central-limit approximation of the sum), independently per example. That is
exactly a Gaussian-weight layer q(w) = N(θ, αθ²) under the local
reparameterization trick, with α = p/(1 − p) fixed and shared by the whole
layer and no KL term: so these layers are :class:`~vbdropout.nn.LinearVBD` /
:class:`~vbdropout.nn.Conv2dVBD` with a frozen tied log α and
:class:`~vbdropout.priors.NoPrior`.
Evaluation uses the mean weights (nothing is pruned); the bias carries no noise.
"""

from __future__ import annotations

import math
from typing import Any

from ..priors import NoPrior
from .dropout import check_rate
from .gaussian import LOG_ALPHA_RANGE, Conv2dVBD, GaussianWeight, LinearVBD

__all__ = ["Conv2dFastDropout", "LinearFastDropout"]


class _FastDropout(GaussianWeight):
    """Fixed, layer-wide α = p/(1 − p), frozen; no KL; never prunes."""

    def __init__(self, *args: Any, p: float = 0.5, **kwargs: Any) -> None:
        p = check_rate(p)
        log_alpha = math.log(p / (1.0 - p))
        low, high = LOG_ALPHA_RANGE
        if not low <= log_alpha <= high:
            p_min, p_max = 1 / (1 + math.exp(-low)), 1 / (1 + math.exp(-high))
            raise ValueError(
                f"p={p} gives log α = {log_alpha:.2f} outside the layers' clip range "
                f"[{low}, {high}]; use {p_min:.1e} ≤ p ≤ {p_max:.5f}"
            )
        self.p = p
        super().__init__(
            *args,
            prior=NoPrior(),
            alpha_per="layer",
            threshold=None,
            init_log_alpha=log_alpha,
            **kwargs,
        )
        self.log_alpha_param.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{super(GaussianWeight, self).extra_repr()}, p={self.p}"


class LinearFastDropout(_FastDropout, LinearVBD):
    """``nn.Linear`` whose training output is fast dropout's Gaussian with rate ``p``.

    ``LinearFastDropout(in_features, out_features, bias=True, *, p=0.5)``.
    """


class Conv2dFastDropout(_FastDropout, Conv2dVBD):
    """``nn.Conv2d`` with fast dropout of rate ``p`` on every input element.

    ``Conv2dFastDropout(in_channels, out_channels, kernel_size, ..., *, p=0.5)``.
    """
