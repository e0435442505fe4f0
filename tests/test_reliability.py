"""Fault suite (issue 10): kills, concurrent runs, divergence, untrusted checkpoints, bad data.

Every test here injects a real fault and checks that nothing is lost or corrupted.
The run tests use real MNIST (600 training examples) from ``../shared/datasets``;
the kill test forks its runs from :mod:`fault_runner` so that a dozen of them fit
in well under a minute on two cores. docs/RELIABILITY.md summarizes the outcomes.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from data_fakes import (
    cifar_batch,
    flip_byte,
    idx_bytes,
    snapshot,
    write_cifar,
    write_gz,
    write_mnist,
    write_pickle,
    write_sums,
    write_svhn,
)
from fault_runner import ForkServer
from torch import nn

from vbdropout import kernels
from vbdropout.cli import main
from vbdropout.data import DataError, load_dataset
from vbdropout.io import FAULT_ENV, CheckpointError, load_checkpoint
from vbdropout.models import METHODS, build_model
from vbdropout.models.methods import method_class
from vbdropout.nn import LinearVBD
from vbdropout.nn.base import attach_optimizer
from vbdropout.priors import LOG_ALPHA_RANGE
from vbdropout.train import DivergenceError, TrainConfig, train, train_epoch
from vbdropout.train.loop import REPORT_EVERY, make_adam
from vbdropout.train.rundir import _alive, _holder_pid
from vbdropout.train.runs import load_run

EPOCHS = 16  # of the runs that are killed, raced and compared
SUBSET = 600  # training examples: 6 steps of 100 per epoch
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_argv(out: Path, data_dir: Path, *extra: str) -> list[str]:
    """``vbd train`` arguments of the run that the kill and concurrency tests use."""
    return [
        "train", "--model", "lenet300_100", "--method", "vbd", "--dataset", "mnist",
        "--data-dir", str(data_dir), "--train-subset", str(SUBSET), "--epochs", str(EPOCHS),
        "--kl-warmup", "2", "6", "--device", "cpu", "--out", str(out), "--json", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    fork_server = ForkServer(ENV)
    yield fork_server
    fork_server.close()


@pytest.fixture(scope="module")
def reference(
    server: ForkServer, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[], Path]:
    """An uninterrupted run, started at once; calling the fixture waits for it."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pid = server.spawn(run_argv(out, shared_data), out.parent / "log")
    status: list[int] = []

    def finished() -> Path:
        if not status:
            status.append(server.wait(pid))
        assert status[0] == 0, (out.parent / "log").read_text()
        return out

    return finished


# ---------------------------------------------------------------- comparing runs


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Bit-identical nested checkpoint content (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_run(run: Path, ref: Path) -> None:
    """Same model, optimizer, RNG and scheduler state, metrics and summary as ``ref``."""
    a, b = load_checkpoint(run), load_checkpoint(ref)
    for key in ("model", "optimizer", "scheduler", "rng", "epoch"):
        assert_same(a[key], b[key], key)
    assert without_timing(a["history"]) == without_timing(b["history"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(rows) == without_timing(b["history"])
    summary, ref_summary = (json.loads((p / "summary.json").read_text()) for p in (run, ref))
    for key in ("test_error", "test_nll", "compression"):
        assert summary[key] == ref_summary[key], key


def checkpoint_epoch(out: Path) -> int:
    """Epoch of the run's checkpoint (0 if none); fails if a checkpoint is unreadable."""
    return load_checkpoint(out)["epoch"] if (out / "checkpoint.pt").exists() else 0


def metrics_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


# ---------------------------------------------------------------- kills

# (kind, what): "write" SIGKILLs the run from inside the N-th atomic write of a file
# (half of the temp file written; see vbdropout.io), "startup" kills it
# at a random time before half its remaining epochs could have run (at most 1 s
# after its start), "epoch" at a random time within the epoch after one more
# finished epoch. The delays follow the measured pace of the uninterrupted
# reference run, so that a kill never comes after a fast run has already finished.
KILLS = [
    ("write", "config.toml:1"),
    ("startup", ""),
    ("epoch", ""),
    ("write", "checkpoint.pt:2"),
    ("epoch", ""),
    ("write", "metrics.jsonl:next"),
    ("startup", ""),
    ("epoch", ""),
    ("write", "checkpoint.pt:1"),
    ("epoch", ""),
    ("write", "checkpoint.pt:last"),
    ("write", "summary.json:1"),
]


def fault_spec(what: str, epoch: int) -> str:
    """``NAME:N`` for the fault hook, resolving 'next' and 'last' for a run at ``epoch``."""
    name, nth = what.split(":")
    if nth == "next":  # a resumed run first rewrites metrics.jsonl, then once per epoch
        nth = "2" if epoch else "1"
    elif nth == "last":  # the checkpoint of the final epoch
        nth = str(EPOCHS - epoch)
    return f"{name}:{nth}"


def wait_for_rows(server: ForkServer, pid: int, out: Path, rows: int) -> None:
    """Wait until the run has written ``rows`` metrics rows (and is still running)."""
    deadline = time.monotonic() + 120
    while metrics_rows(out) < rows:
        assert server.poll(pid) is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no metrics row {rows} within 120 s"
        time.sleep(0.01)


def epoch_seconds(run: Path) -> float:
    """Median training time of one epoch of a finished run (its metrics rows)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sorted(row["seconds"] for row in rows)[len(rows) // 2]


def kill_once(
    server: ForkServer,
    argv: list[str],
    kind: str,
    what: str,
    rng: random.Random,
    log: Path,
    epoch_time: float,
) -> str:
    """Start the run, SIGKILL it as ``kind`` says (random delays scaled by ``epoch_time``,
    the seconds one epoch takes); returns the fault hook spec (or "")."""
    out = Path(argv[argv.index("--out") + 1])
    epoch = checkpoint_epoch(out)
    spec = fault_spec(what, epoch) if kind == "write" else ""
    pid = server.spawn(argv, log, {FAULT_ENV: spec} if spec else {})
    if kind == "write":
        status = server.wait(pid)
    else:
        if kind == "epoch":
            assert epoch + 1 < EPOCHS, "the kill plan needs more epochs"
            wait_for_rows(server, pid, out, epoch + 1)
            time.sleep(rng.uniform(0.0, epoch_time))
        else:
            time.sleep(rng.uniform(0.0, min(1.0, (EPOCHS - epoch) * epoch_time / 2)))
        status = server.kill(pid)
    assert status == -signal.SIGKILL, f"{kind} {what}: status {status}\n{log.read_text()}"
    return spec


def check_after_write_kill(out: Path, spec: str, epoch_before: int) -> list[Path]:
    """The kill landed inside the write: one torn temp file, the previous file intact."""
    name, nth = spec.split(":")
    stray = sorted(out.glob(f".{name}.*.tmp"))
    assert len(stray) == 1, f"expected the torn temp file of {name}, found {stray}"
    epoch = checkpoint_epoch(out)
    if name == "checkpoint.pt":
        assert epoch == epoch_before + int(nth) - 1
        assert 0 < stray[0].stat().st_size < (out / name).stat().st_size
    elif name == "metrics.jsonl":
        assert epoch == epoch_before + 1 and metrics_rows(out) == epoch - 1  # metrics lag
    elif name == "summary.json":
        assert epoch == EPOCHS and not (out / name).exists()
    elif name == "config.toml":
        assert epoch == 0 and not (out / name).exists()
    return stray


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(
    server: ForkServer, reference: Callable[[], Path], shared_data: Path, tmp_path: Path
) -> None:
    rng = random.Random(10)
    out = tmp_path / "run"
    argv = run_argv(out, shared_data, "--resume")
    epoch_time = epoch_seconds(reference())
    epochs, strays, landed_in_write = [], [], 0
    for trial, (kind, what) in enumerate(KILLS):
        before = checkpoint_epoch(out)
        log = tmp_path / f"log{trial}"
        spec = kill_once(server, argv, kind, what, rng, log, epoch_time)
        epochs.append(checkpoint_epoch(out))  # it loads: the checkpoint is never torn
        assert epochs[-1] >= before, "a kill lost a finished epoch"
        if spec:
            strays += check_after_write_kill(out, spec, before)
        else:
            landed_in_write += bool(list(out.glob(".*.tmp")))
    pid = server.spawn(argv, tmp_path / "final.log")
    assert server.wait(pid) == 0, (tmp_path / "final.log").read_text()
    assert_same_run(out, reference())
    assert not any(path.exists() for path in strays), "a torn temp file was left behind"
    names = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")
    assert names == [
        ".vbdropout-run", "checkpoint.pt", "config.toml", "metrics.csv", "metrics.jsonl",
        "summary.json",
    ]  # fmt: skip
    print(
        f"\n{len(KILLS)} kills; checkpoint epoch after each: {epochs}; "
        f"random kills that landed inside a write: {landed_in_write}"
    )


# ---------------------------------------------------------------- concurrent runs


def lock_refusal(out: Path, pid: int) -> str:
    return (
        f"vbd train: error: {out} is in use by another training process (pid {pid}); wait "
        f"for it or choose another --out (if no such process is running, delete {out / '.lock'})"
    )


def test_two_runs_started_together_on_one_dir_do_not_corrupt_it(
    server: ForkServer, reference: Callable[[], Path], shared_data: Path, tmp_path: Path
) -> None:
    """Two fresh ``python -m vbdropout`` processes on one directory and, at the same time,
    two forked ``--resume`` runs on another: one of each pair runs, the other is refused."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resume"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vbdropout", *run_argv(fresh, shared_data)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    argv, logs = run_argv(resumed, shared_data, "--resume"), [tmp_path / "log0", tmp_path / "log1"]
    pids = [server.spawn(argv, log) for log in logs]
    errs = [proc.communicate(timeout=300)[1].strip() for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], f"exit codes {codes}: {errs}"
    winner = codes.index(0)
    assert errs[1 - winner] == lock_refusal(fresh, procs[winner].pid)
    codes = [server.wait(pid) for pid in pids]
    assert sorted(codes) == [0, 1], f"exit codes {codes}"
    winner = codes.index(0)
    *notes, refusal = logs[1 - winner].read_text().strip().splitlines()
    assert refusal == lock_refusal(resumed, pids[winner])
    # a --resume that looked before the winner marked the directory says it starts anew
    assert notes in ([], [f"vbd train: no run in {resumed} to resume: starting a new one"])
    for out in (fresh, resumed):
        assert_same_run(out, reference())


# ---------------------------------------------------------------- divergence


def tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A two-layer VBD net and 20 examples: 4 steps of 5."""
    torch.manual_seed(seed)
    model = nn.Sequential(LinearVBD(4, 8), nn.ReLU(), LinearVBD(8, 3))
    return model, torch.randn(20, 4), torch.randint(0, 3, (20,))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_tiny_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: Any = None) -> None:
    optimizer = opt or torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, optimizer, x, y, batch_size=5, kl_weight=1.0)


def test_nan_gradient_is_refused_before_the_update() -> None:
    model, x, y = tiny_problem()
    calls, before = [], {}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) < 2:
            return grad
        before.update(params_of(model))  # the parameters after step 1
        return grad * math.nan

    model[2].log_sigma2.register_hook(poison)
    with pytest.raises(DivergenceError, match=r"^step 2/4: the gradient of 2\.log_sigma2 is NaN"):
        run_tiny_epoch(model, x, y)
    assert_same(params_of(model), before, "parameters")


def test_nan_loss_and_overflowing_update_and_activations_are_divergence() -> None:
    model, x, y = tiny_problem()
    model[2].register_forward_hook(lambda m, i, out: out * math.nan if m.training else out)
    with pytest.raises(DivergenceError, match=r"^step 1/4: loss=nan kl=\S+ \(the update was not"):
        run_tiny_epoch(model, x, y)

    class Overflow(torch.optim.SGD):
        def step(self, closure: Any = None) -> None:
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(math.inf)

    model, x, y = tiny_problem()
    with pytest.raises(DivergenceError, match=r"^step 1/4: parameter 0\.weight became NaN/inf"):
        run_tiny_epoch(model, x, y, Overflow(model.parameters(), lr=0.1))

    model, x, y = tiny_problem()
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # finite, but x·W overflows
    with pytest.raises(DivergenceError, match=r"^step 1/4: the forward pass overflowed"):
        run_tiny_epoch(model, x.abs() + 1, y)


def test_sigma2_overflow_is_divergence_and_nan_data_is_not() -> None:
    model, x, y = tiny_problem()
    with torch.no_grad():
        model[2].log_sigma2.fill_(100.0)  # σ² = exp(100) = inf in float32
    assert torch.isinf(model[2].sigma2()).all()
    assert model[2].log_alpha.max().item() == LOG_ALPHA_RANGE[1]  # log α itself stays clipped
    before = params_of(model)
    # the loss is NaN, unless the layer itself already refuses its non-finite output
    with pytest.raises(DivergenceError, match=r"^step 1/4: (loss=nan|the forward pass overflowed)"):
        run_tiny_epoch(model, x, y)
    assert_same(params_of(model), before, "parameters")
    model, x, y = tiny_problem()
    x[3, 1] = math.nan
    with pytest.raises(ValueError, match="got an input containing NaN or inf") as info:
        run_tiny_epoch(model, x, y)
    assert not isinstance(info.value, DivergenceError)


def test_divergence_mid_run_keeps_the_last_good_checkpoint_byte_identical(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN gradient in the last step of epoch 2 (NaN log σ² would not even break eval)."""
    import vbdropout.train.trainer as trainer

    out = tmp_path / "run"
    files = ("checkpoint.pt", "metrics.jsonl", "metrics.csv", "config.toml")
    seen: dict[str, bytes] = {}
    build = trainer.build_run_model

    def poisoned_model(config: TrainConfig, data: Any, method: Any = None) -> nn.Module:
        model = build(config, data, method)
        calls = []

        def poison(grad: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) < 12:  # epoch 2, step 6 of 6
                return grad
            seen.update({name: (out / name).read_bytes() for name in files})
            return grad * math.nan

        model[5].log_sigma2.register_hook(poison)
        return model

    monkeypatch.setattr(trainer, "build_run_model", poisoned_model)
    config = TrainConfig(
        model="lenet300_100", dataset="mnist", data_dir=str(shared_data), out=str(out),
        epochs=3, train_subset=SUBSET, kl_warmup=(1, 2), device="cpu",
    )  # fmt: skip
    with pytest.raises(DivergenceError) as info:
        train(config, progress=False)
    assert re.fullmatch(
        r"training diverged in epoch 2, step 6/6: the gradient of 5\.log_sigma2 is NaN/inf at "
        r"loss=\S+ kl=\S+ \(the update was not applied\); the last good checkpoint \(epoch 1\) "
        rf"in {re.escape(str(out))} is kept unchanged",
        str(info.value),
    ), str(info.value)
    assert {name: (out / name).read_bytes() for name in files} == seen
    state = load_checkpoint(out)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    kept = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")
    assert kept == sorted([".vbdropout-run", *files])  # no summary, lock or temp


def test_cli_reports_divergence_in_one_line(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = run_argv(out, shared_data, "--lr", "1e30")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"vbd train: error: training diverged in epoch 1, step \d/6: .+; "
        rf"no checkpoint was written to {re.escape(str(out))}",
        err,
    ), err
    assert not (out / "checkpoint.pt").exists()


# ------------------------------------------- divergence checked once per epoch (GPU path)


def deferred_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    checks: str,
    epochs: int = 1,
    lr: float = 1e-2,
) -> tuple[list[dict[str, float]], torch.optim.Optimizer]:
    """``epochs`` epochs of fused Adam with ``checks``, the shuffling and noise seeded."""
    optimizer = make_adam(model.parameters(), lr)
    torch.manual_seed(1)
    shuffle = torch.Generator().manual_seed(2)
    stats = [
        train_epoch(
            model, optimizer, x, y, batch_size=5, kl_weight=0.5, generator=shuffle, checks=checks
        )
        for _ in range(epochs)
    ]
    return stats, optimizer


def test_checks_once_per_epoch_train_exactly_like_checks_at_every_step() -> None:
    runs = {}
    for checks in ("step", "epoch"):
        model, x, y = tiny_problem()
        stats, optimizer = deferred_epochs(model, x, y, checks, epochs=3)
        runs[checks] = stats, model, optimizer.state_dict()["state"]
    (stats, model, moments), (stats_e, model_e, moments_e) = runs["step"], runs["epoch"]
    assert_same(model_e.state_dict(), model.state_dict(), "parameters")
    for key, state in moments.items():
        assert_same(moments_e[key], state, f"Adam state {key}")
    for one, other in zip(stats, stats_e, strict=True):
        assert one.keys() == other.keys()
        for key in ("loss", "nll", "kl", "kl_weight", "train_error"):  # the same float32s,
            assert other[key] == one[key], key  # summed in the same order
    # the layers' NaN checks, off during the epochs, are back as they were
    assert all(m.check_finite and "check_finite" not in vars(m) for m in (model_e[0], model_e[2]))


def test_checks_once_per_epoch_skip_the_failing_update_and_every_later_one() -> None:
    model, x, y = tiny_problem()
    calls, before = [], {}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            before.update(params_of(model))  # the parameters after step 1
        return grad * math.nan if len(calls) == 2 else grad  # only step 2's gradient

    model[2].log_sigma2.register_hook(poison)
    optimizer = make_adam(model.parameters(), 1e-2)
    model[0].check_finite = True  # an instance's own setting is restored as it was
    moments = {}
    optimizer.register_step_post_hook(
        lambda opt, *_: moments or moments.update(copy.deepcopy(opt.state_dict()["state"]))
    )
    with pytest.raises(
        DivergenceError,
        match=r"^step 2/4: the gradient of 2\.log_sigma2 is NaN/inf at loss=\S+ kl=\S+ "
        r"\(neither this update nor a later one of the epoch was applied\)$",
    ):
        train_epoch(model, optimizer, x, y, batch_size=5, kl_weight=1.0, checks="epoch")
    assert len(calls) == 4  # the epoch ran to its end, steps 3 and 4 skipped on the device
    assert_same(params_of(model), before, "parameters")
    assert_same(optimizer.state_dict()["state"], moments, "Adam state after step 1")
    assert [float(state["step"]) for state in optimizer.state.values()] == [1.0] * 6
    assert vars(model[0])["check_finite"] is True
    assert model[2].check_finite and "check_finite" not in vars(model[2])


def test_checks_once_per_epoch_report_a_nan_loss_and_an_overflowing_update() -> None:
    model, x, y = tiny_problem()
    model[2].register_forward_hook(lambda m, i, out: out * math.nan if m.training else out)
    before = params_of(model)
    with pytest.raises(DivergenceError, match=r"^step 1/4: loss=nan kl=\S+ \(neither this"):
        deferred_epochs(model, x, y, "epoch")
    assert_same(params_of(model), before, "parameters")
    for checks in ("step", "epoch"):  # an Adam step of 1e39 leaves float32
        model, x, y = tiny_problem()
        with pytest.raises(DivergenceError, match=r"^step 1/4: parameter 0\.\S+ became NaN/inf"):
            deferred_epochs(model, x, y, checks, lr=1e39)
    model, x, y = tiny_problem()

    model, x, y = tiny_problem()  # finite parameters whose update makes σ² = exp(log σ²) inf
    optimizer = make_adam(model.parameters(), 1e-3)
    optimizer.register_step_post_hook(lambda *_: model[2].log_sigma2.data.fill_(1e4))
    with pytest.raises(DivergenceError, match=r"^step 1/4: the update made 2\.sigma2 = exp"):
        train_epoch(model, optimizer, x, y, batch_size=5, kl_weight=1.0, checks="epoch")
    with pytest.raises(ValueError, match=r"checks='epoch' needs a fused torch\.optim\.Adam"):
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
                    batch_size=5, kl_weight=1.0, checks="epoch")  # fmt: skip
    with pytest.raises(ValueError, match="checks must be 'step' or 'epoch', got 'never'"):
        deferred_epochs(model, x, y, "never")


def test_checks_once_per_epoch_read_progress_every_report_interval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LinearVBD(4, 3))
    x, y = torch.randn(REPORT_EVERY * 5 + 7, 4), torch.randint(0, 3, (REPORT_EVERY * 5 + 7,))
    seen: list[int] = []
    optimizer = make_adam(model.parameters(), 1e-3)
    stats = train_epoch(
        model, optimizer, x, y, batch_size=5, kl_weight=1.0, checks="epoch",
        on_batch=lambda step, running: seen.append(step),
    )  # fmt: skip
    steps = -(-len(x) // 5)
    assert seen == [*range(REPORT_EVERY, steps, REPORT_EVERY), steps]
    assert 0 < stats["train_error"] < 1


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("dns", "sws")])
def test_checks_once_per_epoch_read_the_device_a_fixed_number_of_times_per_epoch(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path's contract, counted on the CPU: no host read per step, whatever the
    method (DNS draws its surgery and SWS reads whether its prior is on at every step)."""
    reads = {name: 0 for name in HOST_READS}

    def counted(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads[name] += 1
            return original(self, *args, **kwargs)

        return read

    counts = []
    previous = kernels.set_enabled(False)  # the layers' eager path, which CUDA runs
    try:
        for steps in (3, 6):
            torch.manual_seed(0)
            run = {"log_alpha_threshold": 3.0, "unit_threshold": 0.0, "train_clip": True}
            model = build_model(
                "lenet5_caffe", method_class(method).from_run(run | {"dataset_size": 600})
            )
            optimizer = make_adam(model.parameters(), 1e-3)
            attach_optimizer(model, optimizer)
            x, y = torch.randn(steps * 20, 1, 28, 28), torch.randint(0, 10, (steps * 20,))
            with monkeypatch.context() as patch:
                for name in HOST_READS:
                    patch.setattr(torch.Tensor, name, counted(name))
                train_epoch(model, optimizer, x, y, batch_size=20, kl_weight=1.0, checks="epoch")
            counts.append(dict(reads))
            reads.update(dict.fromkeys(HOST_READS, 0))
    finally:
        kernels.set_enabled(previous)
    assert counts[0] == counts[1], counts  # the same reads for 3 steps and for 6
    assert sum(counts[0].values()) <= 3, counts[0]


def test_a_run_checked_once_per_epoch_keeps_its_last_good_checkpoint(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's GPU path (checks once per epoch), forced on the CPU."""
    import vbdropout.train.trainer as trainer

    monkeypatch.setattr(trainer, "checks_for", lambda device, optimizer: "epoch")
    out = tmp_path / "run"
    config = TrainConfig(
        model="lenet300_100", dataset="mnist", data_dir=str(shared_data), out=str(out),
        epochs=2, train_subset=SUBSET, device="cpu", lr=1e30,
    )  # fmt: skip
    with pytest.raises(DivergenceError) as info:
        train(config, progress=False)
    assert re.fullmatch(
        rf"training diverged in epoch 1, step 1/6: .+ \(.+\); no checkpoint was written to "
        rf"{re.escape(str(out))}",
        str(info.value),
    ), str(info.value)
    assert not (out / "checkpoint.pt").exists()
    config = TrainConfig(
        model="lenet300_100", dataset="mnist", data_dir=str(shared_data), out=str(tmp_path / "ok"),
        epochs=2, train_subset=SUBSET, device="cpu",
    )  # fmt: skip
    summary = train(config, progress=False)
    monkeypatch.undo()
    config = dataclasses.replace(config, out=str(tmp_path / "per-step"))
    assert train(config, progress=False)["test_error"] == summary["test_error"]


def test_trained_log_alpha_and_sigma2_stay_in_their_ranges(
    reference: Callable[[], Path], shared_data: Path
) -> None:
    model = load_run(reference(), str(shared_data)).model
    layers = [m for m in model.modules() if isinstance(m, LinearVBD)]
    assert len(layers) == 3
    for layer in layers:
        log_alpha = layer.log_alpha
        assert LOG_ALPHA_RANGE[0] <= log_alpha.min() and log_alpha.max() <= LOG_ALPHA_RANGE[1]
        sigma2 = layer.sigma2()
        assert torch.isfinite(sigma2).all() and (sigma2 > 0).all()
        assert layer.log_sigma2.max() < 88  # exp overflows float32 above ~88.7
    print("\nmax log σ² per layer:", [round(m.log_sigma2.max().item(), 2) for m in layers])


# ---------------------------------------------------------------- untrusted checkpoints


class _RunsCode:
    """Unpickling this runs a shell command (a checkpoint crafted by an attacker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, fmt: str, marker: Path) -> bytes:
    """A checkpoint that runs code when unpickled, in torch's zip format or as a raw pickle."""
    payload = {"x": _RunsCode(marker), "model": {"0.weight": torch.zeros(1)}, "config": {}}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path.read_bytes()


def unpickle_trusting(path: Path, fmt: str) -> None:
    """What an unsafe loader would do (proves the payload is live)."""
    if fmt == "zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_crafted_checkpoint_runs_no_code_anywhere(
    fmt: str, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "crafted.pt"
    content = crafted_checkpoint(path, fmt, marker)
    unpickle_trusting(path, fmt)
    assert marker.exists(), "the crafted payload should run when trusted"
    marker.unlink()
    problem = (
        "it holds something other than tensors and plain data (Trying to load unsupported "
        "GLOBAL posix.system whose module posix is blocked); it was not unpickled"
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"cannot load checkpoint {path}: {problem}")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes(content)
    for argv in (
        ["eval", str(path)],
        run_argv(resumed, shared_data, "--resume"),
        run_argv(tmp_path / "init", shared_data, "--init", str(path)),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"vbd {argv[0]}: error: cannot load checkpoint "), err
        assert problem in err and "\n" not in err
    assert not marker.exists()
    assert (resumed / "checkpoint.pt").read_bytes() == content
    assert sorted(p.name for p in resumed.iterdir()) == ["checkpoint.pt"]
    assert not (tmp_path / "init").exists()  # a run failing before its first file leaves none


@pytest.mark.parametrize("case", ["truncated", "empty", "not a dict", "missing entries"])
def test_damaged_checkpoint_gives_a_checkpoint_error(
    case: str, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    good = {"model": {"w": torch.zeros(3)}, "config": {}}
    torch.save([torch.zeros(3)] if case == "not a dict" else good, path)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "empty":
        path.write_bytes(b"")
    content = path.read_bytes()
    problem = {
        "truncated": "PytorchStreamReader failed reading zip archive",
        "empty": "the file is empty or truncated",
        "not a dict": "is not a vbdropout checkpoint (not a dict)",
        "missing entries": "is not a vbdropout checkpoint (no ['optimizer', 'scheduler', 'rng'",
    }[case]
    assert main(run_argv(out, shared_data, "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vbd train: error: ")
    assert problem in err and str(path) in err and "\n" not in err, err
    assert path.read_bytes() == content


# ---------------------------------------------------------------- bad data files

FORMATS = {"idx": "mnist", "cifar": "cifar10", "svhn": "svhn"}
FAULTS = ("missing", "truncated", "flipped byte", "wrong magic", "wrong shape", "label range")

# Cells of the format × fault matrix that tests/test_data.py already covers (test ids).
COVERED = {
    ("idx", "missing"): ["test_missing_mnist_file_message", "test_empty_data_dir"],
    ("idx", "truncated"): [
        "test_corrupt_mnist[truncated gzip]",
        "test_corrupt_mnist[truncated idx]",
    ],
    ("idx", "flipped byte"): ["test_flipped_byte_fails_listed_checksum[sha256]"],
    ("idx", "wrong magic"): ["test_corrupt_mnist[bad magic]"],
    ("idx", "wrong shape"): [
        "test_corrupt_mnist[wrong image shape]",
        "test_corrupt_mnist[count mismatch]",
    ],
    ("idx", "label range"): ["test_corrupt_mnist[label out of range]"],
    ("cifar", "missing"): ["test_corrupt_cifar[missing]", "test_cifar_missing_everything"],
    ("cifar", "truncated"): ["test_corrupt_cifar[truncated pickle]"],
    ("cifar", "flipped byte"): ["test_cifar_sums_in_parent_folder"],
    ("cifar", "wrong shape"): [
        "test_corrupt_cifar[wrong shape]",
        "test_corrupt_cifar[label count]",
    ],
    ("cifar", "label range"): ["test_corrupt_cifar[label out of range]"],
    ("svhn", "missing"): ["test_corrupt_svhn[missing]"],
    ("svhn", "wrong magic"): ["test_corrupt_svhn[garbage]"],
    ("svhn", "wrong shape"): ["test_corrupt_svhn[wrong shape]", "test_corrupt_svhn[no y]"],
    ("svhn", "label range"): ["test_corrupt_svhn[label 0]"],
}

MNIST_IMAGES = "mnist/train-images-idx3-ubyte.gz"
CIFAR_BATCH = "cifar10/cifar-10-batches-py/data_batch_2"
SVHN_TEST = "svhn/test_32x32.mat"


def write_format(root: Path, fmt: str) -> None:
    """Small well-formed files of one format under ``root``."""
    if fmt == "idx":
        write_mnist(root)
    elif fmt == "cifar":
        write_cifar(root / "cifar10" / "cifar-10-batches-py")
    else:
        write_svhn(root / "svhn", "train_32x32.mat")
        write_svhn(root / "svhn", "test_32x32.mat")


def gzip_body_start(data: bytes) -> int:
    """Offset of the deflate data in a gzip file (after the header and its file name)."""
    return data.index(b"\0", 10) + 1 if data[3] & 0x08 else 10


def cut_tail(path: Path, count: int) -> None:
    path.write_bytes(path.read_bytes()[:-count])


def set_bytes(path: Path, offset: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))


def flip_in_gzip_body(path: Path, k: int, parts: int = 4) -> None:
    """Flip the byte at k/parts of the way through the deflate data and trailer."""
    data = path.read_bytes()
    start = gzip_body_start(data)
    flip_byte(path, start + (len(data) - 1 - start) * k // parts)


def save_mat(path: Path, **variables: np.ndarray) -> None:
    import scipy.io

    scipy.io.savemat(path, variables)


def flip_listed(path: Path) -> None:
    """List the file in a SHA256SUMS at the data dir, then flip a byte inside X."""
    write_sums(path.parents[1], [path])
    flip_byte(path, 4000)


X4 = np.zeros((32, 32, 3, 4), np.uint8)
IMAGES24 = np.zeros((24, 28, 28), np.uint8)

# Cells (and variants) not covered by test_data.py: (format, fault, variant) ->
# (file under the data dir, how to damage it, the problem the error must state).
NEW: dict[tuple[str, str, str], tuple[str, Callable[[Path], Any], str]] = {
    ("idx", "truncated", "last byte cut (gzip trailer)"): (
        MNIST_IMAGES, lambda p: cut_tail(p, 1), "corrupt or truncated gzip (Compressed file ended"
    ),
    **{
        ("idx", "flipped byte", f"unlisted, at {k}/4 of the gzip body"): (
            MNIST_IMAGES, lambda p, k=k: flip_in_gzip_body(p, k), "corrupt or truncated gzip ("
        )
        for k in range(5)
    },
    ("idx", "wrong magic", "images file with the labels magic"): (
        MNIST_IMAGES,
        lambda p: write_gz(p, idx_bytes(IMAGES24, magic=2049)),
        "bad magic number 2049, expected 2051",
    ),
    ("idx", "wrong magic", "not gzip-compressed"): (
        MNIST_IMAGES,
        lambda p: p.write_bytes(idx_bytes(IMAGES24)),
        "corrupt or truncated gzip (Not a gzipped file",
    ),
    ("cifar", "truncated", "last byte cut (pickle STOP)"): (
        CIFAR_BATCH,
        lambda p: cut_tail(p, 1),
        "not a valid CIFAR-10 pickle (UnpicklingError: pickle data was truncated",
    ),
    ("cifar", "wrong magic", "pickle protocol byte zeroed"): (
        CIFAR_BATCH,
        lambda p: set_bytes(p, 0, b"\0"),
        "not a valid CIFAR-10 pickle (UnpicklingError: invalid load key",
    ),
    ("cifar", "label range", "negative label"): (
        CIFAR_BATCH,
        lambda p: write_pickle(p, cifar_batch(np.zeros((6, 3072), np.uint8), [0, 1, -1] * 2)),
        "label out of range: -1 at index 2, expected 0..9",
    ),
    ("svhn", "truncated", "half"): (
        SVHN_TEST,
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "not a readable MATLAB file (OSError: could not read bytes",
    ),
    ("svhn", "truncated", "last 8 bytes cut (into y)"): (
        SVHN_TEST, lambda p: cut_tail(p, 8), "not a readable MATLAB file (OSError: could not read"
    ),
    ("svhn", "flipped byte", "listed in SHA256SUMS"): (
        SVHN_TEST, flip_listed, "checksum mismatch: sha256 expected"
    ),
    ("svhn", "wrong magic", "MATLAB v7.3 version field"): (
        SVHN_TEST,
        lambda p: set_bytes(p, 124, b"\x00\x02"),
        "not a readable MATLAB file (NotImplementedError: Please use HDF reader",
    ),
    ("svhn", "wrong magic", "endian indicator"): (
        SVHN_TEST,
        lambda p: set_bytes(p, 126, b"XX"),
        "not a readable MATLAB file (ValueError: Unknown mat file type",
    ),
    ("svhn", "wrong shape", "y of shape (n, 2)"): (
        SVHN_TEST,
        lambda p: save_mat(p, X=X4, y=np.ones((4, 2), np.uint8)),
        "wrong shape: y is uint8 (4, 2), expected integers (4, 1)",
    ),
    ("svhn", "label range", "label 11"): (
        SVHN_TEST,
        lambda p: save_mat(p, X=X4, y=np.array([[1], [2], [11], [3]], np.uint8)),
        "label out of range: 11 at index 2, expected 1..10",
    ),
}  # fmt: skip


def assert_data_error(root: Path, fmt: str, name: str, problem: str) -> str:
    """Loading fails with a DataError naming the file and ``problem``; root is unchanged.

    Returns the problem part of the message (between the file name and "Data dir").
    """
    before = snapshot(root)
    with pytest.raises(DataError) as info:
        load_dataset(FORMATS[fmt], root, strict=False)
    message = str(info.value)
    assert message.startswith(f"{root / name}: "), message
    assert problem in message, message
    assert snapshot(root) == before, "the loader wrote into the data dir"
    return message[len(f"{root / name}: ") :].split(". Data dir")[0]


@pytest.mark.parametrize("cell", list(NEW), ids=" / ".join)
def test_bad_data_file_is_named_with_its_problem(
    cell: tuple[str, str, str], tmp_path: Path
) -> None:
    fmt = cell[0]
    if fmt == "svhn":
        pytest.importorskip("scipy.io")
    write_format(tmp_path, fmt)
    name, damage, problem = NEW[cell]
    damage(tmp_path / name)
    assert_data_error(tmp_path, fmt, name, problem)


def test_fault_matrix_is_complete() -> None:
    """Every format × fault cell is tested here or (by the named tests) in test_data.py."""
    source = (Path(__file__).parent / "test_data.py").read_text()
    defined = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    for ids in COVERED.values():
        for test_id in ids:
            name, _, param = test_id.partition("[")
            assert name in defined, f"{name} is no longer in test_data.py"
            assert not param or f'"{param[:-1]}"' in source, f"{test_id} is gone"
    new = {(fmt, fault) for fmt, fault, _ in NEW}
    cells = [(fmt, fault) for fmt in FORMATS for fault in FAULTS]
    missing = [cell for cell in cells if cell not in COVERED and cell not in new]
    assert not missing, f"untested cells: {missing}"


def test_every_flipped_byte_of_an_unlisted_gzip_body_is_detected(tmp_path: Path) -> None:
    """Exhaustive over a small file: every byte after the gzip header is covered by the
    IDX checks or, at the latest, by gzip's CRC-32 and length trailer."""
    write_mnist(tmp_path, n_train=4, n_test=2)
    name = "mnist/train-labels-idx1-ubyte.gz"
    path = tmp_path / name
    good = path.read_bytes()
    problems = set()
    for offset in range(gzip_body_start(good), len(good)):
        flip_byte(path, offset)
        problem = assert_data_error(tmp_path, "idx", name, "")
        problems.add(re.sub(r"[\d(].*", "", problem).strip())  # its kind, without numbers
        path.write_bytes(good)
    assert "corrupt or truncated gzip" in problems
    print(f"\n{len(good) - gzip_body_start(good)} flips detected as: {sorted(problems)}")


def test_a_zombie_does_not_hold_a_run_lock():
    """Killed workers of a multi-process run stay zombies until init reaps them; the
    lock file may name one of them, and a resume must be able to take it over."""
    assert _alive(os.getpid())
    pid = os.fork()
    if pid == 0:  # the child exits at once and stays unreaped: a zombie
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not _alive(pid)
    finally:
        os.waitpid(pid, 0)
    assert not _alive(pid)


def test_a_refused_run_waits_for_the_holder_to_write_its_pid(tmp_path):
    """The winner of a lock race writes its pid just after taking the flock; the loser
    used to read the file in between and report 'pid unknown' (seen in fresh-ci)."""
    lock = tmp_path / ".lock"
    lock.write_text("")
    fd = os.open(lock, os.O_RDONLY)
    try:
        writer = threading.Timer(0.05, lock.write_text, args=("12345",))
        writer.start()
        assert _holder_pid(fd) == 12345
        writer.join()
        lock.write_text("")
        start = time.monotonic()
        assert _holder_pid(fd, patience=0.1) == 0  # a holder that never writes one
        assert time.monotonic() - start < 1
    finally:
        os.close(fd)


def test_the_device_probes_mark_only_tensors_with_nan_or_inf():
    """checks="epoch" probes every gradient and parameter as Σ|t·0| in two multi-tensor
    operations: NaN exactly where a tensor holds a NaN or ±inf, 0 for huge finite values,
    a missing gradient and an empty tensor."""
    from vbdropout.train.loop import _probes

    nan, inf = float("nan"), float("inf")
    tensors = [
        torch.tensor([1.0, nan]),
        None,
        torch.tensor([inf, 2.0]),
        torch.tensor([[-inf]]),
        torch.tensor([3e38, 3e38, -3e38]),
        torch.zeros(0),
        torch.tensor(1e-3),
    ]
    probes = _probes(tensors, torch.zeros(()))
    assert [bool(p.isnan()) for p in probes] == [True, False, True, True, False, False, False]
    assert all(float(p) == 0 for p in probes if not p.isnan())
    assert _probes([None, None], torch.zeros(())) == [torch.zeros(()), torch.zeros(())]
