"""Fused CPU kernels for the training step of the Gaussian-posterior layers.

- :func:`gaussian_training_forward` — a whole LRT training forward of a linear or
  convolutional layer with the additive parameterization as one autograd node:
  σ² = exp(log σ²) and the KL (VBD's Σ ½·log(1 + θ²/σ²), Eq. 17/18, or sparse
  VD's) in one pass, the two matrix products (or convolutions), the sample, and
  a backward that turns the products' gradients into those of θ and log σ²
  (KL terms included) in one more pass.
- :func:`lrt_sample` — the local reparameterization sample b = μ + sqrt(v + ε)·z,
  z ~ N(0, 1), in one pass that also draws z (SplitMix64 + Box–Muller, seeded
  from torch's generator, so ``torch.manual_seed`` makes runs repeatable) and
  keeps ∂b/∂v = z/(2·sqrt(v + ε)) for the backward pass (one multiply).
- :func:`kl_sum` — VBD's or sparse VD's KL in one pass, its gradients in one more.

Each replaces several separate passes of eager PyTorch and the autograd
bookkeeping between them (see docs/PERFORMANCE.md).
The C++ source (``cpu.cpp``) is compiled on first use with
:func:`torch.utils.cpp_extension.load` — a few seconds, once per machine; torch
caches the library in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). It needs a C++ compiler and ninja (a dependency
of vbdropout on Linux). When the build fails, or for tensors the kernels do not
take (not CPU float32, not dense, under CPU autocast or ``torch.func``
transforms), the callers run their eager PyTorch versions; :func:`status` says
which path is in use and why. The kernels use torch's OpenMP thread pool where
torch runs on GNU OpenMP (Linux wheels); elsewhere they run single-threaded.

Set ``VBDROPOUT_CPU_KERNELS=0`` to never build or use them. Two differences from
the eager path: the noise is a different (equally N(0, 1), reaching |z| = 6.7)
random stream, and the fused functions are differentiable once (no double
backward; use the environment variable for that). Results do not depend on the
number of threads.
"""

from .build import (
    ENV_VAR,
    available,
    compiling,
    functorch_active,
    require,
    set_enabled,
    status,
    supports,
)
from .functions import ConvGeometry, KLSpec, gaussian_training_forward, kl_sum, lrt_sample

__all__ = [
    "ENV_VAR",
    "ConvGeometry",
    "KLSpec",
    "available",
    "compiling",
    "functorch_active",
    "gaussian_training_forward",
    "kl_sum",
    "lrt_sample",
    "require",
    "set_enabled",
    "status",
    "supports",
]
