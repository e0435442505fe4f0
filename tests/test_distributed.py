"""Data-parallel training on CPU: 2 processes match 1 process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vbdropout.io import load_checkpoint


def cli(out, shared_data, *extra):
    return [
        sys.executable, "-m", "vbdropout", "train", "--data-dir", str(shared_data),
        "--train-subset", "2000", "--epochs", "4", "--kl-warmup", "2", "3", "--device", "cpu",
        "--out", str(out), "--json", *extra,
    ]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(argv):
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_match_one_and_only_rank_0_writes(tmp_path, shared_data):
    one = run(cli(tmp_path / "one", shared_data))
    two = run(cli(tmp_path / "two", shared_data, "--nproc", "2"))
    assert two["config"]["nproc"] == 2
    # same data, schedule and global batch; only the noise streams differ
    assert two["test_error"] == pytest.approx(one["test_error"], abs=0.02)
    assert two["test_error"] < 0.2
    assert two["compression"]["weights"] == one["compression"]["weights"]
    names = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != "tensorboard")
    assert names == [
        ".vbdropout-run", "checkpoint.pt", "config.toml", "metrics.csv", "metrics.jsonl",
        "summary.json",
    ]  # fmt: skip
    rows = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == [1, 2, 3, 4]
    assert len(load_checkpoint(tmp_path / "two")["rng"]["torch_ranks"]) == 2


def test_a_killed_two_process_run_resumes(tmp_path, shared_data):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(out, shared_data, "--nproc", "2"), env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 1
    ):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    killed_at = load_checkpoint(out)["epoch"]
    assert 1 <= killed_at < 4
    summary = run(cli(out, shared_data, "--nproc", "2", "--resume"))
    rows = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert rows == [1, 2, 3, 4] and summary["epochs"] == 4
    with pytest.raises(AssertionError, match="config differs"):
        run(cli(out, shared_data, "--resume", "--nproc", "1"))  # nor with another world size


def test_two_compiled_processes_match_one_eager_process_without_noise(tmp_path, shared_data):
    """With --compile on each worker compiles its objective around the
    DistributedDataParallel model (the trial pass under no_sync, no CUDA graphs): ``none``
    trains as in one process."""
    args = ("--method", "none", "--epochs", "2")
    one = run(cli(tmp_path / "one", shared_data, *args, "--compile", "off"))
    two = run(cli(tmp_path / "two", shared_data, *args, "--compile", "on", "--nproc", "2"))
    assert two["step"] == "compiled (torch.compile, mode default)" and one["step"] == "eager"
    assert two["test_error"] == pytest.approx(one["test_error"], abs=2 / 10_000)
    a, b = load_checkpoint(tmp_path / "one")["model"], load_checkpoint(tmp_path / "two")["model"]
    for key in a:  # Adam's lr-sized rounding moves (see tests/test_compiled.py)
        assert (a[key] - b[key]).abs().max() < 2e-3, key
