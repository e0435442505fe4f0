"""The PyTorch Lightning integration: ELBO with KL warm-up, KL and compression logging."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from vbdropout import compression_report, convert
from vbdropout.integrations.lightning import KLWarmup, VariationalLightningMixin
from vbdropout.losses import elbo_terms
from vbdropout.models import build_model, get_method
from vbdropout.nn import LinearPruning
from vbdropout.nn.gaussian import GaussianWeight
from vbdropout.train.schedules import kl_weight

N = 256
EPOCHS = 3

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*no `val_dataloader`",
    "ignore:.*LeafSpec.*",  # lightning's own use of a torch API deprecated in 2.13
)


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, 64, generator=generator)
    y = (x @ torch.randn(64, 10, generator=generator)).argmax(1)  # a learnable rule
    return TensorDataset(x, y)


class TinyVBD(VariationalLightningMixin, LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = convert(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        )
        self.seen: list[tuple[int, float, float, float]] = []  # epoch, β, loss, expected

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = self.elbo_loss(logits, y)
        expected = elbo_terms(logits, y, self.net, N, self.kl_weight, reduction="mean").loss
        self.seen.append((self.current_epoch, self.kl_weight, loss.item(), expected.item()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.elbo_loss(self.net(x), y)  # logged as val/…, also in the sanity check

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path, warmup: KLWarmup, validate: bool = False) -> tuple[TinyVBD, Trainer]:
    seed_everything(0, verbose=False)
    module = TinyVBD()
    trainer = Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        callbacks=[warmup],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    val = DataLoader(_data(), batch_size=128) if validate else None
    trainer.fit(module, DataLoader(_data(), batch_size=64), val)
    return module, trainer


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    module, trainer = _fit(tmp, KLWarmup(start=0, end=2), validate=True)
    return module, trainer


def test_kl_weight_follows_the_warmup_schedule_at_every_step(warm_run):
    """As in ``vbd train``: β after epoch + batch/batches epochs, here (0, 2) over 4 batches."""
    module, _ = warm_run
    batches = N // 64
    assert len(module.seen) == EPOCHS * batches
    betas = [beta for _, beta, _, _ in module.seen]
    assert betas == [kl_weight(i / batches, 0, 2) for i in range(EPOCHS * batches)]
    assert betas[: batches + 1] == [0.0, 0.125, 0.25, 0.375, 0.5] and betas[-1] == 1.0


def test_loss_is_the_mean_negative_elbo(warm_run):
    module, _ = warm_run
    for _, _, loss, expected in module.seen:  # N found from the train loader
        assert loss == pytest.approx(expected, rel=1e-6)


def test_kl_and_compression_are_logged(warm_run):
    module, trainer = warm_run
    metrics = trainer.callback_metrics
    for key in (
        "train/nll",
        "train/kl",
        "train/kl_weight",
        "val/kl",
        "sparsity",
        "compression_ratio",
    ):
        assert key in metrics, key
    report = compression_report(module)
    assert metrics["sparsity"].item() == pytest.approx(report.sparsity)
    assert metrics["compression_ratio"].item() == pytest.approx(report.ratio)
    assert metrics["train/kl_weight"].item() == 1.0
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"train/kl", "train/nll", "sparsity", "compression_ratio"} <= columns
    epoch_rows = [r for r in rows if r["compression_ratio"]]
    assert [int(r["epoch"]) for r in epoch_rows] == list(range(EPOCHS))
    assert all(math.isfinite(float(r["train/kl"])) for r in rows if r["train/kl"])


def test_kl_term_changes_the_parameters(warm_run, tmp_path):
    warm, _ = warm_run
    no_kl, _ = _fit(tmp_path, KLWarmup(start=10, end=20))  # β = 0 for all three epochs
    assert {beta for _, beta, _, _ in no_kl.seen} == {0.0}
    # the first step has β = 0 in both runs and the same loss; then the KL acts in one
    assert warm.seen[0][1:3] == no_kl.seen[0][1:3]
    assert warm.seen[1][1] > 0 and warm.seen[1][2] != no_kl.seen[1][2]

    def mean_log_alpha(module):
        return torch.cat(
            [m.log_alpha.flatten() for m in module.modules() if isinstance(m, GaussianWeight)]
        ).mean()

    assert mean_log_alpha(warm) > mean_log_alpha(no_kl) + 0.01  # the KL pushes log α up


def test_dataset_size_outside_a_trainer():
    module = TinyVBD()
    x, y = _data().tensors
    logits = module.net(x[:8])
    with pytest.raises(ValueError, match="dataset_size"):
        module.elbo_loss(logits, y[:8])
    module.dataset_size, module.kl_weight = 1000, 0.25
    expected = elbo_terms(logits, y[:8], module, 1000, 0.25, reduction="mean").loss
    assert module.elbo_loss(logits, y[:8]).item() == pytest.approx(expected.item())


def test_warmup_arguments_are_checked():
    assert [KLWarmup(5, 20).kl_weight(e) for e in (0, 5, 10, 20, 99)] == [0, 0, 1 / 3, 1, 1]
    scaled = KLWarmup(5, 20, kl_scale=3)
    assert [scaled.kl_weight(e) for e in (0, 5, 10, 20, 99)] == [0, 0, 1, 3, 3]
    for start, end in ((3, 2), (-1, 2), (0.5, 2)):
        with pytest.raises(ValueError, match="start"):
            KLWarmup(start, end)
    for bad in (0, -1.0, float("inf"), float("nan"), "3", True):
        with pytest.raises(ValueError, match="kl_scale must be a positive finite number"):
            KLWarmup(0, 0, kl_scale=bad)


def test_a_cut_for_layers_the_model_lacks_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="unit_threshold 0.0 cuts no layer of this model"):
        _fit(tmp_path, KLWarmup(0, 0, unit_threshold=0.0))


def test_kl_scale_weighs_the_kl_as_vbd_train_does(tmp_path):
    """KLWarmup(kl_scale=S) gives the loss N·E[CE]/N + S·β·KL/N at every step, the
    objective of ``vbd train --kl-scale S``."""
    module, _ = _fit(tmp_path, KLWarmup(start=0, end=2, kl_scale=3))
    batches = N // 64
    betas = [beta for _, beta, _, _ in module.seen]
    assert betas == [3 * kl_weight(i / batches, 0, 2) for i in range(EPOCHS * batches)]
    for _, _, loss, expected in module.seen:
        assert loss == pytest.approx(expected, rel=1e-6)


def test_vbdropout_never_needs_lightning():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # "not installed"
        import vbdropout, vbdropout.integrations
        try:
            import vbdropout.integrations.lightning
        except ImportError as err:
            print(err)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert 'pip install "vbdropout[lightning]"' in result.stdout


class TinyPruning(VariationalLightningMixin, LightningModule):
    """LeNet-300-100 on 8×8 inputs with Han et al.'s pruning (a schedule-driven method)."""

    def __init__(self, method) -> None:
        super().__init__()
        self.net = build_model("lenet300_100", method, input_shape=(1, 8, 8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.elbo_loss(self.net(x.view(-1, 1, 8, 8)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("pass_method", [True, False], ids=["method", "default"])
def test_the_callback_runs_a_methods_schedule(tmp_path, pass_method):
    seed_everything(0, verbose=False)
    method = get_method("pruning", sparsity=0.6, prune_at=(0.3, 0.6), dataset_size=N)
    module = TinyPruning(method)
    layers = [m for m in module.modules() if isinstance(m, LinearPruning)]
    trainer = Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        callbacks=[KLWarmup(0, 0, method=method if pass_method else None)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(_data(), batch_size=64))
    # prune_at 0.3, 0.6 of 3 epochs: after epochs 0 and 1, then one epoch of retraining
    for layer in layers:
        pruned = layer.mask == 0
        assert pruned.float().mean().item() == pytest.approx(0.6, abs=0.01)
        assert torch.count_nonzero(layer.weight[pruned]) == 0  # Adam's steps left them at 0
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        sparsity = [float(r["sparsity"]) for r in csv.DictReader(f) if r["sparsity"]]
    assert sparsity[0] > 10 and sparsity[2] > sparsity[0]  # pruning steps at the epochs' ends
    assert sparsity[1] == pytest.approx(sparsity[2])
    assert not trainer.optimizers[0]._optimizer_step_post_hooks  # removed when fit ended


def test_epoch_schedules_need_max_epochs(tmp_path):
    module = TinyPruning(get_method("pruning", dataset_size=N))
    trainer = Trainer(
        max_epochs=-1,
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[KLWarmup(0, 0)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="max_epochs"):
        trainer.fit(module, DataLoader(_data(), batch_size=64))
