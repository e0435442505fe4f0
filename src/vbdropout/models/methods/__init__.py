"""Where dropout goes: each method says how to build a network's weight layers.

A network (see :mod:`vbdropout.models.networks`) asks its method for every
weight layer with ``method.linear(...)`` / ``method.conv2d(...)``; the method
returns the plain torch layer, a variational layer, or a noise module followed
by the layer, and may wrap the finished network (``method.wrap``). Adding a
method is one small class with :func:`register` in one of the modules below: no
network is copied.

- :mod:`.base`: the :class:`Method` contract (layers, run options, the epoch
  hook) and the one registry :data:`METHODS`;
- :mod:`.dropout`: ``none``, ``bernoulli``, ``gaussian``, ``fast_dropout``,
  ``vd_a``, ``vd_b``, ``concrete``, ``adversarial``;
- :mod:`.variational`: ``vbd`` (this paper), ``sparse_vd``, ``vbd_structured``,
  ``sparse_vd_structured``, ``sbp``;
- :mod:`.compression`: ``pruning``, ``dns``, ``sws``, ``ssl``, whose training
  events run through :meth:`Method.epoch_end`.
"""

from __future__ import annotations

from .base import METHODS, RUN_OPTIONS, Method, Position, get_method, method_class, register

# The modules register their methods in this order, the order the CLI lists them in.
# isort: split
from .dropout import (
    Adversarial,
    Bernoulli,
    Concrete,
    FastDropout,
    Gaussian,
    InputNoiseMethod,
    NoDropout,
    VariationalDropoutA,
    VariationalDropoutB,
)

# isort: split
from .variational import (
    SBP,
    VBD,
    GaussianWeightMethod,
    SparseVD,
    StructuredSparseVD,
    StructuredVBDMethod,
    UnitNoiseMethod,
)

# isort: split
from .compression import (
    DNS,
    POSITION_KEYS,
    PerLayerMethod,
    Pruning,
    SoftWeightSharing,
    StructuredSparsity,
)

__all__ = [
    "DNS",
    "METHODS",
    "POSITION_KEYS",
    "RUN_OPTIONS",
    "SBP",
    "VBD",
    "Adversarial",
    "Bernoulli",
    "Concrete",
    "FastDropout",
    "Gaussian",
    "GaussianWeightMethod",
    "InputNoiseMethod",
    "Method",
    "NoDropout",
    "PerLayerMethod",
    "Position",
    "Pruning",
    "SoftWeightSharing",
    "SparseVD",
    "StructuredSparseVD",
    "StructuredSparsity",
    "StructuredVBDMethod",
    "UnitNoiseMethod",
    "VariationalDropoutA",
    "VariationalDropoutB",
    "get_method",
    "method_class",
    "register",
]
