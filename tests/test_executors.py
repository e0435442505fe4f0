"""`vbd reproduce --executor ray`: cells as Ray tasks on a local instance, a killed worker
resumed from its checkpoint, failures named, and bad input refused before anything is written."""

import json
import sys

import pytest
from fault_runner import reproduce_killing_a_run_midway

from vbdropout.cli import main

ray = pytest.importorskip("ray")

# two cells (the second re-evaluates the first's network) x two seeds
ARGV = ["reproduce", "table4", "--only", "^Ours .*lenet300_100", "--device", "cpu",
        "--seeds", "2", "--executor", "ray", "--json"]  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module; reproduce uses it as it finds it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_cells_run_as_ray_tasks_and_a_killed_worker_loses_nothing(
    local_ray, tmp_path, shared_data, capsys
):
    out = tmp_path / "results"
    argv = [*ARGV, "--epochs", "12", "--train-subset", "3000", "--out", str(out),
            "--data-dir", str(shared_data)]  # fmt: skip
    runs = out / "table4-custom-e12-n3000" / "runs"
    status, killed, before = reproduce_killing_a_run_midway(argv, runs)
    assert status == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted((c["label"], c["seed"]) for c in result["cells"]) == [
        ("Ours (high sparsity)", 0), ("Ours (high sparsity)", 1),
        ("Ours (low test error)", 0), ("Ours (low test error)", 1),
    ]  # fmt: skip
    assert all(c["epochs"] == 12 for c in result["cells"])
    # the retried task resumed: the epochs before the kill are the ones written then
    after = (killed / "metrics.jsonl").read_text()
    assert after.startswith(before)
    assert [json.loads(line)["epoch"] for line in after.splitlines()] == list(range(1, 13))
    assert json.loads((killed / "summary.json").read_text())["epochs"] == 12
    cells = sorted((out / "table4-custom-e12-n3000" / "cells").rglob("seed*.json"))
    assert len(cells) == 4
    recorded = json.loads(cells[0].read_text())
    assert recorded["command"] == " ".join(sys.argv), "the driver's command, not the worker's"
    assert (
        "| Ours (high sparsity) | lenet300_100 |"
        in (out / "table4-custom-e12-n3000.md").read_text()
    )


def test_a_failing_cell_on_ray_is_named_in_one_line(local_ray, tmp_path, capsys):
    """Every cell reports as it ends (the failures too); the error is one last line."""
    out = tmp_path / "results"
    empty = tmp_path / "no-data"
    empty.mkdir()
    argv = [a for a in ARGV if a != "--json"]
    assert main([*argv, "--epochs", "1", "--out", str(out), "--data-dir", str(empty)]) == 1
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert sorted(line.split("] ")[0] for line in progress) == [
        f"vbd reproduce: [{k}/4" for k in range(1, 5)
    ]
    assert all("failed: " in line for line in progress)
    assert "4 of 4 cells failed on Ray" in err
    assert "Ours (low test error) (lenet300_100) seed 0, " in err
    assert err.count("train-images-idx3-ubyte.gz: missing") == 1, "one reason, said once"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["--address", "nowhere"], "is not HOST:PORT"),
        (["--executor", "local", "--address", "127.0.0.1:1"], "an address is for --executor ray"),
    ],
)
def test_bad_ray_options_are_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    out = tmp_path / "results"
    assert main([*ARGV, "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_without_ray_the_error_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    out = tmp_path / "results"
    assert main([*ARGV, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert 'needs ray: pip install "vbdropout[ray]"' in err and len(err.splitlines()) == 1
    assert not out.exists()
