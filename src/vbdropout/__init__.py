"""vbdropout: Variational Bayesian Dropout with a hierarchical prior (Liu et al., CVPR 2019).

Drop-in variational layers that learn their own dropout rates, the baselines
the paper compares against, weight and unit compression, and a harness that
reruns the paper's tables.
"""

from .compress import CompressionReport, compression_report
from .convert import convert
from .losses import elbo_loss, kl_divergence
from .nn import (
    Conv1dVBD,
    Conv2dVBD,
    Conv3dVBD,
    LinearVBD,
    StructuredVBD,
    VariationalModule,
    mc_sampling,
    to_deterministic,
)
from .priors import get_prior

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "Conv1dVBD",
    "Conv2dVBD",
    "Conv3dVBD",
    "LinearVBD",
    "StructuredVBD",
    "VariationalModule",
    "__version__",
    "compression_report",
    "convert",
    "elbo_loss",
    "get_prior",
    "kl_divergence",
    "mc_sampling",
    "to_deterministic",
]
