"""Training protocol defaults per network, in one readable place.

Compression networks follow the sparse VD protocol (Molchanov et al. 2017),
which Table 4/5 of the paper adopt: Adam, batch 100, 200 epochs, lr 1e-3
constant for 100 epochs then linear to 0, KL weight 0 for 5 epochs then
linear to 1 at epoch 20 (raised at every step; the reference code raises it once
per epoch, (e − 5)/15 through epoch e: the two differ by less than 1/15 at any step).
The paper leaves the classification protocols (Tables 1–3) to its supplement;
ours: Adam 1e-3, batch 100, the paper's epoch counts (50 for MNIST, 100 for
CIFAR-10/SVHN), linear decay over the second half and a 10-epoch KL warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol"]


@dataclass(frozen=True)
class Protocol:
    epochs: int
    batch_size: int
    lr: float
    lr_decay_start: int | None
    kl_warmup: tuple[int, int]


_COMPRESSION = Protocol(epochs=200, batch_size=100, lr=1e-3, lr_decay_start=100, kl_warmup=(5, 20))

PROTOCOLS: dict[str, Protocol] = {
    "lenet300_100": _COMPRESSION,
    "lenet500_300": _COMPRESSION,
    "lenet5_caffe": _COMPRESSION,
    "mlp_srivastava": Protocol(
        epochs=50, batch_size=100, lr=1e-3, lr_decay_start=25, kl_warmup=(0, 10)
    ),
    "kingma_cifar": Protocol(
        epochs=100, batch_size=100, lr=1e-3, lr_decay_start=50, kl_warmup=(0, 10)
    ),
}
