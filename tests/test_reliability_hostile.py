"""Fault suite, round 2 (issue 18): a hostile or careless user of ``vbd``.

Symlinked run files, foreign ``--out`` folders, a broken last step, truncated or
malformed checkpoints, Ctrl-C/SIGTERM, bad config values, zero-sized layers, bad
IDX headers, disk full, argument errors. Every case goes through the path users take
(``vbd`` via :func:`vbdropout.cli.main`, or a real killable process) where there is one,
and checks that nothing outside the run directory changed. docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fakes import flip_byte, snapshot, write_gz, write_mnist
from fault_runner import ForkServer
from torch import nn

from vbdropout import io as vbd_io
from vbdropout import kernels
from vbdropout.cli import main
from vbdropout.data import DataError, load_dataset
from vbdropout.io import CheckpointError, load_checkpoint, save_checkpoint
from vbdropout.losses import elbo_terms
from vbdropout.models import METHODS, build_model
from vbdropout.nn import Conv2dVBD, LinearVBD
from vbdropout.train import DivergenceError, TrainConfig, train_epoch
from vbdropout.train.config import ConfigError, resolve_config
from vbdropout.train.rundir import RUN_MARKER, run_lock
from vbdropout.train.schedules import lr_factor

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def argv(out: Path, data: Path, *extra: str, epochs: int = 1, subset: int = 200) -> list[str]:
    """``vbd train`` of a small, quick MNIST run."""
    return [
        "train", "--data-dir", str(data), "--train-subset", str(subset), "--epochs", str(epochs),
        "--kl-warmup", "0", "1", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def run_files(out: Path) -> dict[str, bytes | None]:
    """The run directory's content, without tensorboard/ (a new session adds an empty
    events file there, even when it fails before its first epoch)."""
    return {k: v for k, v in snapshot(out).items() if not k.startswith("tensorboard")}


def one_line_error(capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    """The single stderr line of a failed command, which must contain ``parts``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (read-only for the tests: copy what you change)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(argv(out, shared_data, "--json")) == 0
    return out


def crafted(tmp_path: Path, finished_run: Path, **changes: object) -> Path:
    """A copy of the finished run whose checkpoint has ``changes`` (None deletes an entry)."""
    out = tmp_path / "crafted"
    out.mkdir()
    for name in (RUN_MARKER, "config.toml", "metrics.jsonl", "metrics.csv"):
        (out / name).write_bytes((finished_run / name).read_bytes())
    state = load_checkpoint(finished_run)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    save_checkpoint(out / "checkpoint.pt", state)
    return out


# ---------------------------------------------------------------- 1. symlinks


@pytest.mark.parametrize("name", [".lock", "checkpoint.pt", "config.toml", "summary.json"])
def test_a_symlinked_run_file_is_refused_and_its_target_untouched(
    name: str, tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "d"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert main(argv(out, shared_data)) == 1
    one_line_error(capsys, f"{out / name} is a symbolic link")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_the_lock_is_opened_without_following_a_symlink(tmp_path: Path) -> None:
    """Even past the directory check (a link planted after it), the lock's target is safe."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "d"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"), run_lock(out):
        pass
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------- 2. foreign --out


def test_a_non_empty_folder_that_is_no_run_dir_is_refused_unless_force(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "project"
    out.mkdir()
    for name in ("config.toml", "summary.json", "metrics.csv", ".lock"):
        (out / name).write_text(f"the user's own {name}\n")
    before = snapshot(out)
    assert main(argv(out, shared_data)) == 1
    one_line_error(capsys, "is not empty", "not a vbd run directory", "--force")
    assert snapshot(out) == before
    assert main(argv(out, shared_data, "--force")) == 0
    assert (out / RUN_MARKER).is_file() and load_checkpoint(out)["epoch"] == 1
    assert main(argv(out, shared_data, "--resume")) == 0  # now one of ours: no --force needed


def test_a_run_starting_beside_another_does_not_take_its_marker_for_a_foreign_file(
    tmp_path: Path, shared_data: Path
) -> None:
    """Two runs started together on a new directory: one may list it while the other's
    marker is still a temp file. That directory is ours, not foreign (fresh-ci once saw
    the loser refused with "not empty" instead of the lock's message); and the winner,
    cleaning up under the lock, must not delete that temp file under the other run's feet
    (which then failed with "cannot write .vbdropout-run: No such file or directory")."""
    out = tmp_path / "fresh"
    out.mkdir()
    other = out / f".{RUN_MARKER}.x1y2z3.tmp"
    other.write_bytes(b"")  # the other run, mid-write
    (out / ".write-test-abc").write_bytes(b"")  # and its write probe
    assert main(argv(out, shared_data)) == 0
    assert (out / RUN_MARKER).is_file() and other.is_file()


# ---------------------------------------------------------------- 3. broken last step


def test_sigma2_overflow_in_the_last_step_is_divergence() -> None:
    """Finite parameters whose σ² = exp(log σ²) is inf: refused after the update."""
    torch.manual_seed(0)
    model = nn.Sequential(LinearVBD(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    class Overflowing(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                model[0].log_sigma2.fill_(1e6)  # finite, but exp() overflows

    opt = Overflowing(model.parameters(), lr=0.1)
    with pytest.raises(DivergenceError, match=r"step 1/1: the update made 0.sigma2 = exp"):
        train_epoch(model, opt, x, y, batch_size=8, kl_weight=1.0)


def test_a_huge_lr_stops_in_its_last_step_keeping_the_checkpoint_and_a_smaller_lr_resumes(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One step per epoch: epoch 2 at lr 1e6 used to end with exit 0 and 90% error."""
    out = tmp_path / "run"
    one_step = ("--train-subset", "100", "--batch-size", "100")
    assert main([*argv(out, shared_data), *one_step]) == 0
    capsys.readouterr()
    before = run_files(out)
    assert main([*argv(out, shared_data, epochs=2), *one_step, "--resume", "--lr", "1e6"]) == 1
    one_line_error(
        capsys, "diverged in epoch 2, step 1/1", "sigma2", "the last good checkpoint (epoch 1)"
    )
    assert run_files(out) == before, "the diverged epoch wrote into the run directory"
    args = [*argv(out, shared_data, epochs=2), *one_step, "--resume", "--lr", "1e-4", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["resume_changes"] == [
        {"epoch": 1, "changed": {"epochs": [1, 2], "lr": [1e-3, 1e-4]}}
    ]
    assert summary["config"]["lr"] == 1e-4 and summary["config"]["epochs"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    decay = summary["config"]["lr_decay_start"]  # the protocol's: 0 for a 1-epoch run
    assert [row["lr"] for row in rows] == [
        1e-3 * lr_factor(0, 1, decay),
        1e-4 * lr_factor(1, 2, decay),
    ]
    assert load_checkpoint(out)["resume_changes"] == summary["resume_changes"]
    assert "lr = 0.0001" in (out / "config.toml").read_text()


def test_eval_of_a_checkpoint_with_infinite_sigma2_is_one_line(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = load_checkpoint(finished_run)
    model = {k: v.fill_(1e6) if k.endswith("log_sigma2") else v for k, v in state["model"].items()}
    out = crafted(tmp_path, finished_run, model=model)
    assert main(["eval", str(out), "--mc-samples", "2", "--device", "cpu"]) == 1
    one_line_error(capsys, "vbd eval: error:", "non-finite")


def test_a_run_that_ends_broken_without_diverging_warns(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--method none --lr 1e6``: the loss stays finite, the network is useless."""
    out = tmp_path / "run"
    assert main(argv(out, shared_data, "--method", "none", "--lr", "1e6", "--json")) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    assert summary["warnings"], summary["test_error"]
    for warning in summary["warnings"]:
        assert f"vbd train: warning: {warning}" in captured.err
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["warnings"] == summary["warnings"]


def test_a_working_run_has_no_warnings(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["warnings"] == [] and summary["test_error"] < 0.7


# ---------------------------------------------------------------- 4. truncated state dicts


def test_a_state_dict_missing_one_log_sigma2_is_refused_a_plain_one_loads() -> None:
    vbd = nn.Sequential(LinearVBD(3, 4), nn.ReLU(), LinearVBD(4, 2))
    for missing in ("0.log_sigma2", "2.log_sigma2"):  # before and after a complete layer
        state = vbd.state_dict()
        del state[missing]
        with pytest.raises(RuntimeError, match=f'Missing key.*"{missing}"'):
            nn.Sequential(LinearVBD(3, 4), nn.ReLU(), LinearVBD(4, 2)).load_state_dict(state)
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    vbd.load_state_dict(plain.state_dict())
    assert torch.equal(vbd[2].weight, plain[2].weight)
    assert bool((vbd[2].log_sigma2 == vbd[2].init_log_sigma2).all())


def test_eval_of_a_truncated_variational_checkpoint_names_the_missing_entry(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_checkpoint(finished_run)["model"]
    key = next(k for k in model if k.endswith("log_sigma2"))
    del model[key]
    out = crafted(tmp_path, finished_run, model=model)
    assert main(["eval", str(out), "--device", "cpu"]) == 1
    one_line_error(capsys, str(out / "checkpoint.pt"), f"lacks entry {key}")


# ---------------------------------------------------------------- 5. Ctrl-C, SIGTERM


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    fork_server = ForkServer(ENV)
    yield fork_server
    fork_server.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_is_one_line_exit_130_and_releases_the_lock(
    signum: int, server: ForkServer, tmp_path: Path, shared_data: Path
) -> None:
    out, log = tmp_path / "run", tmp_path / "log"
    # Far more epochs than can finish before the signal, however loaded the machine is.
    pid = server.spawn(argv(out, shared_data, epochs=100_000, subset=600), log)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists():
        assert server.poll(pid) is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    os.kill(pid, signum)
    assert server.wait(pid) == 130, log.read_text()
    lines = [line for line in log.read_text().splitlines() if "\r" not in line and line.strip()]
    how = " by SIGTERM" if signum == signal.SIGTERM else ""
    assert lines[-1].startswith(f"vbd train: interrupted{how}; the last checkpoint (epoch ")
    assert lines[-1].endswith(f"continue with vbd train --resume --out {out}"), lines[-1]
    assert "Traceback" not in log.read_text()
    assert not (out / ".lock").exists()
    assert load_checkpoint(out)["epoch"] >= 1


# ---------------------------------------------------------------- 6. bad values


@pytest.mark.parametrize(
    "line, field",
    [
        ('epochs = "two"', "epochs must be an integer"),
        ("data_dir = 5", "data_dir must be a string"),
        ("init = 7", "init must be a string"),
        ("kl_warmup = [1]", "kl_warmup must be a list of 2 integers"),
        ("train_clip = 1", "train_clip must be a boolean"),
        ("network = 5", "network must be a table"),
        ('lr = "fast"', "lr must be a number"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_it_and_nothing_is_written(
    line: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'model = "lenet300_100"\n{line}\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 1
    one_line_error(capsys, str(config), field)
    assert not out.exists()


def test_a_negative_mc_samples_is_an_argument_error(
    finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(finished_run), "--mc-samples", "-5"])
    assert exit_info.value.code == 2
    one_line_error(capsys, "--mc-samples: expected an integer >= 0, got -5")


@pytest.mark.parametrize(
    "entry, value, problem",
    [
        ("history", "x", "its history entry is malformed"),
        ("model", [1, 2], "its model entry is malformed"),
        ("epoch", "1", "its epoch entry is malformed"),
        ("rng", {"torch": 1}, "its rng entry is malformed"),
        ("optimizer", {"state": {}, "param_groups": [{"params": [0]}]}, "optimizer state"),
    ],
)
def test_a_malformed_checkpoint_is_refused_on_resume_before_anything_is_written(
    entry: str,
    value: object,
    problem: str,
    tmp_path: Path,
    finished_run: Path,
    shared_data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = crafted(tmp_path, finished_run, **{entry: value})
    before = run_files(out)
    assert main(argv(out, shared_data, "--resume", epochs=2)) == 1
    one_line_error(capsys, str(out / "checkpoint.pt"), problem)
    assert run_files(out) == before


def test_eval_of_a_checkpoint_with_a_malformed_config_is_one_line(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {**load_checkpoint(finished_run)["config"], "epochs": "two"}
    out = crafted(tmp_path, finished_run, config=config)
    assert main(["eval", str(out), "--device", "cpu"]) == 1
    one_line_error(capsys, str(out / "checkpoint.pt"), "epochs must be an integer")


def test_an_init_file_holding_no_weights_is_one_line(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "init.pt"
    torch.save({"model": "not a state_dict"}, init)
    assert main(argv(tmp_path / "run", shared_data, "--init", str(init))) == 1
    one_line_error(capsys, str(init), "not a state_dict")


# ---------------------------------------------------------------- 7. zero-sized layers


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize(
    "make, x_shape, out_shape",
    [
        (lambda: LinearVBD(0, 5), (4, 0), (4, 5)),
        (lambda: LinearVBD(3, 0), (4, 3), (4, 0)),
        (lambda: LinearVBD(3, 5), (0, 3), (0, 5)),
        (lambda: Conv2dVBD(0, 4, 3), (2, 0, 5, 5), (2, 4, 3, 3)),
        (lambda: Conv2dVBD(3, 0, 3), (2, 3, 5, 5), (2, 0, 3, 3)),
        (lambda: Conv2dVBD(4, 0, 3, groups=2), (2, 4, 5, 5), (2, 0, 3, 3)),
        (lambda: Conv2dVBD(3, 4, 3), (0, 3, 5, 5), (0, 4, 3, 3)),
    ],
    ids=["in0", "out0", "batch0", "conv-in0", "conv-out0", "conv-out0-groups", "conv-batch0"],
)
def test_zero_sized_layers_and_batches_work_on_every_path(
    make: Callable[[], nn.Module], x_shape: tuple, out_shape: tuple, fused: bool
) -> None:
    """Training (fused kernels or eager) and eval forward, backward and KL."""
    previous = kernels.set_enabled(fused)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors"
            module = make()
        x = torch.randn(*x_shape, requires_grad=True)
        for mode in ("train", "eval"):
            getattr(module, mode)()
            out = module(x)
            assert tuple(out.shape) == out_shape, mode
            assert bool(torch.isfinite(out).all()), mode
            (out.sum() + module.kl()).backward()
            assert x.grad is not None and x.grad.shape == x.shape, mode
    finally:
        kernels.set_enabled(previous)


def test_a_zero_sized_input_layer_trains_in_an_epoch() -> None:
    """The reported case: LinearVBD(0, 5) in training mode through train_epoch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors"
        model = nn.Sequential(LinearVBD(0, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_epoch(
        model, opt, torch.zeros(6, 0), torch.arange(6) % 5, batch_size=3, kl_weight=1
    )
    assert np.isfinite(stats["loss"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_empty_batch_passes_every_method_and_the_loss_says_why_it_has_none(
    method: str,
) -> None:
    accepted = inspect.signature(METHODS[method]).parameters
    options = {"dataset_size": 100} if "dataset_size" in accepted else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_model("lenet5_caffe", method, method_options=options)
    x = torch.randn(0, 1, 28, 28)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        assert tuple(net(x).shape) == (0, 10), mode
    with pytest.raises(ValueError, match="empty batch"):
        elbo_terms(net(x), torch.zeros(0, dtype=torch.long), net, 100)


# ---------------------------------------------------------------- 8. data files


def test_an_idx_header_with_huge_dims_is_a_data_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=4, n_test=2)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    header = (2051).to_bytes(4, "big") + b"\xff\xff\xff\xff" * 3
    write_gz(path, header + bytes(16))
    with pytest.raises(DataError, match="bad IDX header: dims \\(4294967295, "):
        load_dataset("mnist", tmp_path, strict=False)


def test_a_flipped_gzip_byte_is_named_corruption_not_a_shape_or_header_problem(
    tmp_path: Path,
) -> None:
    """Exhaustive over the deflate body of a small images file (strict=False): a flip that
    changes the decoded header (dims, magic) used to be reported as that."""
    write_mnist(tmp_path, n_train=2, n_test=1)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    start = 10 + len(path.name.removesuffix(".gz")) + 1  # gzip header with the FNAME field
    assert good[3] & 0x08 and good[10:start].rstrip(b"\0") == path.name.removesuffix(".gz").encode()
    kinds = set()
    for offset in range(start, len(good)):
        flip_byte(path, offset)
        with pytest.raises(DataError) as info:
            load_dataset("mnist", tmp_path, strict=False)
        kinds.add(str(info.value).split(": ", 1)[1].split(" (")[0])
        path.write_bytes(good)
    assert kinds == {"corrupt or truncated gzip"}, kinds


def test_a_symlink_loop_is_named_as_such_not_missing(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=4, n_test=2)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.unlink()
    path.symlink_to(path)  # a loop
    with pytest.raises(DataError, match="a symbolic link that leads to no file"):
        load_dataset("mnist", tmp_path, strict=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").symlink_to(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="symbolic link that leads to no file"):
        load_checkpoint(run)


def test_the_missing_data_message_gives_the_command_line_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv(tmp_path / "run", tmp_path / "nodata")) == 1
    line = one_line_error(capsys, "missing", "vbd download mnist", "--data-dir")
    assert "t10k" in line or "train-" in line


# ---------------------------------------------------------------- also


def test_a_checkpoint_of_another_shape_is_one_line_naming_file_and_tensor(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_checkpoint(finished_run)["model"]
    key = next(iter(model))
    model[key] = torch.zeros(7, 7)
    out = crafted(tmp_path, finished_run, model=model)
    assert main(["eval", str(out), "--device", "cpu"]) == 1
    one_line_error(
        capsys, f"{out / 'checkpoint.pt'} does not fit this model: {key} has shape (7, 7)"
    )


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out = tmp_path / "run"
    real = vbd_io._write_synced
    writes = []

    def full_disk(f, name: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
        writes.append(name)
        if name == "checkpoint.pt" and writes.count(name) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, name, data)

    monkeypatch.setattr(vbd_io, "_write_synced", full_disk)
    assert main(argv(out, shared_data, epochs=2)) == 1
    one_line_error(
        capsys,
        f"cannot write {out / 'checkpoint.pt'}: No space left on device",
        "the previous checkpoint.pt is kept unchanged",
    )
    assert load_checkpoint(out)["epoch"] == 1
    assert not list(out.glob(".checkpoint.pt.*.tmp")) and not (out / ".lock").exists()


@pytest.mark.parametrize(
    "args, problem",
    [
        (["train", "--epochs", "two"], "argument --epochs: expected a positive integer"),
        (["train", "--colour"], "unrecognized arguments: --colour"),
        (["eval"], "the following arguments are required: run"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_an_argument_error_is_one_line(
    args: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    one_line_error(capsys, "error:", problem)


def test_resume_keeps_the_command_and_config_stores_the_resolved_data_dir(
    tmp_path: Path, shared_data: Path, monkeypatch
) -> None:
    monkeypatch.chdir(shared_data.parent)
    out = tmp_path / "run"
    first = argv(out, Path(shared_data.name))  # a relative --data-dir
    monkeypatch.setattr(sys, "argv", ["vbd", *first])
    assert main(first) == 0
    assert f'data_dir = "{shared_data}"' in (out / "config.toml").read_text()
    command = json.loads((out / "summary.json").read_text())["command"]
    assert command == " ".join(["vbd", *first])
    again = ["train", "--out", str(out), "--resume"]
    monkeypatch.setattr(sys, "argv", ["vbd", *again])
    assert main(again) == 0
    assert json.loads((out / "summary.json").read_text())["command"] == command


def test_resume_refuses_a_result_setting_and_fewer_epochs(
    tmp_path: Path, finished_run: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = crafted(tmp_path, finished_run)
    before = run_files(out)
    assert main([*argv(out, shared_data, "--resume"), "--batch-size", "50"]) == 1
    one_line_error(capsys, "config differs in ['batch_size']", "only lr, epochs, lr_decay_start")
    state = load_checkpoint(out)
    save_checkpoint(out / "checkpoint.pt", {**state, "epoch": 3, "history": state["history"] * 3})
    before = run_files(out)
    assert main(argv(out, shared_data, "--resume", epochs=2)) == 1
    one_line_error(capsys, "epochs=2: it has already trained 3 epochs")
    assert run_files(out) == before


def test_a_short_sws_run_ends_with_a_working_network_and_says_so(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 epoch: quantizing before the mixture settled put every weight at 0 (89.9% error)."""
    out = tmp_path / "run"
    assert main(argv(out, shared_data, "--method", "sws", "--json", subset=1000)) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.splitlines()[-1])
    undone = summary["final_step_undone"]
    assert undone and "quantizing the weights" in undone and "so it was undone" in undone
    assert f"vbd train: warning: {undone}" in captured.err
    assert summary["test_error"] < 0.5 and summary["compression"]["compression_ratio"] == 1.0
    weights = load_checkpoint(out)["model"]["1.weight"]
    assert weights.unique().numel() > 1000  # continuous, not quantized
    assert load_checkpoint(out)["final_step_undone"] == undone


def test_vbd_download_checks_files_already_there(
    shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["download", "mnist", "--data-dir", str(shared_data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result == {"dataset": "mnist", "folder": str(shared_data / "mnist")}


def test_an_unexpected_error_type_is_one_line_unless_debugging(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr("vbdropout.train.runs.evaluate_run", broken)
    monkeypatch.delenv("VBD_DEBUG", raising=False)
    assert main(["eval", "somewhere"]) == 1
    one_line_error(capsys, "vbd eval: error: unexpected KeyError: 'boom'", "VBD_DEBUG=1")
    monkeypatch.setenv("VBD_DEBUG", "1")
    with pytest.raises(KeyError, match="boom"):
        main(["eval", "somewhere"])


# ---------------------------------------------------------------- 11. first use (2026-12-08)


@pytest.mark.parametrize("folder", ["new", "users"])
def test_a_run_failing_before_its_first_file_leaves_its_out_as_it_was(
    folder: str, tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad ``--init`` fails after the directory was claimed: the marker goes again, so a
    user's folder trained into with ``--force`` does not stay a run directory, and a new
    ``--out`` (with its new parent) is not left behind."""
    out = tmp_path / "parent" / "run" if folder == "new" else tmp_path / "users"
    if folder == "users":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    force = ("--force",) if folder == "users" else ()
    assert main(argv(out, shared_data, "--init", str(tmp_path / "nope.pt"), *force)) == 1
    one_line_error(capsys, "nope.pt")
    assert snapshot(tmp_path) == before and not (tmp_path / "parent").exists()
    if folder == "users":  # still not one of ours: refused without --force
        assert main(argv(out, shared_data)) == 1
        one_line_error(capsys, "is not empty", "--force")


def test_a_failed_forced_run_leaves_a_users_own_run_file_names_alone(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's folder may hold files named like run files (config.toml): the claim is
    undone when the run changed none of them, not when none exists."""
    out = tmp_path / "users"
    out.mkdir()
    (out / "config.toml").write_text("user = 1\n")
    before = snapshot(tmp_path)
    assert main(argv(out, shared_data, "--init", str(tmp_path / "nope.pt"), "--force")) == 1
    one_line_error(capsys, "nope.pt")
    assert snapshot(tmp_path) == before
    assert main(argv(out, shared_data)) == 1  # not ours: its config.toml is not replaced
    one_line_error(capsys, "is not empty", "--force")


def test_a_claim_is_not_undone_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    from vbdropout.train.rundir import claim

    out = tmp_path / "new" / "run"
    taken = claim(out)
    with run_lock(out):  # another run training there (the lock refuses a second holder)
        taken.release_if_unused()
    assert (out / RUN_MARKER).is_file()
    taken.release_if_unused()
    assert not (tmp_path / "new").exists()


def test_replicas_refuse_a_folder_holding_other_files_or_a_run(
    tmp_path: Path, shared_data: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = tmp_path / "group"
    group.mkdir()
    (group / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    assert main(argv(group, shared_data, "--replicas", "2", "--compile", "off")) == 1
    one_line_error(capsys, "is not empty (notes.txt)", "--force")
    assert main(argv(finished_run, shared_data, "--replicas", "2", "--compile", "off")) == 1
    one_line_error(capsys, "is a run directory", "OUT/seedN")
    assert snapshot(tmp_path) == before
    assert main(argv(group, shared_data, "--replicas", "2", "--compile", "off", "--force")) == 0
    assert (group / "seed0" / "summary.json").is_file() and (group / "notes.txt").is_file()
    # a group's folder may gather other things, e.g. an export of a replica
    export = str(group / "export-seed0")
    assert main(["compress", str(group / "seed0"), "--out", export, "--json"]) == 0
    resume = ("--replicas", "2", "--compile", "off", "--resume")
    assert main(argv(group, shared_data, *resume, epochs=2)) == 0


@pytest.mark.parametrize("replicas", [(), ("--replicas", "2")], ids=["run", "replicas"])
def test_resume_with_no_run_to_resume_says_it_starts_one(
    replicas: tuple[str, ...],
    tmp_path: Path,
    shared_data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A job that always passes ``--resume`` starts its run the first time; a mistyped
    ``--out`` then shows in the note (the run would be new, and by default 200 epochs)."""
    out = tmp_path / "new"
    compile_off = ("--compile", "off") if replicas else ()
    assert main(argv(out, shared_data, "--resume", *replicas, *compile_off)) == 0
    err = capsys.readouterr().err
    assert f"vbd train: no run in {out} to resume: starting a new one" in err
    assert main(argv(out, shared_data, "--resume", *replicas, *compile_off, epochs=2)) == 0
    assert "no run in" not in capsys.readouterr().err


def test_a_warmup_outlasting_the_run_is_a_warning(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """β never reached 1 (here: never left 0): the model is not the method's. A method
    without a KL has nothing to warn about; a resume to the warm-up's end clears it."""
    out = tmp_path / "run"
    warm = ["--kl-warmup", "2", "4", "--json"]
    assert main([*argv(out, shared_data), *warm]) == 0
    (warning,) = json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"]
    assert "before its KL warm-up (epochs 2 to 4)" in warning and "stayed 0" in warning
    assert f"vbd train --resume --out {out} --epochs 4" in warning
    assert main([*argv(out, shared_data, "--resume", epochs=3), *warm]) == 0
    (warning,) = json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"]
    assert "reached 0.25 of 1" in warning  # β of the last step, at 2.5 epochs
    assert main([*argv(out, shared_data, "--resume", epochs=4), *warm]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"] == []
    plain = tmp_path / "plain"
    assert main([*argv(plain, shared_data, "--method", "none"), *warm]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"] == []
    concrete = tmp_path / "concrete"  # a KL term that is negative
    assert main([*argv(concrete, shared_data, "--method", "concrete"), *warm]) == 0
    (warning,) = json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"]
    assert "before its KL warm-up" in warning


def test_eval_and_compress_of_an_unfinished_run_say_so(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run stopped at epoch 1 of 3 (as a kill leaves it): both commands work and warn;
    the export's report records how far the run got."""
    config = {**load_checkpoint(finished_run)["config"], "epochs": 3}
    out = crafted(tmp_path, finished_run, config=config)
    assert main(["eval", str(out), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert (result["epochs_done"], result["epochs"]) == (1, 3)
    (warning,) = result["warnings"]
    assert "stopped after epoch 1 of 3" in warning and warning in captured.err
    export = tmp_path / "export"
    assert main(["compress", str(out), "--out", str(export), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["warnings"] == [warning]
    source = json.loads((export / "report.json").read_text())["source"]
    assert (source["epochs_done"], source["epochs"]) == (1, 3)
    assert main(["eval", str(finished_run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"] == []


def test_a_cut_pruning_everything_is_a_warning(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "export"
    cut = ["--log-alpha-threshold", "-8", "--json"]
    assert main(["compress", str(finished_run), "--out", str(export), *cut]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["compression_ratio"] is None
    assert report["warnings"] == [
        "every weight is pruned at these cuts: the network's output is constant"
    ]
    assert main(["eval", str(finished_run), "--device", "cpu", *cut]) == 0
    (warning,) = json.loads(capsys.readouterr().out.splitlines()[-1])["warnings"]
    assert "near chance" in warning


@pytest.mark.parametrize(
    "only, message",
    [("[", "is not a regular expression"), ("nomatch", "matches no row of table4")],
)
def test_reproduce_only_that_selects_nothing_is_one_line(
    only: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reproduce", "table4", "--only", only, "--out", str(tmp_path / "r")]) == 1
    one_line_error(capsys, message)
    assert not (tmp_path / "r").exists()


def test_demo_refuses_a_bad_picture_path_or_warmup_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    (tmp_path / "afile").write_text("")
    short = ["demo", "--pretrain-epochs", "1", "--epochs", "2"]
    for extra, message in [
        (["--plot", str(tmp_path / "afile" / "x.png")], "afile is a file, not a folder"),
        (["--plot", str(tmp_path)], "is a folder; give a file name"),
        (["--kl-warmup", "3", "--plot", str(tmp_path / "x.png")], "kl_warmup must be in [1, "),
        *(  # a folder no one can write in, root included
            [(["--plot", "/proc/vbd-demo.png"], "cannot write in /proc")]
            if sys.platform == "linux"
            else []
        ),
    ]:
        started = time.perf_counter()
        assert main([*short, *extra]) == 1
        one_line_error(capsys, message)
        assert time.perf_counter() - started < 5, "refused before training"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_negative_seed_is_an_argument_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--seed", "-1"])
    assert exit_info.value.code == 2
    one_line_error(capsys, "--seed: expected an integer >= 0, got -1")
    assert resolve_config(TrainConfig(seed=-1)).seed == -1  # such runs of earlier versions resume


def test_download_of_a_packaged_data_set_names_no_folder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("sklearn")
    assert main(["download", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "dataset": "digits",
        "folder": None,
    }


def test_compress_refuses_a_zero_std_and_a_file_as_its_out(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = ["--factory", "mod:build", "--input-shape", "1,4,4"]
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tmp_path / "net.pt"), *factory, "--std", "0.5,0"])
    assert exit_info.value.code == 2
    one_line_error(capsys, "--std: expected positive numbers, got '0.5,0'")
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert main(["compress", str(finished_run), "--out", str(afile)]) == 1
    one_line_error(capsys, f"cannot export into {afile}: it is a file, not a folder")
    assert afile.read_text() == "mine\n"
