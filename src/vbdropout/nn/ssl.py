"""Structured sparsity learning (Wen, Wu, Wang, Chen & Li 2016).

Wen et al. add a group lasso to the loss, E(W) = E_D(W) + λ·R(W) + λ_g·Σ_g ‖W_g‖₂,
whose groups here are the structures whose removal shrinks the network:

- fully connected layers: each output neuron's row W[o, :] and each input
  neuron's column W[:, i] (the network's input pixels included);
- convolutions: each filter W[o, :, :, :] (output channel) and each input
  channel W[:, c, :, :] (Wen et al.'s filter-wise and channel-wise groups).

λ_g = ``group_decay`` and the L2 λ = ``weight_decay`` are per training example
(Caffe's convention), so the layer's :meth:`~GroupLasso.kl` is N·λ_g·Σ‖W_g‖ +
N·(λ/2)·‖W‖². A gradient optimizer drives the groups to zero but leaves them
oscillating around it, so a group is removed — its mask set to zero, its
weights zeroed exactly and held there (:class:`~vbdropout.nn.penalized.MaskedWeight`)
— when its root-mean-square weight ‖W_g‖/√|g| falls to ``rms_threshold`` or below,
checked after every epoch (:meth:`GroupLasso.on_epoch_end`) and by
:meth:`GroupLasso.remove_groups_`. The rest of the run fine-tunes the remaining
structure, as Wen et al. fine-tune after removing the zero groups. A unit whose
row or whose columns in the next layer are all zero is then removed by
:func:`~vbdropout.compress.shrink.shrink`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import check_dataset_size
from .penalized import MaskedWeight, check_nonnegative, needs_dataset_size

__all__ = ["Conv2dSSL", "GroupLasso", "LinearSSL"]


class GroupLasso(MaskedWeight):
    """Mixin: Wen et al.'s group lasso on rows/filters and columns/channels of ``weight``."""

    def __init__(
        self,
        *args: Any,
        group_decay: float = 1e-4,
        rms_threshold: float = 1e-3,
        weight_decay: float = 0.0,
        dataset_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``args``/``kwargs`` go to the torch layer unchanged.

        group_decay: λ_g per training example (needs ``dataset_size`` when > 0).
        rms_threshold: a group is removed when its RMS weight is at most this.
        weight_decay, dataset_size: the L2 term (see :class:`PenalizedWeight`).
        """
        super().__init__(*args, weight_decay=weight_decay, dataset_size=dataset_size, **kwargs)
        self.group_decay = check_nonnegative(group_decay, "group_decay")
        self.rms_threshold = check_nonnegative(rms_threshold, "rms_threshold")
        if self.group_decay > 0:
            check_dataset_size(dataset_size, needs_dataset_size("group_decay"))

    def group_norms(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """‖W_g‖₂ of the output groups (rows / filters) and of the input groups (columns /
        channels) of ``weight`` (the layer's masked weight by default)."""
        w = self.masked_weight() if weight is None else weight
        rows = torch.linalg.vector_norm(w.flatten(1), dim=1)
        cols = torch.linalg.vector_norm(w.transpose(0, 1).flatten(1), dim=1)
        return rows, cols

    def penalty(self) -> Tensor:
        """N·λ_g·(Σ_rows ‖W_g‖ + Σ_columns ‖W_g‖)."""
        if self.group_decay == 0:
            return self.weight.new_zeros(())
        assert self.dataset_size is not None
        rows, cols = self.group_norms()
        return self.dataset_size * self.group_decay * (rows.sum() + cols.sum())

    @torch.no_grad()
    def remove_groups_(self) -> tuple[int, int]:
        """Remove the groups whose RMS weight is at most ``rms_threshold``.

        Returns the numbers of removed (zero) output and input groups after the call.
        """
        rows, cols = self.group_norms()
        per_row = self.weight[0].numel()
        per_col = self.weight.numel() // self.weight.shape[1]
        dead_rows = rows <= self.rms_threshold * math.sqrt(per_row)
        dead_cols = cols <= self.rms_threshold * math.sqrt(per_col)
        keep = self.mask.clone()
        keep[dead_rows] = 0
        keep[:, dead_cols] = 0
        self.set_mask_(keep)
        return int(dead_rows.sum()), int(dead_cols.sum())

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        self.remove_groups_()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, group_decay={self.group_decay}, "
            f"rms_threshold={self.rms_threshold}"
        )


class LinearSSL(GroupLasso, torch.nn.Linear):
    """``nn.Linear`` with a group lasso on neurons (Wen et al. 2016).

    ``LinearSSL(in_features, out_features, bias=True, *, group_decay=1e-4, rms_threshold=1e-3,
    weight_decay=0.0, dataset_size=None)``.
    """


class Conv2dSSL(GroupLasso, torch.nn.Conv2d):
    """``nn.Conv2d`` with a group lasso on filters and channels (same signature + options)."""
