"""Every method through `vbd train`: the settings a run hands to it are the ones it means.

The trainer once gave its weight-level log α threshold (3) to every method with a
constructor option named ``threshold``: structured VBD then kept units up to
log α = 3 instead of 0, and SSL (whose ``threshold`` is an RMS cutoff of 1e−3)
removed every group. Each meaning now has its own name and each method declares
which run settings it takes (``Method.run_options``).
"""

import json

import pytest
import torch

from vbdropout.cli import main
from vbdropout.compress.shrink import neurons_per_layer, shrink
from vbdropout.models import METHODS
from vbdropout.nn.gaussian import GaussianWeight
from vbdropout.nn.ssl import GroupLasso
from vbdropout.nn.structured import StructuredVBD
from vbdropout.train.runs import load_run

pytest.importorskip("sklearn")  # the digits data set


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp_path, capsys, *args: str) -> tuple[dict, torch.nn.Module]:
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--out", str(out), "--json", *args]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _, _ = load_run(out)
    return summary, model


def _layers(model: torch.nn.Module, kind: type) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_through_the_cli_with_its_own_thresholds(method, tmp_path, capsys):
    summary, model = _train(
        tmp_path, capsys, "--model", "lenet300_100", "--method", method, "--epochs", "1"
    )
    assert summary["config"]["method"] == method
    assert summary["test_error"] < 0.9, "one epoch on digits beats chance (90% error)"
    for layer in _layers(model, StructuredVBD):
        assert layer.threshold == 0.0, "units are cut at log α = 0, not the weights' 3"
    for layer in _layers(model, GroupLasso):
        assert layer.rms_threshold == 1e-3
    if method in ("vbd", "sparse_vd"):
        assert {layer.threshold for layer in _layers(model, GaussianWeight)} == {3.0}
    if method == "ssl":  # the RMS cut did not remove every group after one epoch
        assert summary["compression"]["compression_ratio"] < 2


def test_each_threshold_option_reaches_only_its_own_layers(tmp_path, capsys):
    args = ("--model", "lenet300_100", "--epochs", "1")
    _, vbd = _train(
        tmp_path / "a", capsys, *args, "--method", "vbd", "--log-alpha-threshold", "2",
        "--unit-threshold", "-1",
    )  # fmt: skip
    assert {layer.threshold for layer in _layers(vbd, GaussianWeight)} == {2.0}
    _, structured = _train(
        tmp_path / "b", capsys, *args, "--method", "vbd_structured", "--log-alpha-threshold",
        "2", "--unit-threshold", "-1",
    )  # fmt: skip
    assert {layer.threshold for layer in _layers(structured, StructuredVBD)} == {-1.0}


def test_a_short_structured_vbd_run_prunes_hidden_units(tmp_path, capsys):
    """With the KL pushing every unit from the start, 10 epochs (150 steps) on digits remove
    a fifth or more of both hidden layers' units (measured 500 → 370, 300 → 218; with the
    KL frozen at initialization nothing was removed)."""
    summary, model = _train(
        tmp_path, capsys, "--model", "lenet500_300", "--method", "vbd_structured",
        "--epochs", "10", "--lr", "0.01",
    )  # fmt: skip
    _, hidden1, hidden2, classes = neurons_per_layer(shrink(model))
    assert hidden1 <= 400 and hidden2 <= 240 and classes == 10
    assert summary["test_error"] < 0.1
