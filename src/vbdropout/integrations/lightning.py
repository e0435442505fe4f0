"""PyTorch Lightning integration: the ELBO with KL warm-up, and compression logging.

Requires Lightning (``pip install "vbdropout[lightning]"``); ``lightning.pytorch``
is used when installed, else the standalone ``pytorch_lightning``.

>>> class Classifier(VariationalLightningMixin, L.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.net = vbdropout.convert(make_net(), method="vbd")
...
...     def training_step(self, batch, batch_idx):
...         x, y = batch
...         return self.elbo_loss(self.net(x), y)  # logs train/nll, train/kl, train/kl_weight
...
>>> trainer = L.Trainer(max_epochs=200, callbacks=[KLWarmup(start=5, end=20)])

:class:`VariationalLightningMixin` gives a LightningModule ``self.elbo_loss(logits, y)``,
the negative ELBO divided by the training-set size N (``elbo_terms(..., reduction="mean")``)
with the KL weighted by ``self.kl_weight``. :class:`KLWarmup` sets ``kl_weight`` at the start of
every training epoch from :func:`vbdropout.train.schedules.kl_weight`, runs the method's
training events at the end of every training epoch (:meth:`Method.epoch_end
<vbdropout.models.methods.Method.epoch_end>`: pruning, DNS, soft weight-sharing and SSL
schedules) and then logs the model's weight sparsity and compression ratio.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from ..compress.report import compression_report
from ..losses import elbo_terms
from ..models.methods import Method
from ..nn.base import StochasticModule, attach_optimizer
from ..nn.prunable import Threshold, check_thresholds
from ..train.schedules import kl_weight as _scheduled_kl_weight

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "vbdropout.integrations.lightning needs PyTorch Lightning: "
            'pip install "vbdropout[lightning]"'
        ) from err

__all__ = ["KLWarmup", "VariationalLightningMixin"]

_STAGE_PREFIX = {
    "train": "train",
    "sanity_check": "val",
    "validate": "val",
    "test": "test",
    "predict": "predict",
}


class VariationalLightningMixin:
    """Mixin for a :class:`LightningModule` trained on the negative ELBO.

    Put it before ``LightningModule`` in the bases:
    ``class Model(VariationalLightningMixin, L.LightningModule)``. The KL sums over
    every :class:`~vbdropout.nn.VariationalModule` of the LightningModule.

    Attributes:
        kl_weight: the weight of the KL term; 1 (the true ELBO) unless set, e.g. by
            :class:`KLWarmup` (its ``kl_scale`` · β).
        dataset_size: N, the number of training examples. ``None`` (the default) takes
            ``len(trainer.train_dataloader.dataset)`` — set it when the training loader
            is not a single map-style ``DataLoader``, subsamples the data set, or when
            the loss is needed outside ``trainer.fit`` or in a validation sanity check
            with the loaders coming from a LightningDataModule or the module's hooks.
    """

    kl_weight: float = 1.0
    dataset_size: int | None = None

    def elbo_loss(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        log: bool = True,
        prefix: str | None = None,
        **log_kwargs: Any,
    ) -> Tensor:
        """Negative ELBO / N of a minibatch: mean cross-entropy + β·KL / N.

        logits: (B, C) outputs on the minibatch; targets: (B,) class indices.
        log: log ``{prefix}/nll`` (mean cross-entropy), ``{prefix}/kl`` (total KL in
            nats) and ``{prefix}/kl_weight`` with ``self.log_dict`` when attached to a
            Trainer. prefix: ``None`` takes ``train``, ``val`` or ``test`` from the
            Trainer's stage. log_kwargs: passed on to ``self.log_dict`` (``on_epoch``,
            ``sync_dist``, …; ``batch_size`` defaults to B).
        """
        terms = elbo_terms(
            logits,
            targets,
            self,  # type: ignore[arg-type]
            self._elbo_dataset_size(),
            float(self.kl_weight),
            reduction="mean",
        )
        trainer = getattr(self, "_trainer", None)
        if log and trainer is not None:
            if prefix is None:
                stage = trainer.state.stage
                prefix = _STAGE_PREFIX.get(getattr(stage, "value", stage), "train")
            log_kwargs.setdefault("batch_size", targets.shape[0])
            self.log_dict(  # type: ignore[attr-defined]
                {
                    f"{prefix}/nll": terms.nll.detach(),
                    f"{prefix}/kl": terms.kl.detach(),
                    f"{prefix}/kl_weight": float(self.kl_weight),
                },
                **log_kwargs,
            )
        return terms.loss

    def _elbo_dataset_size(self) -> int:
        if self.dataset_size is not None:
            return self.dataset_size
        trainer = getattr(self, "_trainer", None)
        loader = None if trainer is None else trainer.train_dataloader
        if loader is None and trainer is not None:
            # the sanity check runs before fit sets up the train loader: take the loader
            # given to trainer.fit, if any (best effort on a private attribute)
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            instance = getattr(source, "instance", None)
            loader = instance if isinstance(instance, DataLoader) else None
        dataset = getattr(loader, "dataset", None)
        try:
            size = len(dataset) if dataset is not None else None  # type: ignore[arg-type]
        except TypeError:  # an IterableDataset without __len__
            size = None
        if size:
            self._resolved_dataset_size = size
            return size
        cached = getattr(self, "_resolved_dataset_size", None)
        if cached is not None:  # e.g. validating after fit, or during a later validate()
            return cached
        raise ValueError(
            "cannot tell the training-set size N for the ELBO: set `self.dataset_size` "
            "(it is read from `len(trainer.train_dataloader.dataset)` only for a single "
            "map-style DataLoader during trainer.fit, and before training starts, e.g. in "
            "the sanity check, only for a DataLoader passed to trainer.fit)"
        )


_UNSET: Any = object()  # a deprecated argument not given


class KLWarmup(pl.Callback):
    """Linear KL warm-up, the method's training events, and compression logging.

    Before every training step sets ``pl_module.kl_weight`` to ``kl_scale`` · β at
    t = e + b/B epochs (epoch e from 0, batch b of B), β being 0 for t < start,
    (t − start) / (end − start) until ``end``, then 1 —
    :func:`vbdropout.train.schedules.kl_weight`, as ``vbd train`` does (the sparse VD
    protocol uses ``start=5, end=20``; ``start=end=0`` for methods without a KL warm-up,
    such as the pruning baselines). ``kl_scale`` is ``vbd train --kl-scale``: 1 (the
    default) trains the ELBO, above 1 a heavier KL that prunes more. With a loader of
    unknown length, β keeps its value at the epoch's start. When fitting starts it hooks
    the model to the trainer's optimizers (:func:`~vbdropout.nn.base.attach_optimizer`:
    pruned weights stay zero through their steps). At the end of every training epoch it
    runs ``method.epoch_end(pl_module, epoch, trainer.max_epochs)`` (``method``: a
    :class:`~vbdropout.models.methods.Method`, by default the base one, which runs the
    layers' ``on_epoch_end`` hooks as every built-in method does), then logs
    ``{prefix}sparsity`` (percentage of zero weights) and ``{prefix}compression_ratio``
    (|W| / |W≠0|, ``inf`` when every weight is pruned) from
    :func:`~vbdropout.compress.compression_report` of the LightningModule — or of its
    submodule named ``module`` (e.g. ``"net"``; needed for structured models, whose
    report folds the network's layers in order) — unless ``log_compression=False``.
    ``log_alpha_threshold`` and ``unit_threshold`` are passed on to the report (a number
    for a kind of layer the module lacks is refused when fitting starts; ``threshold`` is
    the former name of ``log_alpha_threshold``, deprecated).
    """

    def __init__(
        self,
        start: int,
        end: int,
        *,
        log_compression: bool = True,
        log_alpha_threshold: Threshold = "own",
        unit_threshold: Threshold = "own",
        module: str | None = None,
        prefix: str = "",
        method: Method | None = None,
        kl_scale: float = 1.0,
        threshold: Threshold = _UNSET,
    ) -> None:
        super().__init__()
        if threshold is not _UNSET:
            warnings.warn(
                "KLWarmup(threshold=...) is deprecated: use log_alpha_threshold=...",
                DeprecationWarning,
                stacklevel=2,
            )
            log_alpha_threshold = threshold
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 0 <= start <= end:
            raise ValueError(f"KL warm-up needs 0 <= start <= end, got start={start}, end={end}")
        number = isinstance(kl_scale, int | float) and not isinstance(kl_scale, bool)
        if not (number and math.isfinite(kl_scale) and kl_scale > 0):
            raise ValueError(f"kl_scale must be a positive finite number, got {kl_scale!r}")
        self.start = start
        self.end = end
        self.kl_scale = float(kl_scale)
        self.log_compression = log_compression
        self.log_alpha_threshold = log_alpha_threshold
        self.unit_threshold = unit_threshold
        self.module = module
        self.prefix = prefix
        self.method = Method() if method is None else method
        self._handles: list[Any] = []

    def kl_weight(self, progress: float) -> float:
        """``kl_scale`` · β after ``progress`` epochs of training (0 at the first step)."""
        return self.kl_scale * _scheduled_kl_weight(progress, self.start, self.end)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        scheduled = any(
            type(m).on_epoch_end is not StochasticModule.on_epoch_end
            for m in pl_module.modules()
            if isinstance(m, StochasticModule)
        )
        if scheduled and not (trainer.max_epochs or 0) >= 1:
            raise ValueError(
                "the model's layers have epoch schedules (fractions of the run), which need "
                f"Trainer(max_epochs=...), got max_epochs={trainer.max_epochs!r}"
            )
        if self.log_compression:  # a cut for layers the model lacks: refused before training
            check_thresholds(
                self._reported(pl_module),
                {
                    "log_alpha_threshold": self.log_alpha_threshold,
                    "unit_threshold": self.unit_threshold,
                },
            )
        self._handles = [attach_optimizer(pl_module, opt) for opt in trainer.optimizers]

    def _reported(self, pl_module: Any) -> Any:
        """The module whose compression is logged: ``pl_module`` or its ``module``."""
        return pl_module if self.module is None else pl_module.get_submodule(self.module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        done = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        pl_module.kl_weight = self.kl_weight(trainer.current_epoch + done)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if (trainer.max_epochs or 0) >= 1:
            self.method.epoch_end(pl_module, trainer.current_epoch, trainer.max_epochs)
        if not self.log_compression:
            return
        report = compression_report(
            self._reported(pl_module),
            log_alpha_threshold=self.log_alpha_threshold,
            unit_threshold=self.unit_threshold,
        )
        pl_module.log_dict(
            {
                f"{self.prefix}sparsity": report.sparsity,
                f"{self.prefix}compression_ratio": report.ratio,
            },
            on_step=False,
            on_epoch=True,
        )
