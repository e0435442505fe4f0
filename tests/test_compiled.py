"""The training step compiled with torch.compile (``vbd train --compile``), on CPU.

On a GPU the same objective runs as CUDA graphs; here the compiled graph must give the
eager run's numbers (without noise), resume exactly, fall back to eager, leaving no
trace, when compilation fails, never hide a user's error, and every method meant to
run as one graph must trace without a graph break.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

from vbdropout import kernels
from vbdropout.cli import main
from vbdropout.io import load_checkpoint
from vbdropout.models import METHODS
from vbdropout.train import DivergenceError, TrainConfig, train
from vbdropout.train import compiled as compiled_module
from vbdropout.train.compiled import CompiledObjective, uses_compile
from vbdropout.train.loop import BatchObjective, finite_checks, make_adam, train_epoch
from vbdropout.train.runs import build_run_model, run_data

pytestmark = pytest.mark.usefixtures("one_thread")

# the methods whose forward pass reads back to the host or differentiates inside it, and
# that therefore declare a reason not to be compiled
NOT_COMPILED = {name for name, cls in METHODS.items() if cls.no_compile_reason is not None}


def config(out, shared_data, **kw):
    fields = dict(
        model="lenet300_100",
        method="none",
        dataset="mnist",
        out=str(out),
        epochs=2,
        train_subset=550,  # 5 full batches of 100 and one of 50: two graphs
        data_dir=str(shared_data),
        kl_warmup=(0, 2),
        device="cpu",
    )
    fields.update(kw)
    return TrainConfig(**fields)


def model_state(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_same_model(a, b, atol):
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


def test_compile_choice_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [uses_compile(c, cpu) for c in ("auto", "on", "off")] == [False, True, False]
    assert [uses_compile(c, cuda) for c in ("auto", "on", "off")] == [True, True, False]
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        uses_compile("yes", cpu)


def test_compiled_run_equals_the_eager_run_without_noise(tmp_path, shared_data):
    """The command users take: ``--compile on`` ends where ``--compile off`` ends."""
    common = ["train", "--method", "none", "--dataset", "mnist", "--train-subset", "550"]
    common += ["--epochs", "2", "--device", "cpu", "--data-dir", str(shared_data), "--json"]
    main([*common, "--compile", "on", "--out", str(tmp_path / "on")])
    main([*common, "--compile", "off", "--out", str(tmp_path / "off")])
    # Adam moves a weight whose gradient is near 0 by about lr·sign(gradient), so the
    # rounding of a fused graph can move it by up to lr a step: 12 steps at lr 1e-3
    assert_same_model(tmp_path / "on", tmp_path / "off", atol=1e-3)
    on = json.loads((tmp_path / "on" / "summary.json").read_text())
    off = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert on["step"] == "compiled (torch.compile, mode default)"
    assert off["step"] == "eager"
    assert on["test_error"] == pytest.approx(off["test_error"], abs=1e-9)
    assert on["config"]["compile"] == "on"


def test_compiled_vbd_resumes_exactly(tmp_path, shared_data):
    """A compiled VBD run stopped after one epoch and resumed ends exactly where the
    uninterrupted compiled run ends (the trial passes leave the random state alone)."""
    whole = train(config(tmp_path / "whole", shared_data, method="vbd", compile="on"))
    train(config(tmp_path / "part", shared_data, method="vbd", compile="on", epochs=1))
    resumed = train(config(tmp_path / "part", shared_data, method="vbd", compile="on"), resume=True)
    assert_same_model(tmp_path / "whole", tmp_path / "part", atol=0)
    assert resumed["test_error"] == whole["test_error"]
    assert resumed["step"].startswith("compiled")


def test_a_run_may_change_compile_on_resume(tmp_path, shared_data):
    train(config(tmp_path / "run", shared_data, epochs=1, compile="off"))
    summary = train(config(tmp_path / "run", shared_data, compile="on"), resume=True)
    assert summary["step"].startswith("compiled")
    changed = [change["changed"] for change in summary["resume_changes"]]
    assert changed == [{"epochs": [1, 2], "lr_decay_start": [0, 1]}]  # compile is not one


def failing_compile(stage):
    """A stand-in for torch.compile whose graphs fail in the forward or backward pass, or
    in the forward pass from the ninth call on ("later")."""

    class BackwardFails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward graph failed to compile")

    def compile_(fn, **kwargs):
        calls = []

        def graph(*inputs):
            calls.append(1)
            if stage == "forward" or (stage == "later" and len(calls) > 8):
                raise RuntimeError("no working C++ compiler\nsecond line")
            terms, wrong = fn(*inputs)  # a single run's objective
            return terms._replace(loss=BackwardFails.apply(terms.loss)), wrong

        return graph

    return compile_


@pytest.mark.parametrize("stage", ["forward", "backward", "later"])
def test_failed_compilation_trains_eagerly_as_if_never_compiled(
    tmp_path, shared_data, monkeypatch, stage
):
    """A graph that fails (forward or, first at the backward pass, backward; or at a later
    step, as a recompilation would) makes the run eager with one warning; a failed trial
    leaves no trace: the run equals an eager one (VBD, so that the random state counts;
    the stand-in graphs compute what the eager objective computes)."""
    eager = train(config(tmp_path / "eager", shared_data, method="vbd", compile="off"))
    monkeypatch.setattr(compiled_module.torch, "compile", failing_compile(stage))
    with pytest.warns(RuntimeWarning, match="torch.compile failed, training eagerly") as caught:
        summary = train(config(tmp_path / "fell", shared_data, method="vbd", compile="on"))
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    assert summary["step"].startswith("eager: torch.compile failed (RuntimeError: ")
    assert "second line" not in summary["step"]
    assert_same_model(tmp_path / "eager", tmp_path / "fell", atol=0)
    assert summary["test_error"] == eager["test_error"]


def small_model(shared_data, method="vbd", model="lenet300_100"):
    cfg = TrainConfig(
        model=model, method=method, data_dir=str(shared_data), train_subset=200, device="cpu"
    )
    from vbdropout.train.config import resolve_config

    cfg = resolve_config(cfg)
    data = run_data(cfg)
    torch.manual_seed(0)
    return build_run_model(cfg, data).train(), data


@pytest.mark.parametrize("method", ["none", "pruning"])
def test_compiled_gradients_equal_eager_gradients(shared_data, method):
    """The objective and its gradient, compiled, are the eager ones to float rounding."""
    model, data = small_model(shared_data, method)
    x, y = data.train_x[:100], data.train_y[:100]
    eager = BatchObjective(model, 200)
    terms, wrong = eager(x, y, 0.5)
    terms.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    terms_c, wrong_c = CompiledObjective(model, 200, torch.device("cpu"))(x, y, 0.5)
    terms_c.loss.backward()
    for a, b in zip(terms_c, terms, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(wrong_c, wrong)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_a_users_error_is_raised_not_taken_for_a_failed_compilation(shared_data):
    model, data = small_model(shared_data)
    objective = CompiledObjective(model, 200, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile failed")  # no fallback
        with pytest.raises(ValueError, match="expects inputs whose last dimension"):
            objective(data.train_x[:10].reshape(10, -1)[:, :100], data.train_y[:10], 1.0)
    assert objective.compiled and objective.status.startswith("compiled")


def test_the_trial_pass_leaves_no_trace(shared_data):
    """The first call per batch shape runs the graph forward and backward once more: the
    random state, parameters and gradients are those of one call."""
    model, data = small_model(shared_data)
    x, y = data.train_x[:100], data.train_y[:100]
    objective = CompiledObjective(model, 200, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    objective.step._trial((x, y), objective.state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # gradients held before the trial keep their values (the trial's do not add to them)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    objective.step._trial((x, y), objective.state)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    # a full call after the trial: the same terms as the compiled graph from that state
    terms, wrong = objective(x, y, 0.5)
    torch.set_rng_state(rng)
    again, wrong_again = objective(x, y, 0.5)
    assert torch.equal(terms.loss, again.loss) and torch.equal(wrong, wrong_again)


def test_kl_weight_changes_without_recompiling(shared_data):
    """β (a KL warm-up changes it at every step) enters the graph as a tensor: one graph."""
    model, data = small_model(shared_data)
    objective = CompiledObjective(model, 200, torch.device("cpu"))
    x, y = data.train_x[:100], data.train_y[:100]
    losses = [objective(x, y, 0.0)[0]]  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += [objective(x, y, beta)[0] for beta in (0.25, 1.0)]
    for beta, terms in zip((0.0, 0.25, 1.0), losses, strict=True):
        expected = terms.nll + beta * terms.kl / 200
        torch.testing.assert_close(terms.loss, expected)


@pytest.mark.parametrize("checks", ["step", "epoch"])
def test_divergence_is_caught_in_a_compiled_step(shared_data, checks):
    """With the layers' own checks off in the graph, a NaN parameter is still refused
    before any update: by the loss check (the run's one-line error)."""
    model, data = small_model(shared_data)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    optimizer = make_adam(model.parameters(), 1e-3)
    objective = CompiledObjective(model, 200, torch.device("cpu"))
    with pytest.raises(DivergenceError, match=r"step 1/2: loss=nan"):
        train_epoch(
            model,
            optimizer,
            data.train_x,
            data.train_y,
            batch_size=100,
            kl_weight=1.0,
            checks=checks,
            objective=objective,
        )


@pytest.mark.parametrize("model_name", ["lenet300_100", "lenet5_caffe"])
def test_methods_trace_as_one_graph(shared_data, model_name):
    """Every method's objective but those declaring a ``no_compile_reason`` traces as one
    graph, forward and backward (what CUDA graphs need; checked with the fast aot_eager
    backend); those that declare one do not."""
    kernels.available()  # the kernels' first build is not traced
    breaking = set()
    for method in METHODS:
        model, data = small_model(shared_data, method, model_name)
        objective = BatchObjective(model, 200)
        graph = torch.compile(objective.terms, backend="aot_eager", fullgraph=True)
        try:
            with finite_checks(model, enabled=False):  # as train_epoch runs a compiled step
                terms, _ = graph(data.train_x[:50], data.train_y[:50], torch.tensor(1.0))
            terms.loss.backward()
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):
            breaking.add(method)
        finally:
            torch._dynamo.reset()
    assert breaking == NOT_COMPILED == {"adversarial", "dns", "sws"}


def test_bad_compile_choices_are_one_line_and_write_nothing(tmp_path, shared_data, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--compile", "maybe", "--out", str(tmp_path / "a")])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    toml = tmp_path / "bad.toml"
    toml.write_text('compile = "sometimes"\n')
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile must be auto, on or off, got 'sometimes'" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def replica_group(out, shared_data, replicas=2, **kw):
    from vbdropout.train import replica_configs

    return replica_configs(config(out, shared_data, train_subset=600, epochs=3, **kw), replicas)


def test_compiled_replicas_equal_eager_replicas_and_compile_once(tmp_path, shared_data):
    """Replicas compiled (the vmapped objective of the stack, rebuilt every epoch) end
    where eager replicas end, without noise, and compile once: no recompilation in later
    epochs (error_on_recompile would fail the trial, so the step would say eager)."""
    from vbdropout.train import train_replicas

    with torch._dynamo.config.patch(error_on_recompile=True):
        on = train_replicas(replica_group(tmp_path / "on", shared_data, compile="on"))
    off = train_replicas(replica_group(tmp_path / "off", shared_data, compile="off"))
    for a, b in zip(on, off, strict=True):
        assert a["step"] == "compiled (torch.compile, mode default)" and b["step"] == "eager"
        assert_same_model(Path(a["run_dir"]), Path(b["run_dir"]), atol=1e-3)


def test_failed_compilation_of_replicas_falls_back_once(tmp_path, shared_data, monkeypatch):
    from vbdropout.train import train_replicas

    eager = train_replicas(
        replica_group(tmp_path / "eager", shared_data, method="vbd", compile="off")
    )
    monkeypatch.setattr(compiled_module.torch, "compile", failing_compile("forward"))
    group = replica_group(tmp_path / "fell", shared_data, method="vbd", compile="on")
    with pytest.warns(RuntimeWarning, match="torch.compile failed") as caught:
        fell = train_replicas(group)
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    for a, b in zip(fell, eager, strict=True):
        assert a["step"].startswith("eager: torch.compile failed (RuntimeError: no working C++")
        assert_same_model(Path(a["run_dir"]), Path(b["run_dir"]), atol=0)


def test_reproduce_passes_compile_to_its_cells(tmp_path, shared_data, capsys):
    out = tmp_path / "out"
    status = main([
        "reproduce", "table4", "--only", "^Original .*lenet300", "--epochs", "1",
        "--train-subset", "600", "--data-dir", str(shared_data), "--device", "cpu",
        "--compile", "on", "--out", str(out), "--json",
    ])  # fmt: skip
    assert status == 0
    capsys.readouterr()
    (path,) = out.glob("table4-*/cells/*/seed0.json")
    cell = json.loads(path.read_text())
    assert cell["step"] == "compiled (torch.compile, mode default)"
    config = (Path(cell["run_dir"]) / "config.toml").read_text()
    assert 'compile = "on"' in config


class CountingNet(torch.nn.Module):
    """A linear classifier whose forward pass counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls.add_(1)
        return self.linear(x.flatten(1))


def test_the_trial_puts_back_buffers_a_forward_pass_changes(shared_data):
    model, (x, y) = CountingNet(), (torch.randn(20, 784), torch.randint(0, 10, (20,)))
    objective = CompiledObjective(model, 200, torch.device("cpu"))
    objective(x, y, 1.0)  # trial, then the call
    assert objective.compiled and int(model.calls) == 1


def eager_dynamo(monkeypatch):
    """torch.compile with dynamo's eager backend: the same guards and recompile limits,
    no code generation (fast)."""
    compile_ = torch.compile
    monkeypatch.setattr(
        compiled_module.torch, "compile", lambda fn, **kw: compile_(fn, backend="eager")
    )


METHODS_IN_A_ROW = ["none", "bernoulli", "gaussian", "vd_a", "vd_b", "vbd", "pruning"]


def objectives_in_a_row(shared_data):
    """One compiled objective per method, each called with two batch shapes, in turn, all
    kept alive (as reference cycles may keep finished runs until a garbage collection)."""
    statuses, alive = [], []
    for method in METHODS_IN_A_ROW:
        model, data = small_model(shared_data, method)
        objective = CompiledObjective(model, 200, torch.device("cpu"))
        with finite_checks(model, enabled=False):
            for batch in (100, 50):
                objective(data.train_x[:batch], data.train_y[:batch], 1.0)
        statuses.append(objective.status)
        alive.append(objective)
    return statuses


def test_runs_in_one_process_do_not_reach_the_recompile_limit(shared_data, monkeypatch):
    """Each compiled run starts from empty caches: 7 methods × 2 shapes of the same code
    (vbd reproduce trains its cells in one process) all stay compiled, under a recompile
    limit of 3 graphs per code (torch's is 8)."""
    eager_dynamo(monkeypatch)
    with torch._dynamo.config.patch(recompile_limit=3):
        statuses = objectives_in_a_row(shared_data)
    assert statuses == ["compiled (torch.compile, mode default)"] * len(METHODS_IN_A_ROW)


def test_reaching_the_recompile_limit_falls_back_visibly(shared_data, monkeypatch):
    """Without the reset the shared code reaches the recompile limit (3 here); that is
    then a failed compilation (eager, with the reason), not a silent eager run."""
    eager_dynamo(monkeypatch)
    torch.compiler.reset()
    monkeypatch.setattr(compiled_module.torch.compiler, "reset", lambda: None)
    with torch._dynamo.config.patch(recompile_limit=3), pytest.warns(RuntimeWarning):
        statuses = objectives_in_a_row(shared_data)
    assert statuses[0].startswith("compiled")
    assert statuses[-1].startswith("eager: torch.compile failed (FailOnRecompileLimitHit: ")


@pytest.mark.parametrize("method", sorted(NOT_COMPILED))
def test_a_method_that_breaks_the_graph_trains_eagerly_and_says_why(tmp_path, shared_data, method):
    with pytest.warns(RuntimeWarning, match=f"compile on: {method} is not compiled: "):
        summary = train(config(tmp_path / "run", shared_data, method=method, compile="on"))
    assert summary["step"].startswith(f"eager: {method} is not compiled: its ")
    auto = train(config(tmp_path / "auto", shared_data, method=method, epochs=1))
    assert auto["step"] == "eager"  # auto on a CPU: not asked for, nothing to say


def test_the_command_line_prints_the_reason_as_one_warning_line(tmp_path, shared_data):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "vbdropout", "train", "--method", "sws", "--epochs", "1"]
    argv += ["--train-subset", "550", "--device", "cpu", "--data-dir", str(shared_data)]
    argv += ["--compile", "on", "--out", str(tmp_path / "run"), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "is not compiled" in line]
    assert lines == [
        "vbd train: warning: compile on: sws is not compiled: its prior reads on the host, at "
        "every step, whether it acts yet (a graph break and retracing when it starts); "
        "training eagerly"
    ]
    assert "RuntimeWarning" not in done.stderr


def test_replicas_compile_by_default_on_a_cpu_single_runs_do_not(tmp_path, shared_data, capsys):
    """``auto``: on a CPU replicas (no fused kernels under vmap) are faster compiled,
    single runs eager (benchmarks/bench_compile.py)."""
    argv = ["train", "--method", "vbd", "--train-subset", "600", "--epochs", "1"]
    argv += ["--device", "cpu", "--data-dir", str(shared_data), "--json"]
    assert main([*argv, "--replicas", "2", "--out", str(tmp_path / "group")]) == 0
    group = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"]
    assert [r["step"] for r in group] == ["compiled (torch.compile, mode default)"] * 2
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == "eager"
    assert main([*argv, "--replicas", "2", "--method", "sws", "--out", str(tmp_path / "s")]) == 0
    sws = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"]
    assert all(r["step"].startswith("eager: sws is not compiled: its prior") for r in sws)
