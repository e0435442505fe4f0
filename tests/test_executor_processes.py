"""`vbd reproduce --executor processes`: cells in worker processes on this machine, the same
files as the local executor, a killed worker resumed from its checkpoint, an interrupted
table stopped with its runs resumable, failures named, and bad options refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_runner import reproduce_killing_a_run_midway

from vbdropout.cli import main
from vbdropout.experiments.executors import threads_per_worker

# two cells (the second re-evaluates the first's network) x two seeds
ARGV = ["reproduce", "table4", "--only", "^Ours .*lenet300_100", "--device", "cpu",
        "--seeds", "2", "--json"]  # fmt: skip
WORKERS = ["--executor", "processes", "--workers", "2"]


def _cells(out: Path) -> dict[str, dict]:
    return {
        f"{path.parent.name}/{path.name}": json.loads(path.read_text())
        for path in sorted(out.rglob("cells/*/seed*.json"))
    }


def test_worker_processes_write_the_cells_the_local_executor_writes(tmp_path, shared_data, capsys):
    small = ["--epochs", "2", "--train-subset", "2000", "--data-dir", str(shared_data)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_worker(2))  # a worker's threads: the same sums
    try:
        assert main([*ARGV, *small, "--out", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(before)
    assert main([*ARGV, *small, *WORKERS, "--out", str(tmp_path / "workers")]) == 0
    capsys.readouterr()
    local, workers = _cells(tmp_path / "local"), _cells(tmp_path / "workers")
    assert len(local) == 4 and local.keys() == workers.keys()
    for key, cell in local.items():
        theirs = workers[key]
        for field in ("test_error", "compression", "epochs", "seed", "label", "command"):
            assert theirs[field] == cell[field], (key, field)
    assert (
        "| Ours (high sparsity) |"
        in (tmp_path / "workers" / "table4-custom-e2-n2000.md").read_text()
    )


def test_a_killed_worker_is_started_again_and_resumes_its_run(tmp_path, shared_data, capsys):
    out = tmp_path / "results"
    argv = [*ARGV, *WORKERS, "--epochs", "12", "--train-subset", "3000", "--out", str(out),
            "--data-dir", str(shared_data)]  # fmt: skip
    runs = out / "table4-custom-e12-n3000" / "runs"
    status, killed, before = reproduce_killing_a_run_midway(argv, runs)
    assert status == 0, capsys.readouterr().err
    after = (killed / "metrics.jsonl").read_text()
    assert after.startswith(before), "the restarted worker resumed the killed run"
    assert [json.loads(line)["epoch"] for line in after.splitlines()] == list(range(1, 13))
    cells = _cells(out)
    assert len(cells) == 4 and all(c["epochs"] == 12 for c in cells.values())


def test_failing_cells_are_named_in_one_line_and_their_dependents_not_started(tmp_path, capsys):
    """Every cell reports as it ends; a row that re-evaluates a failed row's network
    fails without starting; the error is one last line."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    argv = [a for a in ARGV if a != "--json"]
    out = tmp_path / "results"
    assert (
        main([*argv, *WORKERS, "--epochs", "1", "--out", str(out), "--data-dir", str(empty)]) == 1
    )
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert sorted(line.split("] ")[0] for line in progress) == [
        f"vbd reproduce: [{k}/4" for k in range(1, 5)
    ]
    assert all("failed: " in line for line in progress)
    assert err.startswith("vbd reproduce: error: 4 of 4 cells failed in worker processes: ")
    assert err.count("train-images-idx3-ubyte.gz: missing") == 1, "one reason, said once"
    assert "Ours (high sparsity) (lenet300_100) seed 0, Ours (high sparsity) (lenet300_100) " \
        "seed 1: a cell it starts from failed" in err  # fmt: skip


def test_an_interrupted_table_stops_its_workers_and_resumes(tmp_path, shared_data):
    """SIGTERM to `vbd reproduce`: one line, exit 130, no worker left running; the same
    command then finishes the table, resuming the interrupted runs."""
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "vbdropout", *ARGV, *WORKERS, "--epochs", "30",
            "--train-subset", "2000", "--out", str(out),
            "--data-dir", str(shared_data)]  # fmt: skip
    runs = out / "table4-custom-e30-n2000" / "runs"
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.read_text().count("\n") >= 1 for p in runs.glob("*/metrics.jsonl")):
        assert time.monotonic() < deadline and driver.poll() is None, "no epoch was written"
        time.sleep(0.05)
    workers = [int(p.read_text()) for p in runs.glob("*/.lock")]
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130
    assert err.strip().splitlines() == ["vbd reproduce: SIGTERM"], err
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    before = {p.parent.name: p.read_text() for p in runs.glob("*/metrics.jsonl")}
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    for name, lines in before.items():
        assert (runs / name / "metrics.jsonl").read_text().startswith(lines), name
    assert len(_cells(out)) == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "2"], "a worker count is for --executor processes, not local"),
        (["--executor", "ray", "--workers", "2"], "a worker count is for --executor processes"),
        ([*WORKERS, "--address", "127.0.0.1:1"], "an address is for --executor ray"),
    ],
)
def test_bad_worker_options_are_refused_before_anything_is_written(
    tmp_path, capsys, extra, message
):
    out = tmp_path / "results"
    assert main([*ARGV, "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_zero_workers_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(
            [*ARGV, "--out", str(tmp_path / "results"), "--executor", "processes", "--workers", "0"]
        )
    assert stop.value.code == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
