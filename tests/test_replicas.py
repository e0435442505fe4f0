"""``vbd train --replicas K``: K seeds trained as one batched model (real MNIST subsets).

Replica k must be the single run of its seed (exactly so, to float rounding, for a method
without noise), its run directory an ordinary one, its noise its own; a replica that
diverges stops alone; a killed group resumes; bad input is one line, nothing written.
"""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.func import grad, vmap

from vbdropout.cli import main
from vbdropout.io import load_checkpoint
from vbdropout.models import METHODS
from vbdropout.models.methods import method_class
from vbdropout.priors import HierarchicalPrior, LogUniformPrior
from vbdropout.train import DivergenceError, TrainConfig, replica_configs, train, train_replicas
from vbdropout.train.replicas import ReplicaStack

pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, shared_data, **kw):
    fields = dict(
        model="lenet300_100",
        method="none",
        dataset="mnist",
        out=str(out),
        epochs=3,
        train_subset=600,
        data_dir=str(shared_data),
        kl_warmup=(0, 2),
        device="cpu",
        compile="off",  # eager replicas: the compiled ones are tests/test_compiled.py's
    )
    fields.update(kw)
    return TrainConfig(**fields)


def assert_same_run(a, b, atol=1e-5):
    """Two run directories hold the same model and optimizer state, to float rounding."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["epoch"] == cb["epoch"]
    for key, value in ca["model"].items():
        torch.testing.assert_close(value, cb["model"][key], atol=atol, rtol=0, msg=key)
    for index, state in ca["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                value, cb["optimizer"]["state"][index][key], atol=atol, rtol=0
            )
    assert ca["rng"]["shuffle"].equal(cb["rng"]["shuffle"])  # the same data order drawn


@pytest.mark.parametrize("method", ["none", "pruning"])
def test_a_replica_of_a_noiseless_method_is_the_single_run_of_its_seed(
    method, tmp_path, shared_data
):
    # pruning: masks set by epoch events, pruned weights re-zeroed after every step
    epochs = 4 if method == "pruning" else 3
    group = replica_configs(
        config(tmp_path / "group", shared_data, method=method, epochs=epochs, seed=3), 2
    )
    summaries = train_replicas(group, progress=False)
    assert [s["seed"] for s in summaries] == [3, 4]
    assert [s["run_dir"] for s in summaries] == [
        str(tmp_path / "group" / f"seed{k}") for k in (3, 4)
    ]
    for seed, summary in zip((3, 4), summaries, strict=True):
        single = train(
            config(
                tmp_path / f"single{seed}", shared_data, method=method, epochs=epochs, seed=seed
            ),
            progress=False,
        )
        assert_same_run(tmp_path / "group" / f"seed{seed}", tmp_path / f"single{seed}")
        assert summary["test_error"] == pytest.approx(single["test_error"], abs=1 / 10_000)
        assert summary["compression"]["nonzero"] == single["compression"]["nonzero"]
        assert summary["replicas"] == 2 and single["replicas"] == 1
    if method == "pruning":
        assert summaries[0]["compression"]["compression_ratio"] > 5  # the masks did prune


def test_replicas_draw_their_own_noise(tmp_path, shared_data):
    # two replicas of the same seed: same init and data order, so only the noise can differ
    for method in ("none", "vbd"):
        base = config(tmp_path / method, shared_data, method=method, epochs=1)
        group = [dataclasses.replace(base, out=str(tmp_path / method / name)) for name in "ab"]
        train_replicas(group, progress=False)
        a, b = (load_checkpoint(tmp_path / method / name)["model"] for name in ("a", "b"))
        same = all(torch.equal(a[key], b[key]) for key in a)
        assert same == (method == "none"), method


def test_vbd_replicas_match_single_runs_in_distribution(tmp_path, shared_data):
    seeds = range(3)
    kw = dict(method="vbd", epochs=3, train_subset=1000)
    summaries = train_replicas(
        replica_configs(config(tmp_path / "group", shared_data, **kw), len(seeds)), progress=False
    )
    singles = [
        train(config(tmp_path / f"s{s}", shared_data, seed=s, **kw), progress=False) for s in seeds
    ]

    def final(summary, key):
        rows = (tmp_path / summary["run_dir"] / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])[key]

    for key in ("kl", "test_error", "loss"):
        ours = torch.tensor([final(s, key) for s in summaries], dtype=torch.float64)
        theirs = torch.tensor([final(s, key) for s in singles], dtype=torch.float64)
        spread = torch.cat([ours, theirs]).std()
        # the same seeds: same init and order, only the noise differs
        assert (ours - theirs).abs().max() <= 4 * spread + 1e-3 * theirs.abs().max(), key
        assert len(set(ours.tolist())) == len(seeds), key  # the replicas are not copies


def test_replica_run_directories_are_ordinary_runs(tmp_path, shared_data, capsys):
    out = tmp_path / "group"
    code = main([
        "train", "--model", "lenet300_100", "--method", "vbd", "--dataset", "mnist",
        "--data-dir", str(shared_data), "--train-subset", "600", "--epochs", "2",
        "--kl-warmup", "0", "1", "--device", "cpu", "--replicas", "2", "--seed", "5",
        "--compile", "off", "--out", str(out), "--json",
    ])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [s["seed"] for s in printed["runs"]] == [5, 6]
    run = out / "seed6"
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert evaluated["test_error"] == pytest.approx(summary["test_error"], abs=1e-6)
    assert main(["compress", str(run), "--out", str(tmp_path / "shrunk"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["compression_ratio"] == pytest.approx(summary["compression"]["compression_ratio"])
    # resumed alone with one more epoch, as a single run would be
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--json"]) == 0
    resumed = load_checkpoint(run)
    assert resumed["epoch"] == 3 and len(resumed["history"]) == 3
    assert resumed["config"]["seed"] == 6


def poison_replica_1(monkeypatch, from_step):
    """NaN inputs for replica 1 of a 2-replica group from its ``from_step``-th step."""
    step = ReplicaStack.step
    calls = []

    def poisoned(self, x, y, kl_weight):
        calls.append(len(self.runs))
        if len(calls) >= from_step and len(self.runs) == 2:
            x = x.clone()
            x[1] = float("nan")
        return step(self, x, y, kl_weight)

    monkeypatch.setattr(ReplicaStack, "step", poisoned)


def test_a_diverging_replica_stops_alone(tmp_path, shared_data, monkeypatch):
    poison_replica_1(monkeypatch, from_step=14)
    group = replica_configs(config(tmp_path / "group", shared_data, epochs=3), 2)
    with pytest.raises(
        DivergenceError, match=r"replica seed 1: training diverged in epoch 3, step 2/6"
    ):
        train_replicas(group, progress=False)
    failed = json.loads((tmp_path / "group" / "seed1" / "summary.json").read_text())
    assert "loss=nan" in failed["diverged"] and failed["epochs_done"] == 2
    assert "test_error" not in failed  # no broken model reported as a result
    assert load_checkpoint(tmp_path / "group" / "seed1")["epoch"] == 2  # the last good one
    # replica 0 went on, untouched: it is still the single run of its seed
    train(config(tmp_path / "single0", shared_data, epochs=3), progress=False)
    assert_same_run(tmp_path / "group" / "seed0", tmp_path / "single0")
    assert "diverged" not in json.loads((tmp_path / "group" / "seed0" / "summary.json").read_text())


def cli(out, shared_data, epochs, *extra):
    return [
        sys.executable, "-m", "vbdropout", "train", "--model", "lenet300_100", "--method",
        "none", "--dataset", "mnist", "--data-dir", str(shared_data), "--train-subset", "600",
        "--epochs", str(epochs), "--device", "cpu", "--replicas", "2", "--seed", "0",
        "--compile", "off", "--out", str(out), "--json", *extra,
    ]  # fmt: skip


def test_a_killed_group_resumes_to_the_uninterrupted_result(tmp_path, shared_data):
    epochs = 12
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        cli(tmp_path / "g", shared_data, epochs),
        env=env,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    metrics = tmp_path / "g" / "seed1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "g" / "seed1")["epoch"]
    assert 0 < killed_at < epochs
    resumed = subprocess.run(
        cli(tmp_path / "g", shared_data, epochs, "--resume"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    for seed in (0, 1):
        rows = (tmp_path / "g" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == list(range(1, epochs + 1))
        train(
            config(tmp_path / f"single{seed}", shared_data, epochs=epochs, seed=seed),
            progress=False,
        )
        assert_same_run(tmp_path / "g" / f"seed{seed}", tmp_path / f"single{seed}")


def test_a_replica_left_behind_catches_up_alone(tmp_path, shared_data):
    group = replica_configs(config(tmp_path / "g", shared_data), 2)
    train_replicas(group, progress=False)
    lost = tmp_path / "g" / "seed1"
    shutil.rmtree(lost)
    summaries = train_replicas(group, resume=True, progress=False)  # seed 0 done, seed 1 anew
    assert [s["seed"] for s in summaries] == [0, 1]
    train(config(tmp_path / "single1", shared_data, seed=1), progress=False)
    assert_same_run(lost, tmp_path / "single1")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "dns"], "method 'dns' cannot train as replicas: its forward pass decides"),
        (["--method", "adversarial"], "method 'adversarial' cannot train as replicas"),
        (["--nproc", "2"], "--replicas and --nproc > 1 cannot be combined"),
    ],
)
def test_bad_replica_requests_are_one_line_errors_and_write_nothing(
    extra, match, tmp_path, shared_data, capsys
):
    out = tmp_path / "group"
    code = main([
        "train", "--dataset", "mnist", "--data-dir", str(shared_data), "--replicas", "2",
        "--out", str(out), *extra,
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_replicas_must_be_a_positive_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--replicas", "0", "--out", str(tmp_path / "g")])
    assert exit_.value.code == 2 and "--replicas" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        replica_configs(TrainConfig(), 0)


@pytest.mark.parametrize("model", ["lenet300_100", "lenet5_caffe"])
def test_every_method_either_trains_as_replicas_or_says_why(model, tmp_path, shared_data):
    for name, cls in METHODS.items():
        if cls.no_replicas_reason is not None:
            assert len(cls.no_replicas_reason) > 20, name
            continue
        base = config(
            tmp_path / model / name,
            shared_data,
            model=model,
            method=name,
            epochs=1,
            train_subset=200,
            batch_size=50,
        )
        summaries = train_replicas(replica_configs(base, 2), progress=False)
        assert all(0 <= s["test_error"] <= 1 for s in summaries), name
    assert method_class("vbd").no_replicas_reason is None


@pytest.mark.parametrize("prior", [HierarchicalPrior(), LogUniformPrior()])
def test_the_kl_under_vmap_has_the_custom_functions_value_and_gradient(prior):
    # under the replicas' vmap, VBD's KL keeps its hand-written function (batched by a
    # generated rule); sparse VD's takes autograd's version: the same function
    torch.manual_seed(0)
    theta = torch.randn(3, 40, 30) * torch.logspace(-4, 0, 30)
    log_sigma2 = torch.randn(3, 40, 30) * 3 - 8
    theta[:, 0, :5] = 0.0  # θ = 0 with σ² underflowing: the floor of t = θ² + σ²
    log_sigma2[:, 0, :5] = -80.0

    def kl(t, s):
        return prior.kl_sum_additive(t, s)

    batched = vmap(kl)(theta, log_sigma2)
    grads = vmap(grad(kl, argnums=(0, 1)))(theta, log_sigma2)
    exact = isinstance(prior, HierarchicalPrior)
    for k in range(3):
        t, s = theta[k].clone().requires_grad_(), log_sigma2[k].clone().requires_grad_()
        value = kl(t, s)
        value.backward()
        torch.testing.assert_close(batched[k], value.detach(), rtol=1e-5, atol=1e-3)
        tolerance = {"rtol": 1e-6, "atol": 0} if exact else {"rtol": 1e-3, "atol": 1e-4}
        torch.testing.assert_close(grads[0][k], t.grad, **tolerance)
        torch.testing.assert_close(grads[1][k], s.grad, **tolerance)
    if exact:  # KL = ½·log(1 + θ²/σ²) does not depend on σ² where θ = 0
        assert grads[1][:, 0, :5].abs().max() == 0


def test_a_scalar_parameter_keeps_its_own_adam_moments(tmp_path, shared_data):
    # concrete dropout's p_logit is 0-dim: its moments must be stacked per replica too
    base = config(tmp_path / "g", shared_data, method="concrete", epochs=3, train_subset=300)
    train_replicas(replica_configs(base, 2), progress=False)
    states = [load_checkpoint(tmp_path / "g" / f"seed{s}")["optimizer"]["state"] for s in (0, 1)]
    scalar = [i for i, st in states[0].items() if st["exp_avg"].dim() == 0]
    assert scalar, "the model has a 0-dim parameter"
    for i in scalar:
        assert states[0][i]["exp_avg"] != states[1][i]["exp_avg"]
        assert states[0][i]["step"] == states[1][i]["step"] == 3 * 3


def reproduce_table4(out, shared_data, *extra):
    return main([
        "reproduce", "table4", "--only", "^(Original|Pruning) .*lenet300", "--seeds", "2",
        "--epochs", "2", "--train-subset", "600", "--data-dir", str(shared_data),
        "--device", "cpu", "--compile", "off", "--out", str(out), "--json", *extra,
    ])  # fmt: skip


def test_reproduce_trains_the_seeds_of_a_row_as_replicas(tmp_path, shared_data, capsys):
    assert reproduce_table4(tmp_path / "on", shared_data, "--replicas", "on") == 0
    assert reproduce_table4(tmp_path / "auto", shared_data) == 0  # on a CPU: one run each
    capsys.readouterr()
    cells = {}
    for name in ("on", "auto"):
        for path in sorted((tmp_path / name).glob("table4-*/cells/*/seed*.json")):
            cell = json.loads(path.read_text())
            cells.setdefault(name, []).append(cell)
    assert [c["replicas"] for c in cells["on"]] == [2, 2, 2, 2]
    assert [c["replicas"] for c in cells["auto"]] == [1, 1, 1, 1]
    for on, alone in zip(cells["on"], cells["auto"], strict=True):  # noiseless: the same runs
        assert (on["label"], on["seed"]) == (alone["label"], alone["seed"])
        assert on["test_error"] == pytest.approx(alone["test_error"], abs=1 / 10_000)
        assert on["compression"]["nonzero"] == alone["compression"]["nonzero"]


def test_reproduce_refuses_replicas_with_other_executors(tmp_path, shared_data, capsys):
    out = tmp_path / "out"
    assert reproduce_table4(out, shared_data, "--replicas", "on", "--executor", "processes") == 1
    err = capsys.readouterr().err
    assert "replicas train in one process: use them with the local executor" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_replica_step_reads_nothing_back_to_the_host(tmp_path, shared_data, monkeypatch):
    # the hot path of a GPU run: no .item(), .tolist() or truth value of a tensor in a step
    reads, inside = [], [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kw):
            if inside[0]:
                reads.append(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = ReplicaStack.step

    def watched(self, *args):
        inside[0] = True
        try:
            return step(self, *args)
        finally:
            inside[0] = False

    monkeypatch.setattr(ReplicaStack, "step", watched)
    for method in ("vbd", "pruning", "sbp"):
        base = config(tmp_path / method, shared_data, method=method, epochs=1, train_subset=300)
        train_replicas(replica_configs(base, 2), progress=False)
    assert reads == []


def test_each_replica_may_start_from_its_own_network(tmp_path, shared_data):
    # as Table 5's rows do: each seed starts from the plain run of its seed
    parents = [config(tmp_path / f"plain{s}", shared_data, seed=s, epochs=1) for s in (0, 1)]
    for parent in parents:
        train(parent, progress=False)
    group = [
        dataclasses.replace(c, init=parent.out)
        for c, parent in zip(
            replica_configs(config(tmp_path / "g", shared_data), 2), parents, strict=True
        )
    ]
    train_replicas(group, progress=False)
    for seed, member in enumerate(group):
        alone = dataclasses.replace(member, out=str(tmp_path / f"single{seed}"))
        train(alone, progress=False)
        assert_same_run(member.out, alone.out)
    with pytest.raises(
        ValueError, match=r"replicas must differ only in seed, out and init, not in \['lr'\]"
    ):
        train_replicas([group[0], dataclasses.replace(group[1], lr=0.1)], progress=False)


def test_reproduce_trains_rows_that_start_from_other_rows_as_replicas(
    tmp_path, shared_data, capsys
):
    # Table 5: SBP's seed s starts from the "Original" run of seed s
    code = main([
        "reproduce", "table5", "--only", "^(Original|SBP) .*lenet500", "--seeds", "2",
        "--epochs", "1", "--train-subset", "600", "--data-dir", str(shared_data),
        "--device", "cpu", "--out", str(tmp_path), "--replicas", "on", "--compile", "off",
        "--json",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    cells = [
        json.loads(p.read_text()) for p in sorted(tmp_path.glob("table5-*/cells/*/seed*.json"))
    ]
    assert sorted((c["label"], c["seed"], c["replicas"]) for c in cells) == [
        ("Original", 0, 2),
        ("Original", 1, 2),
        ("SBP", 0, 2),
        ("SBP", 1, 2),
    ]
    for seed in (0, 1):
        run = next(tmp_path.glob(f"table5-*/runs/lenet500_300-sbp*-seed{seed}"))
        assert load_checkpoint(run)["config"]["init"].endswith(f"-seed{seed}")


def cli_args(out, shared_data, *extra):
    return [
        "train", "--model", "lenet300_100", "--method", "none", "--dataset", "mnist",
        "--data-dir", str(shared_data), "--train-subset", "300", "--device", "cpu",
        "--replicas", "2", "--compile", "off", "--out", str(out), "--json", *extra,
    ]  # fmt: skip


def test_a_group_resumed_without_its_seed_finds_it(tmp_path, shared_data, capsys):
    out = tmp_path / "g"
    assert main(cli_args(out, shared_data, "--seed", "5", "--epochs", "1")) == 0
    assert main(cli_args(out, shared_data, "--resume", "--epochs", "2")) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert [(s["seed"], s["epochs"]) for s in printed["runs"]] == [(5, 2), (6, 2)]
    assert sorted(p.name for p in out.iterdir()) == ["seed5", "seed6"]


@pytest.mark.parametrize("occupant", ["a run", "foreign files"])
def test_a_group_refused_for_one_replica_writes_into_none(occupant, tmp_path, shared_data, capsys):
    out = tmp_path / "g"
    if occupant == "a run":
        train(
            config(out / "seed1", shared_data, seed=1, epochs=1, train_subset=300), progress=False
        )
    else:
        (out / "seed1").mkdir(parents=True)
        (out / "seed1" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(cli_args(out, shared_data, "--epochs", "1")) == 1
    err = capsys.readouterr().err.strip()
    expected = (
        "already holds a run; pass --resume"
        if occupant == "a run"
        else "is not a vbd run directory"
    )
    assert expected in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # seed0 not made


def test_the_replica_probes_mark_only_the_replicas_with_nan_or_inf():
    from vbdropout.train.replicas import _replica_probes

    stacked = torch.zeros(3, 4, 5)
    t = torch.full((3, 4, 5), 3e38)  # huge but finite: no overflow into a false alarm
    t[1, 2, 3], t[2, 0, 0] = float("nan"), -float("inf")
    probes = _replica_probes(t, stacked)
    assert probes[0] == 0 and probes[1:].isnan().all()
    assert _replica_probes(None, stacked).tolist() == [0, 0, 0]  # no gradient
    empty = torch.zeros(3, 0, 5)  # a layer without weights
    assert _replica_probes(empty, empty).tolist() == [0, 0, 0]


def test_a_group_does_not_undo_a_setting_changed_on_one_replica(tmp_path, shared_data, capsys):
    """seed1 resumed alone with a smaller lr (the rescue of a diverged replica): resuming
    the group with seed0's lr would silently undo it; refused unless --lr sets it for all."""
    out = tmp_path / "g"
    assert main(cli_args(out, shared_data, "--epochs", "1")) == 0
    alone = [a for a in cli_args(out / "seed1", shared_data) if a not in ("--replicas", "2")]
    assert main([*alone, "--resume", "--epochs", "2", "--lr", "5e-4"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(cli_args(out, shared_data, "--resume", "--epochs", "3")) == 1
    err = capsys.readouterr().err.strip()
    assert "their lr differs (seed0 0.001, seed1 0.0005)" in err and "--lr" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(cli_args(out, shared_data, "--resume", "--epochs", "3", "--lr", "5e-4")) == 0


def test_a_cell_of_a_finished_run_keeps_how_its_steps_ran(tmp_path, shared_data, capsys):
    """A cell whose run the replica group finished records the group's own summary (how its
    steps ran), and a resume of a finished run, which runs no step, keeps it."""
    out = tmp_path / "on"
    assert reproduce_table4(out, shared_data, "--replicas", "on") == 0
    capsys.readouterr()
    cell_path = next(out.glob("table4-*/cells/*pruning*/seed1.json"))
    run_dir = json.loads(cell_path.read_text())["run_dir"]
    summary_path = tmp_path / "on" / run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["step"] = "compiled (as recorded)"
    summary_path.write_text(json.dumps(summary))
    cell_path.unlink()
    assert reproduce_table4(out, shared_data, "--replicas", "on") == 0
    assert json.loads(cell_path.read_text())["step"] == "compiled (as recorded)"
    assert main(["train", "--resume", "--out", run_dir, "--json"]) == 0
    assert json.loads(summary_path.read_text())["step"] == "compiled (as recorded)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_replicas_share_one_copy_of_the_data_on_the_device(tmp_path, shared_data):
    seen = []
    original = ReplicaStack.__init__

    def record(self, runs, *args, **kwargs):
        seen.append({run.train_x.data_ptr() for run in runs})
        original(self, runs, *args, **kwargs)

    configs = replica_configs(config(tmp_path, shared_data, device="cuda", epochs=1), 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ReplicaStack, "__init__", record)
        train_replicas(configs, progress=False)
    assert seen and all(len(pointers) == 1 for pointers in seen)


def test_replicas_resumed_one_by_one_draw_their_own_noise(tmp_path, shared_data):
    """Every checkpoint of a group holds the group's one noise state: a replica resumed
    alone draws a stream of its own (the same on every resume of it), one resumed with
    its group the group's."""
    from vbdropout.train.config import resolve_config
    from vbdropout.train.trainer import restore_run

    configs = replica_configs(config(tmp_path, shared_data, method="vbd", epochs=1), 2)
    train_replicas(configs, progress=False)
    shared = load_checkpoint(configs[0].out)["rng"]["torch"]
    assert shared.equal(load_checkpoint(configs[1].out)["rng"]["torch"])

    def draws(c, group=False):
        restore_run(resolve_config(c), torch.device("cpu"), Path(c.out), True, group=group)
        return torch.randn(4)

    alone = [draws(c) for c in configs]
    assert not alone[0].equal(alone[1])
    assert alone[0].equal(draws(configs[0]))
    with_group = draws(configs[1], group=True)
    torch.set_rng_state(shared)
    assert with_group.equal(torch.randn(4))


def test_the_command_reports_the_finished_replicas_when_one_diverged(
    tmp_path, shared_data, monkeypatch, capsys
):
    poison_replica_1(monkeypatch, from_step=5)
    assert main(cli_args(tmp_path / "g", shared_data, "--epochs", "3")) == 1
    captured = capsys.readouterr()
    runs = json.loads(captured.out.splitlines()[-1])["runs"]
    assert [("diverged" in run, "test_error" in run) for run in runs] == [
        (False, True),
        (True, False),
    ]
    (error,) = [line for line in captured.err.splitlines() if "error:" in line]
    assert error.startswith("vbd train: error: replica seed 1: training diverged in epoch 2")


def test_a_finished_group_resumed_keeps_how_its_steps_ran(tmp_path, shared_data, capsys):
    out = tmp_path / "g"
    assert main(cli_args(out, shared_data, "--epochs", "1")) == 0
    paths = [out / f"seed{seed}" / "summary.json" for seed in (0, 1)]
    for path in paths:
        path.write_text(json.dumps({**json.loads(path.read_text()), "step": "compiled (as run)"}))
    assert main(cli_args(out, shared_data, "--resume", "--epochs", "1")) == 0
    assert [json.loads(p.read_text())["step"] for p in paths] == ["compiled (as run)"] * 2
