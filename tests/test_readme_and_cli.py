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


def test_demo_json_is_the_last_line(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--epochs", "3", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    for key in ("test_error", "baseline_test_error", "compression_ratio", "per_layer"):
        assert key in result
    assert 0 <= result["test_error"] <= 1
    assert [layer["weights"] for layer in result["per_layer"]] == [64 * 300, 300 * 100, 1000]


def test_demo_human_output(capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "test error" in out and "|W|/|W≠0|" in out


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
