"""The quickstart: compress a trained network with VBD on scikit-learn's 8×8 digits.

The sparse VD protocol (Molchanov et al. 2017) on data that needs no download:

1. train a plain LeNet-300-100-shaped MLP (64-300-100-10) without dropout for
   ``pretrain_epochs`` (Adam, lr decaying linearly to 0 over the second half);
2. load its weights into the same network with VBD layers (θ = the trained
   weights, log σ² = −10) and train that for ``epochs`` with a KL warm-up
   over the whole phase (β = t/epochs after t epochs, rising at every step from 0 to 1;
   ``kl_warmup`` shortens it)
   and the same lr decay;
3. report the test error before (the plain network) and after (VBD, weights with
   log α > 3 pruned), and the compression |W|/|W≠0|.

Starting from trained weights matters on 1,437 training images: trained from
scratch, the KL of 50,200 weights outweighs the data term and VBD ends at about
twice the plain network's error. The warm-up over the whole phase is the less
aggressive operating point: with β = 1 from mid-phase (``kl_warmup=epochs // 2``) the
same seeds kept 1 weight in 143 at 0.64 points more error, against 1 in ~110 at
~0.5 (β raised once per epoch then; raised at every step, 0.28 points at 110×:
docs/RESULTS.md, "vbd demo over seeds 0–19"). :func:`plot_demo` draws the learned log α per
layer and the 8×8 mask of the input pixels that the first layer still reads.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compress import compression_report
from .data import Dataset, load_dataset
from .io import atomic_write_bytes
from .models import Method, build_model, get_method
from .nn.base import attach_optimizer
from .nn.gaussian import GaussianWeight
from .train.loop import evaluate, make_adam, train_epoch
from .train.progress import ProgressBar
from .train.schedules import kl_weight, lr_factor

__all__ = ["check_plot_path", "format_demo", "plot_demo", "run_demo"]


def _fit(
    method: Method,
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    warmup: tuple[int, int],
    seed: int,
    batch_size: int,
    bar: ProgressBar,
) -> None:
    """``epochs`` of Adam at ``lr`` (linear decay to 0 over the second half), β by ``warmup``,
    and ``method``'s training events after every epoch."""
    optimizer = make_adam(model.parameters(), lr)
    attach_optimizer(model, optimizer)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(epoch, epochs, epochs // 2)
        stats = train_epoch(
            model,
            optimizer,
            data.train_x,
            data.train_y,
            batch_size=batch_size,
            kl_weight=lambda done, epoch=epoch: kl_weight(epoch + done, *warmup),
            generator=generator,
        )
        method.epoch_end(model, epoch, epochs)
        bar.update(epoch + 1, f"β {stats['kl_weight']:.2f} loss {stats['loss']:.3f}")
    bar.close()


def run_demo(
    epochs: int = 60,
    pretrain_epochs: int = 60,
    seed: int = 0,
    lr: float = 3e-3,
    pretrain_lr: float = 3e-3,
    batch_size: int = 100,
    progress: bool = True,
    kl_warmup: int | None = None,
) -> dict[str, Any]:
    """Pretrain, compress with VBD and compare (see the module docstring).

    Returns the JSON fields of ``vbd demo --json`` (docs/JSON.md) plus ``report``
    (the :class:`~vbdropout.compress.CompressionReport`) and ``model_object`` (the VBD network).
    """
    if kl_warmup is not None and not 0 < kl_warmup <= epochs:
        raise ValueError(
            f"kl_warmup must be in [1, epochs = {epochs}] (β reaches 1 at its end), got {kl_warmup}"
        )
    torch.set_flush_denormal(True)  # as `vbd train` does (see train.trainer.train)
    data = load_dataset("digits")
    start = time.perf_counter()
    torch.manual_seed(seed)
    none = get_method("none")
    plain = build_model("lenet300_100", none, input_shape=data.input_shape)
    enabled = None if progress else False
    bar = ProgressBar(pretrain_epochs, "no dropout", enabled=enabled)
    _fit(none, plain, data, pretrain_epochs, pretrain_lr, (0, 0), seed, batch_size, bar)
    before = evaluate(plain, data.test_x, data.test_y)

    vbd = get_method("vbd")
    model = build_model("lenet300_100", vbd, input_shape=data.input_shape)
    model.load_state_dict(plain.state_dict())  # θ = trained weights, log σ² at its init
    bar = ProgressBar(epochs, "       VBD", enabled=enabled)
    warmup = (0, epochs if kl_warmup is None else kl_warmup)
    _fit(vbd, model, data, epochs, lr, warmup, seed + 1, batch_size, bar)
    after = evaluate(model, data.test_x, data.test_y)
    report = compression_report(model)
    summary = report.to_dict()
    return {
        "dataset": "sklearn digits",
        "model": "lenet300_100",
        "method": "vbd",
        "seed": seed,
        "pretrain_epochs": pretrain_epochs,
        "epochs": epochs,
        "kl_warmup": list(warmup),
        "train_size": len(data.train_y),
        "test_size": len(data.test_y),
        "test_error": after["error"],
        "test_nll": after["nll"],
        "baseline_test_error": before["error"],
        "baseline_test_nll": before["nll"],
        "compression_ratio": summary["compression_ratio"],
        "weights": summary["weights"],
        "nonzero": summary["nonzero"],
        "sparsity_per_layer": report.sparsity_per_layer(),
        "per_layer": summary["layers"],
        "input_pixels_kept": int(input_pixel_mask(model).sum()),
        "seconds": time.perf_counter() - start,
        "report": report,
        "model_object": model,
    }


def _variational_layers(model: nn.Module) -> list[tuple[str, GaussianWeight]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GaussianWeight)]


def input_pixel_mask(model: nn.Module) -> torch.Tensor:
    """8×8 boolean mask: the pixels that some kept weight of the first layer still reads."""
    _, first = _variational_layers(model)[0]
    return first.keep_mask().any(0).reshape(8, 8)


def plot_demo(results: dict[str, Any], path: str | Path) -> Path:
    """PNG: the log α histogram of each VBD layer and the first layer's 8×8 input mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = results["model_object"]
    layers = _variational_layers(model)
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.3 * (len(layers) + 1), 3.2))
    for ax, (name, layer), info in zip(axes, layers, results["per_layer"], strict=False):
        values = layer.log_alpha.detach().expand_as(layer.weight).flatten().numpy()
        ax.hist(values, bins=60, color="tab:blue")
        ax.axvline(layer.threshold, color="tab:red", linestyle="--", label="log α = 3")
        ax.set_title(f"layer {name}: {info['nonzero']} of {info['weights']} kept", fontsize=9)
        ax.set_xlabel("log α")
        ax.set_yscale("log")
    axes[0].set_ylabel("weights (log scale)")
    axes[0].legend(fontsize=7)
    mask = input_pixel_mask(model)
    axes[-1].imshow(mask.numpy(), cmap="gray", vmin=0, vmax=1)
    axes[-1].set_title(f"input pixels read: {int(mask.sum())} of 64", fontsize=9)
    axes[-1].set_xticks([])
    axes[-1].set_yticks([])
    fig.suptitle(
        f"VBD on sklearn digits (seed {results['seed']}): test error "
        f"{100 * results['test_error']:.2f}% "
        f"(no dropout {100 * results['baseline_test_error']:.2f}%), "
        f"{results['compression_ratio']:.0f}× fewer weights",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    check_plot_path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png.getvalue())
    return path


def check_plot_path(path: Path) -> None:
    """Refuse a picture path that cannot be written as a file (checked before training)."""
    if not path.name or path.is_dir():
        raise ValueError(
            f"--plot {path} is a folder; give a file name, e.g. {path / 'vbd-demo.png'}"
        )
    folder = next(folder for folder in path.parents if folder.exists())  # "." at least
    if not folder.is_dir():
        raise ValueError(f"--plot {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".vbd-plot-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"--plot {path}: cannot write in {folder} ({err.strerror or err})"
        ) from None


def format_demo(results: dict[str, Any]) -> str:
    """Human-readable summary of :func:`run_demo`'s results."""
    return "\n".join(
        [
            f"LeNet-300-100-shaped MLP on {results['dataset']} ({results['train_size']} training, "
            f"{results['test_size']} test images, seed {results['seed']}): trained without "
            f"dropout for {results['pretrain_epochs']} epochs, then compressed with VBD for "
            f"{results['epochs']} (KL warm-up over {results['kl_warmup'][1]})",
            f"  test error  before (no dropout) {100 * results['baseline_test_error']:.2f}%   "
            f"after (VBD) {100 * results['test_error']:.2f}%",
            f"  weights kept {results['nonzero']} of {results['weights']}: "
            f"|W|/|W≠0| = {results['compression_ratio']:.1f}  "
            f"(sparsity per layer {results['sparsity_per_layer']} %), "
            f"input pixels read {results['input_pixels_kept']} of 64",
            "",
            str(results["report"]),
        ]
    )
