"""The README's example runs, and the `vbd demo` command keeps its JSON contract."""

import json
import re
from pathlib import Path

import pytest
import torch

from vbdropout.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README.md must contain the python examples"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["probs"].shape == (100, 10)
    exec(compile(blocks[1], str(README), "exec"), namespace)
    assert namespace["loss"].dim() == 0
    assert type(namespace["plain"][4]) is torch.nn.Linear
    assert (tmp_path / "export" / "mynet" / "shrunk.pt").is_file()
    assert namespace["report"]["shrunk_parts"] == "whole model"


def test_readme_lightning_example_runs(tmp_path, monkeypatch):
    """The Lightning block as written, on the previous block's ``net``, with small loaders
    and 2 epochs instead of 200 (the only change)."""
    pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.chdir(tmp_path)  # Lightning writes its logs here
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    lightning = next(b for b in blocks if "import lightning" in b)
    assert "max_epochs=200" in lightning
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=generator), torch.arange(64) % 10)
    namespace: dict = {
        "net": torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 10),
        ),
        "train_loader": DataLoader(data, batch_size=16),
        "val_loader": DataLoader(data, batch_size=32),
    }
    source = lightning.replace("max_epochs=200", "max_epochs=2, enable_progress_bar=False")
    exec(compile(source, str(README), "exec"), namespace)
    logged = namespace["trainer"].callback_metrics
    assert {"train/nll", "train/kl", "val/error", "sparsity", "compression_ratio"} <= set(logged)


def test_demo_json_fields_and_picture(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    picture = tmp_path / "pics" / "demo.png"
    argv = ["demo", "--pretrain-epochs", "3", "--epochs", "4", "--plot", str(picture), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err, "no progress line when stderr is not a terminal"
    result = json.loads(captured.out.strip().splitlines()[-1])
    for key in ("test_error", "baseline_test_error", "test_nll", "baseline_test_nll"):
        assert 0 <= result[key] <= 5
    assert result["plot"] == str(picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [layer["weights"] for layer in result["per_layer"]] == [64 * 300, 300 * 100, 1000]
    assert result["weights"] == 50_200
    assert result["nonzero"] == sum(layer["nonzero"] for layer in result["per_layer"])
    assert result["compression_ratio"] == pytest.approx(result["weights"] / result["nonzero"])
    assert 0 < result["input_pixels_kept"] <= 64
    # the KL warm-up spans the whole VBD phase unless --kl-warmup shortens it
    assert (result["pretrain_epochs"], result["epochs"], result["kl_warmup"]) == (3, 4, [0, 4])
    assert (result["train_size"], result["test_size"]) == (1437, 360)


def test_demo_compresses_the_trained_network_not_a_fresh_one(tmp_path, capsys):
    """With a vanishing VBD learning rate the network stays the pretrained one."""
    pytest.importorskip("sklearn")
    argv = ["demo", "--pretrain-epochs", "20", "--epochs", "1", "--lr", "1e-12"]
    assert main([*argv, "--plot", str(tmp_path / "d.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["baseline_test_error"] < 0.2  # trained (chance is 0.9)
    assert result["test_error"] == pytest.approx(result["baseline_test_error"], abs=0.01)


def test_demo_kl_warmup_flag_sets_the_schedule(tmp_path, capsys):
    pytest.importorskip("sklearn")
    argv = ["demo", "--pretrain-epochs", "1", "--epochs", "3", "--kl-warmup", "1", "--json"]
    assert main([*argv, "--plot", str(tmp_path / "d.png")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["epochs"], result["kl_warmup"]) == (3, [0, 1])


def test_demo_human_output(tmp_path, capsys):
    pytest.importorskip("sklearn")
    picture = tmp_path / "demo.png"
    assert main(["demo", "--pretrain-epochs", "2", "--epochs", "2", "--plot", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "before (no dropout)" in out and "after (VBD)" in out and "|W|/|W≠0|" in out
    if picture.exists():
        assert f"picture of the learned dropout rates: {picture}" in out


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--lr", "x"], ["nope"]])
def test_bad_cli_values_give_a_one_line_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_resume_reads_the_runs_own_config(tmp_path, shared_data, capsys):
    out = str(tmp_path / "run")
    first = ["train", "--method", "sparse_vd", "--data-dir", str(shared_data), "--epochs", "1"]
    assert main([*first, "--train-subset", "300", "--out", out, "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "sparse_vd" and summary["config"]["train_subset"] == 300
    assert main(["train", "--out", out, "--resume", "--batch-size", "50"]) == 1
    assert "config differs in ['batch_size']" in capsys.readouterr().err


def test_train_help_groups_options_states_defaults_and_lists_methods(capsys):
    from vbdropout.cli import build_parser
    from vbdropout.models import METHODS

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    groups = {g.title: g for g in train._action_groups}
    for title in ("model and data", "schedule (defaults: the model's protocol, above)", "run"):
        assert title in groups
    for action in train._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in (action.help or ""), f"{action.option_strings} states no default"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for name, cls in METHODS.items():
        summary = cls.__doc__.strip().splitlines()[0]
        assert f"{name:<21} {summary}" in text and f"{name:<21} {summary}" in top


def test_every_train_config_field_but_network_is_a_train_flag():
    """``vbd train`` takes its config fields from the dataclass: a field added to TrainConfig
    without a flag of its name (or a flag renamed away from its field) fails here."""
    import dataclasses

    from vbdropout.cli import build_parser
    from vbdropout.cli.train import train_fields
    from vbdropout.train import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {action.dest for action in train._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_fields() == fields - {"network"}
    assert train_fields() <= dests, sorted(train_fields() - dests)
