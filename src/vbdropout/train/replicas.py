"""``vbd train --replicas K``: K seeds of one run trained at once, as one batched model.

Replica k is the run of ``configs[k]`` (the CLI: seed S + k in ``OUT/seed{S+k}``), each
an ordinary run directory that ``vbd eval``, ``vbd compress`` and ``vbd train --resume``
take as if it had been trained alone: its own initialization (built exactly as a single
run of its seed), data order (its own shuffling generator), optimizer state,
checkpoint, metrics and summary. Only the noise differs from the single run: the
replicas draw it from torch's one generator, each its own (``vmap``'s
``randomness="different"``), whose state every replica's checkpoint holds (a replica
resumed alone draws a stream of its own: :func:`~.trainer.restore_run`); for a method
without noise (``none``) replica k ends where the single run of its seed ends, to float
rounding.

One training step runs every replica's forward pass and objective (Eq. 18 per replica)
as one ``torch.func.vmap`` over the replicas' parameters stacked on a leading dimension
(:class:`ReplicaStack`), one backward pass and one fused Adam step over the stacked
tensors; Adam is elementwise, so that is K independent Adams. Between epochs the
replicas are ordinary models again: their training events, test, checkpoint and
metrics are those of a single run (:func:`~.trainer.record_epoch`); the replicas'
checkpoints of an epoch are written back to back once every replica was tested.

The checks of every step (loss, KL, gradients, parameters, σ² overflow; per replica)
stay on the device and are read once per epoch, so a step needs no host sync. A replica
whose step failed stops alone at the end of that epoch: its last good checkpoint (of
the epoch before) is kept, its ``summary.json`` says ``diverged`` (and where and why),
and the others go on; the command then ends with an error naming it. Killed runs continue with
``--resume``; a kill between two replicas' checkpoints of one epoch (a few milliseconds
per epoch) leaves some an epoch behind, and these catch up alone first (with other noise
than the group's: not bit-identical to an uninterrupted group).

Methods whose step is not a pure function of parameters, buffers and batch say why in
:attr:`~vbdropout.models.methods.Method.no_replicas_reason` and are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..io import remove_stale_temp_files
from ..losses import elbo_terms
from ..models.methods import method_class
from ..nn.base import StochasticModule, VariationalModule, optimizer_stepped
from . import rundir
from .compiled import CompiledStep, compile_mode, compiles, not_compiled
from .config import ConfigError, TrainConfig, resolve_config
from .loop import (
    REPORT_EVERY,
    DivergenceError,
    eager_status,
    finite_checks,
    first_failed,
    gradient_message,
    loss_message,
    make_adam,
    parameter_message,
    variance_message,
)
from .progress import ProgressBar
from .runs import resolve_device, run_data
from .trainer import (
    Run,
    TrainingInterrupted,
    diverged,
    epoch_kl_weight,
    holds_run,
    record_epoch,
    restore_run,
    run_epoch,
    run_setup,
    run_summary,
    save_epoch,
    start_files,
    write_summary,
)

__all__ = ["ReplicaStack", "replica_configs", "train_replicas"]

# what becomes of a failed replica's steps (in the divergence messages)
_DISCARDED = "this replica's epoch is discarded"
# the fields in which the replicas of one group may differ (init: each replica may start
# from its own trained network, e.g. the plain run of its seed)
_OWN_FIELDS = ("seed", "out", "init")


def replica_configs(config: TrainConfig, replicas: int) -> list[TrainConfig]:
    """The configs of ``replicas`` replicas of ``config``: seeds S..S+K−1 (S = its seed),
    run directories ``OUT/seed{S+k}`` (OUT = its ``out``)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas must be an integer >= 1, got {replicas!r}")
    return [
        dataclasses.replace(config, seed=seed, out=str(Path(config.out) / f"seed{seed}"))
        for seed in range(config.seed, config.seed + replicas)
    ]


def _check_group(configs: list[TrainConfig]) -> None:
    """Refuse a group that is not K runs of one configuration (one line each)."""
    if not configs:
        raise ConfigError("replicas: no run given")
    first = configs[0]
    for config in configs[1:]:
        differ = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if f.name not in _OWN_FIELDS and getattr(config, f.name) != getattr(first, f.name)
        ]
        if differ:
            raise ConfigError(f"replicas must differ only in seed, out and init, not in {differ}")
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) < len(outs):
        raise ConfigError("replicas need one run directory each; two share one")
    if first.nproc > 1:
        raise ConfigError("--replicas and --nproc > 1 cannot be combined; choose one")
    reason = method_class(first.method).no_replicas_reason
    if reason is not None:
        raise ConfigError(f"method {first.method!r} cannot train as replicas: {reason}")


class ReplicaStack:
    """K models of one architecture trained as one: their parameters stacked on a leading
    dimension (leaf tensors of one fused Adam, whose state is the K optimizers'), their
    buffers stacked where they differ and shared where equal.

    While the stack lives, every model's parameters are views of the stacked tensors, so
    the models see each step (their ``after_optimizer_step`` runs after it); :meth:`release`
    gives the models their own copies back and their optimizers the stacked state.
    """

    def __init__(self, runs: list[Run], lr: float, compiled: CompiledStep | None = None) -> None:
        self.runs, self.compiled = runs, compiled
        models = [run.model for run in runs]
        named = [dict(model.named_parameters()) for model in models]
        self.params = {
            name: torch.stack([p[name].detach() for p in named]).requires_grad_(
                named[0][name].requires_grad
            )
            for name in named[0]
        }
        for k, params in enumerate(named):  # the models' parameters become views of the stack
            for name, p in params.items():
                p.data = self.params[name].detach()[k]
        buffers = [dict(model.named_buffers()) for model in models]
        self.shared = {
            name: b
            for name, b in buffers[0].items()
            if all(torch.equal(b, o[name]) for o in buffers)
        }
        self.batched = {
            name: torch.stack([o[name] for o in buffers])
            for name in buffers[0]
            if name not in self.shared
        }
        self.optimizer = make_adam(self.params.values(), lr)
        self._stack_optimizer_state(named)
        self.model, self.dataset_size = models[0], runs[0].train_x.shape[0]
        # where each tensor sits in the model: (module, attribute, name), each once
        modules = dict(self.model.named_modules())
        self.slots = [
            (modules[prefix], kind, attribute, name)
            for kind, named in (
                ("_parameters", self.model.named_parameters()),
                ("_buffers", self.model.named_buffers()),
            )
            for name, _ in named
            for prefix, _, attribute in [name.rpartition(".")]
        ]
        self.modules = [
            m for model in models for m in model.modules() if isinstance(m, StochasticModule)
        ]
        self.variance_modules = [  # per model, the modules whose σ² can overflow
            [
                (name, m)
                for name, m in model.named_modules()
                if isinstance(m, VariationalModule) and m.variance_overflows() is not None
            ]
            for model in models
        ]
        # what a compiled step's trial puts back
        self.state = [*self.params.values(), *self.batched.values(), *self.shared.values()]

    def _stack_optimizer_state(self, named: list[dict[str, nn.Parameter]]) -> None:
        """The stacked Adam's state from the runs' optimizers (none before the first step):
        the moments stacked, the step count (the same in every replica) once."""
        for name, stacked in self.params.items():
            states = [
                run.optimizer.state.get(p[name]) for run, p in zip(self.runs, named, strict=True)
            ]
            if all(not s for s in states):
                continue
            if not all(states):
                raise RuntimeError(f"replicas: only some optimizers hold a state for {name}")
            steps = {float(s["step"]) for s in states}
            if len(steps) > 1:
                raise RuntimeError(f"replicas: the optimizers stepped {name} {sorted(steps)} times")
            self.optimizer.state[stacked] = {
                key: value.clone() if key == "step" else torch.stack([s[key] for s in states])
                for key, value in states[0].items()
            }

    def _objective(
        self, batched: dict[str, Tensor], x: Tensor, y: Tensor, kl_weight: float | Tensor
    ) -> Tensor:
        """One replica's (under ``vmap``) negative ELBO per example (Eq. 18 over N
        examples, the KL weighted by ``kl_weight``), mean cross-entropy, KL and wrong
        predictions of its batch."""
        tensors = {**self.shared, **batched}
        saved = [
            (module, kind, attr, getattr(module, kind)[attr])
            for module, kind, attr, _ in self.slots
        ]
        # the tensors in place of the model's own (a module shared by several layers, as
        # soft weight-sharing's prior, sits in one slot; torch.func.functional_call does
        # not put such a module's parameters back)
        for module, kind, attr, name in self.slots:
            getattr(module, kind)[attr] = tensors[name]
        try:
            logits = self.model(x)
            terms = elbo_terms(logits, y, self.model, self.dataset_size, kl_weight, "mean")
        finally:
            for module, kind, attr, original in saved:
                getattr(module, kind)[attr] = original
        wrong = (logits.argmax(1) != y).sum().to(terms.loss.dtype)
        return torch.stack([terms.loss, terms.nll, terms.kl, wrong])

    def batched_terms(
        self, batched: dict[str, Tensor], x: Tensor, y: Tensor, kl_weight: float | Tensor
    ) -> Tensor:
        """Every replica's :meth:`_objective`, one row each (compiled as
        ``ReplicaStack.batched_terms``, the stack one of its inputs, so that the stacks of
        later epochs run the same graphs)."""
        objective = functools.partial(self._objective, kl_weight=kl_weight)
        return vmap(objective, randomness="different")(batched, x, y)

    def step(self, x: Tensor, y: Tensor, kl_weight: float) -> Tensor:
        """One training step of every replica on its batch (``x``: (K, B, ...), ``y``: (K, B)).

        Returns a (K, 4 + 2P + V) float64 matrix on the device, one row per replica: its
        loss, mean cross-entropy, KL and wrong predictions, one probe per parameter's
        gradient and per parameter after the update (0, or NaN where non-finite), and its
        σ² overflow flags (see :func:`failure`).
        """
        batched = {**self.params, **self.batched}
        with finite_checks(self.model, enabled=False), warnings.catch_warnings():
            # ops without a batching rule (SBP's log_ndtr) run per replica: correct, slower
            warnings.filterwarnings("ignore", "There is a performance drop because we have not")
            if self.compiled is None:
                out = self.batched_terms(batched, x, y, kl_weight)
            else:
                out = self.compiled(self, batched, x, y, kl_weight=kl_weight, state=self.state)
        self.optimizer.zero_grad(set_to_none=True)
        _total_loss(out).backward()
        stacked = list(self.params.values())
        grads = [_replica_probes(p.grad, p) for p in stacked]
        self.optimizer.step()
        optimizer_stepped(self.modules)
        params = [_replica_probes(p, p) for p in stacked]
        columns = [out.detach(), torch.stack(grads, 1), torch.stack(params, 1)]
        if self.variance_modules[0]:
            flags = [[m.variance_overflows() for _, m in named] for named in self.variance_modules]
            columns.append(torch.stack([torch.stack(f) for f in flags]))
        return torch.cat([c.to(torch.float64) for c in columns], 1)

    def failure(self, k: int, row: list[float], where: str) -> str | None:
        """What went wrong in replica ``k``'s step (its row of :meth:`step`), else None."""
        names, p = list(self.params), len(self.params)
        loss, kl = row[0], row[2]
        if not (math.isfinite(loss) and math.isfinite(kl)):
            return loss_message(where, loss, kl, _DISCARDED)
        grads, params, flags = row[4 : 4 + p], row[4 + p : 4 + 2 * p], row[4 + 2 * p :]
        if (bad := first_failed(grads)) is not None:
            return gradient_message(where, names[bad], loss, kl, _DISCARDED)
        if (bad := first_failed(params)) is not None:
            return parameter_message(where, names[bad])
        if (bad := first_failed(flags)) is not None:
            return variance_message(where, self.variance_modules[k][bad][0])
        return None

    def release(self) -> None:
        """The models' parameters their own tensors again, the runs' optimizers the
        stacked optimizer's state (replica k's slice)."""
        for k, run in enumerate(self.runs):
            for name, p in run.model.named_parameters():
                p.data = p.data.clone()
                state = self.optimizer.state.get(self.params[name])
                if state:
                    run.optimizer.state[p] = {
                        key: value.clone() if key == "step" else value[k].clone()
                        for key, value in state.items()
                    }


def _replica_probes(t: Tensor | None, stacked: Tensor) -> Tensor:
    """Per replica (leading dimension of the stacked parameter ``stacked``), 0, or NaN where
    the replica's slice of ``t`` holds a NaN or inf (zeros for a missing gradient, ``t =
    None``, and for an empty ``t``, which has no max): max·0 + min·0 of the slice, two
    reductions (a fourth of the time of Σ t·0, which writes a temporary as large as ``t``),
    and no overflow from finite values."""
    if t is None or t.numel() == 0:  # no gradient, or a layer without weights: finite
        return stacked.new_zeros(stacked.shape[0])
    flat = t.detach().reshape(stacked.shape[0], -1)
    return flat.amax(1) * 0 + flat.amin(1) * 0


@dataclass
class _Replica:
    """One replica of a group: its run and where it stands."""

    run: Run
    board: Any
    diverged: str | None = None  # why it stopped


def train_replicas(
    configs: list[TrainConfig], resume: bool = False, progress: bool = True, force: bool = False
) -> list[dict[str, Any]]:
    """Train (or resume) the runs of ``configs`` as replicas of one batched model; returns
    their summaries (as written to each ``summary.json``), in order.

    ``configs`` differ only in ``seed``, ``out`` and ``init`` (:func:`replica_configs`
    makes them).
    Raises :class:`~.loop.DivergenceError` after the others finished when a replica
    diverged (its summary says so); ``force`` as for :func:`~.trainer.train`.
    """
    configs = [resolve_config(c) for c in configs]
    _check_group(configs)
    device = resolve_device(configs[0].device)
    torch.set_flush_denormal(True)
    outs = [Path(c.out) for c in configs]
    for out in outs:  # every refusal before anything is written
        rundir.check_out(out, force)
        holds_run(out, resume)
    with ExitStack() as locks:
        for out in outs:
            locks.enter_context(rundir.claimed(out, force))
            remove_stale_temp_files(out, rundir.RUN_FILES)
        try:
            return _train_group(configs, device, resume, progress)
        except KeyboardInterrupt as err:
            how = f" by {err.args[0]}" if err.args else ""
            raise TrainingInterrupted(
                f"interrupted{how}; every replica keeps its last checkpoint: continue with the "
                f"same command and --resume"
            ) from None


def _train_group(
    configs: list[TrainConfig], device: torch.device, resume: bool, progress: bool
) -> list[dict[str, Any]]:
    data = run_data(configs[0]).to(device)  # one copy on the device for all the replicas
    runs = [restore_run(c, device, Path(c.out), resume, data, group=True) for c in configs]
    for run in runs:  # once every checkpoint passed its checks
        start_files(run)
    replicas = [_Replica(run, rundir.tensorboard(run.out)) for run in runs]
    config, steps = configs[0], runs[0].steps
    bar = ProgressBar(
        config.epochs * steps,
        f"{config.model}/{config.method} ×{len(runs)}",
        enabled=None if progress else False,
    )
    start, status = max(run.start_epoch for run in runs), ""
    for replica in replicas:  # a kill may have left some checkpoints an epoch behind
        for epoch in range(replica.run.start_epoch, start):
            _train_alone(replica, epoch)
    compiled = (  # one for the group: its graphs serve the stacks of every epoch
        CompiledStep(ReplicaStack.batched_terms, _total_loss, device, compile_mode(device))
        if compiles(config.compile, device, runs[0].method, replicas=True)
        else None
    )
    for epoch in range(start, config.epochs):
        status = _group_epoch([r for r in replicas if r.diverged is None], epoch, bar, compiled)
    bar.close(status)
    why = not_compiled(config.compile, device, runs[0].method, replicas=True)
    step = eager_status(why) if compiled is None else compiled.status
    summaries = []
    for replica in replicas:
        if replica.board is not None:
            replica.board.close()
        summaries.append(write_summary(replica.run, _replica_summary(replica, step)))
    failed = [r for r in replicas if r.diverged is not None]
    if failed:
        done = [str(r.run.out) for r in replicas if r.diverged is None]
        raise DivergenceError(
            "; ".join(f"replica seed {r.run.config.seed}: {r.diverged}" for r in failed)
            + (f"; finished: {', '.join(done)}" if done else "")
        )
    return summaries


def _train_alone(replica: _Replica, epoch: int) -> None:
    """Epoch ``epoch`` of one replica on its own (a single run's epoch)."""
    if replica.diverged is not None:
        return
    bar = ProgressBar(1, "", enabled=False)
    try:
        run_epoch(replica.run, epoch, bar, replica.board, "")
    except DivergenceError as err:
        replica.diverged = str(err)


def _total_loss(rows: Tensor) -> Tensor:
    """The sum of the replicas' losses (rows of :meth:`ReplicaStack.batched_terms`): its
    gradient is every replica's own, since they share no parameter."""
    return rows[:, 0].sum()


def _group_epoch(
    active: list[_Replica], epoch: int, bar: ProgressBar, compiled: CompiledStep | None
) -> str:
    """Train epoch ``epoch`` of the ``active`` replicas together (their objective run by
    ``compiled``, else eagerly); then test, log and checkpoint each that did not diverge.
    Returns the progress bar's status line.

    The steps' rows (:meth:`ReplicaStack.step`) stay on the device and are read once, at
    the end of the epoch (and for the progress bar every :data:`~.loop.REPORT_EVERY`
    steps): no host sync per step. A replica whose step failed goes on computing (NaN
    stays in its own slices: the replicas share no parameter) until the epoch ends and
    is then dropped, its checkpoint of the previous epoch kept, so the others' steps are
    exactly those they would have taken without it.
    """
    if not active:
        return ""
    run0 = active[0].run
    config, steps, x, y = run0.config, run0.steps, run0.train_x, run0.train_y
    n, batch = x.shape[0], config.batch_size
    orders = []  # each replica's order of the training examples, drawn as a single run draws it
    for replica in active:
        gen = replica.run.generator
        orders.append(torch.randperm(n, generator=gen, device=gen.device).to(x.device))
        replica.run.model.train()
    lr = run0.optimizer.param_groups[0]["lr"]
    stack = ReplicaStack([r.run for r in active], lr, compiled)
    started = time.perf_counter()
    rows: list[Tensor] = []  # per step, one row per replica (on the device)
    beta = 0.0
    for step in range(steps):
        beta = epoch_kl_weight(config, epoch + step / steps)
        index = torch.stack([order[step * batch : (step + 1) * batch] for order in orders])
        rows.append(stack.step(x[index], y[index], beta))
        if bar.enabled and ((step + 1) % REPORT_EVERY == 0 or step + 1 == steps):
            losses = torch.stack([r[:, 0] for r in rows]).mean(0).tolist()  # per step: shown
            low, high = min(losses), max(losses)
            bar.update(epoch * steps + step + 1, f"ep {epoch + 1} loss {low:.4f}..{high:.4f}")
    stack.release()
    seconds = time.perf_counter() - started
    table = torch.stack(rows, 1).tolist()  # replica × step × row: the epoch's one read
    sizes = [min(batch, n - s * batch) for s in range(steps)]
    status, trained, recorded = "", len(active), []
    for k, (replica, mine) in enumerate(zip(active, table, strict=True)):
        failures = (stack.failure(k, row, f"step {s + 1}/{steps}") for s, row in enumerate(mine))
        why = next((w for w in failures if w is not None), None)
        if why is not None:
            replica.diverged = str(diverged(replica.run, epoch, DivergenceError(why)))
            continue
        stats = {
            "loss": sum(r[0] * b for r, b in zip(mine, sizes, strict=True)) / n,
            "nll": sum(r[1] * b for r, b in zip(mine, sizes, strict=True)) / n,
            "kl": mine[-1][2],
            "train_error": sum(r[3] for r in mine) / n,
            "kl_weight": beta,
            "seconds": seconds,
        }
        with warnings.catch_warnings():  # its optimizer was stepped through the stack
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            status, rng_ranks = record_epoch(replica.run, epoch, stats, replica.board, trained)
        recorded.append((replica.run, rng_ranks))
    for run, rng_ranks in recorded:  # back to back: a kill rarely lands between them
        save_epoch(run, epoch, rng_ranks)
    return status


def _replica_summary(replica: _Replica, step: str) -> dict[str, Any]:
    """The summary of one replica: a single run's, saying how the group's last steps ran
    (``step``); for a replica that diverged, its setup, its last good epoch's scores and
    why it stopped."""
    run = replica.run
    if replica.diverged is None:
        return {**run_summary(run), "step": step}
    return {
        **run_setup(run),
        "step": step,
        "diverged": replica.diverged,
        "epochs_done": len(run.history),
        "last_epoch": run.history[-1] if run.history else None,
    }
