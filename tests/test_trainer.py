"""Training runs: resume after SIGKILL, configs, locks, eval and CLI errors (real MNIST)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vbdropout.cli import main
from vbdropout.io import load_checkpoint
from vbdropout.train import (
    ConfigError,
    RunLockedError,
    TrainConfig,
    load_config,
    resolve_config,
    train,
)
from vbdropout.train.config import to_toml
from vbdropout.train.schedules import kl_weight


def quick(out, shared_data, **kw):
    fields = dict(
        model="lenet300_100",
        method="vbd",
        dataset="mnist",
        out=str(out),
        epochs=3,
        train_subset=1000,
        data_dir=str(shared_data),
        kl_warmup=(1, 2),
    )
    fields.update(kw)
    return TrainConfig(**fields)


def cli_train(out, shared_data, epochs, *extra):
    return [
        sys.executable, "-m", "vbdropout", "train", "--model", "lenet300_100", "--method", "vbd",
        "--dataset", "mnist", "--data-dir", str(shared_data), "--train-subset", "600",
        "--epochs", str(epochs), "--kl-warmup", "2", "6", "--device", "cpu", "--out", str(out),
        "--json", *extra,
    ]  # fmt: skip


def test_run_writes_its_files_and_a_complete_summary(tmp_path, shared_data):
    summary = train(quick(tmp_path / "run", shared_data), progress=False)
    files = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != "tensorboard")
    assert files == [
        ".vbdropout-run", "checkpoint.pt", "config.toml", "metrics.csv", "metrics.jsonl",
        "summary.json",
    ]  # fmt: skip
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # warm-up (1, 2), 10 steps an epoch: β of each epoch's last step (epoch 2 ramps)
    assert [row["kl_weight"] for row in rows] == pytest.approx([0.0, 0.9, 1.0])
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 4
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["test_error"] == summary["test_error"] < 0.25
    for key in ("compression", "epochs", "seed", "device", "train_seconds", "versions", "config"):
        assert key in on_disk
    assert on_disk["compression"]["layers"][0]["weights"] == 784 * 300


def test_training_flushes_denormal_floats_to_zero(tmp_path, shared_data):
    denormal = 1e-40  # below float32's smallest normal number, 1.2e-38
    torch.set_flush_denormal(False)
    assert torch.tensor([denormal]).item() != 0.0
    try:
        train(quick(tmp_path / "run", shared_data, epochs=1), progress=False)
        assert torch.tensor([denormal]).item() == 0.0, "slow denormal arithmetic left on"
    finally:
        torch.set_flush_denormal(False)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, shared_data):
    epochs = 40
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(
        cli_train(tmp_path / "ref", shared_data, epochs), env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    killed_at = []
    for trial in range(2):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen(
            cli_train(out, shared_data, epochs),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        wanted = 3 + 10 * trial
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= wanted:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(load_checkpoint(out)["epoch"])
        resumed = subprocess.run(
            cli_train(out, shared_data, epochs, "--resume"), env=env, capture_output=True, text=True
        )
        assert resumed.returncode == 0, resumed.stderr
        a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(out)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        ref_summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        assert summary["test_error"] == ref_summary["test_error"]
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(0 < k < epochs for k in killed_at), f"kills must land mid-run, got {killed_at}"


def test_existing_run_needs_resume_and_resume_needs_the_same_config(tmp_path, shared_data):
    config = quick(tmp_path / "run", shared_data, epochs=1)
    train(config, progress=False)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(config, progress=False)
    with pytest.raises(ConfigError, match=r"config differs in \['seed'\]"):
        train(quick(tmp_path / "run", shared_data, epochs=1, seed=5), resume=True, progress=False)


def test_a_live_lock_refuses_a_second_run_and_a_stale_lock_is_taken_over(tmp_path, shared_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".vbdropout-run").write_text("")  # a run directory of ours (a lone .lock is not)
    (out / ".lock").write_text(str(os.getpid()))
    with pytest.raises(RunLockedError, match="in use by another training process"):
        train(quick(out, shared_data, epochs=1), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(str(dead.pid))
    train(quick(out, shared_data, epochs=1), progress=False)
    assert not (out / ".lock").exists()


def test_config_toml_round_trip_and_errors(tmp_path):
    config = resolve_config(TrainConfig(model="mlp_srivastava", epochs=10, network={"width": 340}))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config
    assert config.lr_decay_start == 5 and config.kl_warmup == (0, 2)
    path.write_text("colour = 1\n" + to_toml(config))
    with pytest.raises(ConfigError, match="unknown config keys \\['colour'\\]"):
        load_config(path)
    for bad, match in [
        ({"epochs": 0}, "epochs"),
        ({"model": "resnet"}, "unknown model"),
        ({"method": "magic"}, "unknown method"),
        ({"lr": float("nan")}, "lr"),
        ({"kl_warmup": (5, 2)}, "kl_warmup"),
        ({"epochs": 10, "lr_decay_start": 10}, "lr_decay_start"),
    ]:
        with pytest.raises(ConfigError, match=match):
            resolve_config(TrainConfig(**bad))


def test_protocol_defaults_follow_sparse_vd():
    config = resolve_config(TrainConfig(model="lenet300_100"))
    assert (config.epochs, config.batch_size, config.lr) == (200, 100, 1e-3)
    assert config.lr_decay_start == 100 and config.kl_warmup == (5, 20)


def test_a_scaled_kl_warmup_ends_by_the_end_of_the_run():
    """One epoch of a 10-epoch warm-up would train with β = 0 throughout; it ramps β from
    0 to 1 through the epoch instead (β is evaluated at every step)."""
    one = resolve_config(TrainConfig(model="kingma_cifar", method="vbd", epochs=1))
    assert one.kl_warmup == (0, 1) and kl_weight(0.5, *one.kl_warmup) == 0.5
    assert kl_weight(1, *one.kl_warmup) == 1.0
    sparse_vd = resolve_config(TrainConfig(model="lenet300_100", epochs=1))  # (5, 20) of 200
    assert sparse_vd.kl_warmup == (0, 1)
    two = resolve_config(TrainConfig(model="lenet300_100", epochs=2))
    assert two.kl_warmup == (1, 1)
    assert resolve_config(TrainConfig(model="kingma_cifar", epochs=20)).kl_warmup == (0, 2)
    explicit = resolve_config(TrainConfig(model="kingma_cifar", epochs=1, kl_warmup=(0, 1)))
    assert explicit.kl_warmup == (0, 1)  # a user's own warm-up is left as given


def test_init_from_a_plain_run_and_eval_command(tmp_path, shared_data, capsys):
    plain = quick(tmp_path / "plain", shared_data, method="none", epochs=2)
    base = train(plain, progress=False)
    init = quick(tmp_path / "vbd", shared_data, lr=1e-12, epochs=1, kl_warmup=(5, 20))
    init.init = str(tmp_path / "plain")
    started = train(init, progress=False)
    assert started["test_error"] == pytest.approx(base["test_error"], abs=0.01)
    assert main(["eval", str(tmp_path / "vbd"), "--mc-samples", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # one name per quantity across commands: eval's test_error is train's test_error
    assert result["test_error"] == pytest.approx(started["test_error"])
    assert result["test_nll"] == pytest.approx(started["test_nll"], rel=1e-4)
    assert "error" not in result and "nll" not in result
    for key in ("test_ece", "mc_test_error", "mc_test_nll", "mc_test_ece"):
        assert 0 <= result[key] < 5


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--method", "magic"], "unknown method 'magic'"),
        (["train", "--dataset", "imagenet"], "invalid choice"),
    ],
)
def test_bad_train_arguments_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err


def test_unwritable_out_and_missing_checkpoint_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vbd train: error: cannot write to output directory") and "\n" not in err
    assert main(["eval", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_init_from_a_plain_state_dict_into_a_structured_model(tmp_path, shared_data):
    plain = train(quick(tmp_path / "plain", shared_data, method="none", epochs=2), progress=False)
    state = load_checkpoint(tmp_path / "plain")["model"]
    torch.save(state, tmp_path / "plain_state.pt")
    config = quick(
        tmp_path / "sbp", shared_data, method="sbp", lr=1e-12, epochs=1, kl_warmup=(5, 20)
    )
    config.init = str(tmp_path / "plain_state.pt")
    started = train(config, progress=False)
    # SBP's initial multipliers are ≈ 1 − 0.8·e^−5: the plain network's function
    assert started["test_error"] == pytest.approx(plain["test_error"], abs=0.01)
    wrong = quick(tmp_path / "wide", shared_data, model="lenet500_300", epochs=1)
    wrong.init = str(tmp_path / "plain_state.pt")
    with pytest.raises(ConfigError, match="do not match the model's"):
        train(wrong, progress=False)


def test_run_files_get_the_usual_permissions(tmp_path, shared_data):
    previous = os.umask(0o022)
    try:
        train(quick(tmp_path / "run", shared_data, epochs=1), progress=False)
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "summary.json", "metrics.jsonl", "config.toml"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644


def test_missing_data_is_a_one_line_cli_error(tmp_path, capsys):
    assert (
        main(["train", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("vbd train: error:") and "train-images-idx3-ubyte.gz" in err
    assert "\n" not in err


def test_tensorboard_gets_every_epoch_when_installed(tmp_path, shared_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(quick(tmp_path / "run", shared_data, epochs=2), progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_error")] == [1, 2]
    assert {"kl", "sparsity", "compression_ratio", "lr"} <= set(events.Tags()["scalars"])


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(tmp_path, shared_data):
    config = quick(tmp_path / "run", shared_data, epochs=1)
    train(config, progress=False)
    state = load_checkpoint(tmp_path / "run")
    del state["config"]["nproc"]  # written by a version without --nproc
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    assert train(config, resume=True, progress=False)["epochs"] == 1


def test_make_adam_is_fused_on_cpu_and_follows_torch_adam():
    from vbdropout.train.loop import make_adam

    torch.manual_seed(0)
    start = [torch.randn(30, 20), torch.randn(20)]
    ours = [p.clone().requires_grad_() for p in start]
    reference = [p.clone().requires_grad_() for p in start]
    fused = make_adam(ours, 1e-2)
    assert fused.defaults["fused"] is True
    plain = torch.optim.Adam(reference, lr=1e-2, foreach=False)
    for _ in range(20):
        for params, opt in ((ours, fused), (reference, plain)):
            opt.zero_grad()
            (params[0].sin().sum() + (params[1] ** 2).sum()).backward()
            opt.step()
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(ours[0], start[0])
    assert make_adam([torch.zeros(2, dtype=torch.float64, requires_grad=True)], 0.1).defaults[
        "fused"
    ]


def test_the_end_of_run_check_evaluates_only_a_step_that_changed_the_network(monkeypatch):
    """final_epoch_end evaluates before and after the method's last epoch_end only when
    that step changed the network (SWS's quantization); a no-op step costs no pass."""
    from vbdropout.models import build_model
    from vbdropout.models.methods import get_method
    from vbdropout.train import checks
    from vbdropout.train.config import TrainConfig, resolve_config

    calls = []
    real = checks.evaluate
    monkeypatch.setattr(checks, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    config = resolve_config(TrainConfig(model="lenet300_100", method="vbd", epochs=2))
    method = get_method("vbd")
    model = build_model("lenet300_100", method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert checks.final_epoch_end(method, model, x, y, 1, config, 10) is None
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class Shrinking(type(method)):
        def epoch_end(self, model, epoch, epochs):  # a harmless end step: halves a bias
            with torch.no_grad():
                model[-1].bias.mul_(0.5)

    halved = model[-1].bias.detach() * 0.5
    assert checks.final_epoch_end(Shrinking(), model, x, y, 1, config, 10) is None
    assert len(calls) == 2  # before and after
    torch.testing.assert_close(model[-1].bias.detach(), halved)  # the kept step's state


def test_the_kl_weight_rises_at_every_step_of_the_warmup(monkeypatch):
    """β is evaluated per step: a warm-up (0, 1) over one epoch of 4 steps trains the steps
    with β = 0, 1/4, 1/2, 3/4; a plain number stays β for every step."""
    from vbdropout.models import build_model
    from vbdropout.train import loop

    seen = []
    real = loop.elbo_terms
    monkeypatch.setattr(loop, "elbo_terms", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model("lenet300_100", "vbd")
    optimizer = loop.make_adam(model.parameters(), 1e-3)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    stats = loop.train_epoch(
        model, optimizer, x, y, batch_size=10, kl_weight=lambda done: kl_weight(done, 0, 1)
    )
    assert seen == [0.0, 0.25, 0.5, 0.75] and stats["kl_weight"] == 0.75
    seen.clear()
    loop.train_epoch(model, optimizer, x, y, batch_size=10, kl_weight=0.3)
    assert seen == [0.3] * 4
