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
    model = load_run(out).model
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


def test_each_threshold_option_reaches_its_own_layers(tmp_path, capsys):
    args = ("--model", "lenet300_100", "--epochs", "1")
    _, vbd = _train(tmp_path / "a", capsys, *args, "--method", "vbd", "--log-alpha-threshold", "2")
    assert {layer.threshold for layer in _layers(vbd, GaussianWeight)} == {2.0}
    _, structured = _train(
        tmp_path / "b", capsys, *args, "--method", "vbd_structured", "--unit-threshold", "-1"
    )
    assert {layer.threshold for layer in _layers(structured, StructuredVBD)} == {-1.0}


@pytest.mark.parametrize(
    ("method", "flag", "setting"),
    [
        ("vbd", ["--unit-threshold", "-1"], "unit_threshold"),
        ("vbd_structured", ["--log-alpha-threshold", "2"], "log_alpha_threshold"),
        ("sbp", ["--unit-threshold", "-1"], "unit_threshold"),
        ("none", ["--train-clip"], "train_clip"),
    ],
)
def test_a_setting_the_method_does_not_use_is_refused_in_one_line(
    method, flag, setting, tmp_path, capsys
):
    """Recorded in config.toml but unused, it would look as if the run had used it."""
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--method", method, *flag, "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method {method} does not use {setting}" in err[0]
    assert not out.exists()


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


def test_kl_scale_weighs_the_kl_term_and_prunes_more(tmp_path, capsys):
    """--kl-scale S trains N·E[CE] + S·β·KL: the β a run records is S times the warm-up's,
    and a heavier KL prunes more of the same network from the same seed."""
    args = ("--model", "lenet300_100", "--method", "vbd", "--epochs", "4", "--kl-warmup", "0", "1")
    plain, _ = _train(tmp_path / "plain", capsys, *args)
    heavy, _ = _train(tmp_path / "heavy", capsys, *args, "--kl-scale", "30")
    assert plain["config"]["kl_scale"] == 1.0 and heavy["config"]["kl_scale"] == 30.0
    rows = [
        [json.loads(line) for line in (tmp_path / run / "run" / "metrics.jsonl").open()]
        for run in ("plain", "heavy")
    ]
    assert [r["kl_weight"] for r in rows[0]][1:] == [1.0] * 3
    assert [r["kl_weight"] for r in rows[1]][1:] == [30.0] * 3
    assert heavy["compression"]["compression_ratio"] > plain["compression"]["compression_ratio"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "BAD"], "kl_scale must be a positive finite number, got nan"),
        (["--kl-scale", "0"], "--kl-scale"),
    ],
)
def test_a_bad_kl_scale_is_refused_in_one_line(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.toml"
    bad.write_text("kl_scale = nan\n")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--out", str(out)]
    argv += [str(bad) if a == "BAD" else a for a in args]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's usage error
        status = stop.code
    assert status in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not out.exists()


def test_kl_scale_is_fixed_for_a_resumed_run(tmp_path, capsys):
    args = ("--model", "lenet300_100", "--method", "vbd", "--epochs", "1")
    _train(tmp_path, capsys, *args)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--resume", "--epochs", "2", "--kl-scale", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kl_scale" in err
