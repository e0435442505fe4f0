"""One epoch of SGVLB training and the evaluation of a classifier, on in-memory tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import iterate_batches
from ..losses import ElboTerms, elbo_terms
from ..nn.base import StochasticModule, VariationalModule, mc_sampling

__all__ = [
    "REPORT_EVERY",
    "BatchObjective",
    "DivergenceError",
    "checks_for",
    "defers_checks",
    "eager_status",
    "evaluate",
    "finite_checks",
    "first_failed",
    "gradient_message",
    "loss_message",
    "make_adam",
    "parameter_message",
    "train_epoch",
    "variance_message",
]


class DivergenceError(FloatingPointError, RuntimeError):
    """The loss, the KL, a gradient or a parameter became NaN or infinite.

    Also a :class:`RuntimeError`, so that the command line reports it as a one-line error.
    """


def make_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam as every vbdropout training loop uses it: torch's fused kernel where it exists.

    The same update rule as the default implementation in one pass per parameter
    instead of about ten (the optimizer's share of a VBD step, whose parameters
    are twice a plain net's, shrinks most). Falls back to the default
    implementation where torch has no fused Adam for the parameters (CPU before
    torch 2.4, other devices, non-float parameters).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def _first_nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    """The name of the first tensor that holds a NaN or inf (``None`` tensors are skipped).

    Fast path: a NaN or inf makes a tensor's sum non-finite, so one sum per tensor and
    one device sync decide; only if that total is not finite (which an overflowing
    sum of huge finite values can also cause) are the tensors scanned elementwise.
    """
    items = [(name, t.detach()) for name, t in named if t is not None]
    sums = [t.sum().abs().float() for _, t in items]  # abs, float: any dtype stacks
    if not items or bool(torch.isfinite(torch.stack(sums).sum())):
        return None
    return next((name for name, t in items if not bool(torch.isfinite(t).all())), None)


def loss_message(where: str, loss: float, kl: float, unapplied: str) -> str:
    return f"{where}: loss={loss} kl={kl} ({unapplied})"


def gradient_message(where: str, name: str, loss: float, kl: float, unapplied: str) -> str:
    return f"{where}: the gradient of {name} is NaN/inf at loss={loss} kl={kl} ({unapplied})"


def parameter_message(where: str, name: str) -> str:
    return f"{where}: parameter {name} became NaN/inf in the update (learning rate too large?)"


def variance_message(where: str, name: str) -> str:
    return (
        f"{where}: the update made {name}.sigma2 = exp(log σ²) overflow to inf "
        f"(learning rate too large?)"
    )


_NOT_APPLIED = "the update was not applied"


def _variance_flags(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, 0-dim bool tensor) of each variational module whose σ² can overflow: true
    when it has (see :meth:`~vbdropout.nn.base.VariationalModule.variance_overflows`)."""
    return [
        (name, flag)
        for name, m in model.named_modules()
        if isinstance(m, VariationalModule) and (flag := m.variance_overflows()) is not None
    ]


class BatchObjective:
    """The training objective of ``model`` on a batch: (x, y, β) ↦ its :class:`ElboTerms`
    (the negative ELBO per example, Eq. 18 over the ``dataset_size`` examples with the KL
    weighted by β) and the number of wrong predictions, a 0-dim tensor.

    Run eagerly; :class:`~vbdropout.train.compiled.CompiledObjective` runs it compiled.
    ``not_compiled``: why it is not, where compilation was asked for (for :attr:`status`).
    """

    def __init__(
        self, model: nn.Module, dataset_size: int, not_compiled: str | None = None
    ) -> None:
        self.model, self.dataset_size = model, dataset_size
        self._status = eager_status(not_compiled)

    @property
    def compiled(self) -> bool:
        """Whether calls run a compiled graph (in which the layers' own checks are off)."""
        return False

    @property
    def status(self) -> str:
        """How the objective runs, for a run's summary."""
        return self._status

    def __call__(self, x: Tensor, y: Tensor, kl_weight: float) -> tuple[ElboTerms, Tensor]:
        return self.terms(x, y, kl_weight)

    def terms(self, x: Tensor, y: Tensor, kl_weight: float | Tensor) -> tuple[ElboTerms, Tensor]:
        """The objective's terms and the wrong predictions, computed eagerly."""
        logits = self.model(x)
        terms = elbo_terms(logits, y, self.model, self.dataset_size, kl_weight, "mean")
        return terms, (logits.argmax(1) != y).sum()


def eager_status(not_compiled: str | None) -> str:
    """How an eager objective runs, for a run's summary: ``eager``, or ``eager: WHY`` where
    compilation was asked for and ``not_compiled`` says why it is not."""
    return "eager" if not_compiled is None else f"eager: {not_compiled}"


def _checked_terms(
    objective: BatchObjective, x: Tensor, y: Tensor, kl_weight: float, where: str
) -> tuple[ElboTerms, Tensor]:
    """``objective(x, y, kl_weight)``, with a layer's refusal of NaN/inf activations
    reported as divergence.

    Finite inputs and finite parameters can still overflow the activations (e.g.
    after a too large learning rate). The Gaussian layers then raise a
    ``FloatingPointError`` (non-finite output from a finite input), or a
    ``ValueError`` mentioning "NaN or inf" when an earlier layer produced them;
    for finite ``x`` both are divergence. A non-finite ``x`` stays a ``ValueError``.
    """
    try:
        return objective(x, y, kl_weight)
    except (FloatingPointError, ValueError) as err:
        if isinstance(err, ValueError) and "NaN or inf" not in str(err):
            raise
        if not bool(torch.isfinite(x).all()):
            raise
        raise DivergenceError(
            f"{where}: the forward pass overflowed to NaN/inf ({err}; the update was not applied)"
        ) from err


def _checked_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, terms: ElboTerms, where: str
) -> tuple[float, float]:
    """Backward and optimizer step, refusing any update that is or makes the model non-finite.

    The loss and KL are checked before the backward pass and every gradient before
    the step, so a NaN/inf never reaches the parameters through an update; the
    parameters, and the variances σ² of the Gaussian layers they imply, are checked
    after it (a finite update can still overflow them).
    Returns the loss and KL as floats.
    """
    loss, kl = terms.loss.item(), terms.kl.item()
    if not (math.isfinite(loss) and math.isfinite(kl)):
        raise DivergenceError(loss_message(where, loss, kl, _NOT_APPLIED))
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    params = list(model.named_parameters())
    bad = _first_nonfinite((name, p.grad) for name, p in params)
    if bad is not None:
        raise DivergenceError(gradient_message(where, bad, loss, kl, _NOT_APPLIED))
    optimizer.step()
    bad = _first_nonfinite(params)
    if bad is not None:
        raise DivergenceError(parameter_message(where, bad))
    flagged = _variance_flags(model)
    if flagged:  # finite parameters can still imply σ² = exp(log σ²) = inf
        overflows = torch.stack([flag for _, flag in flagged])
        if bool(overflows.any()):  # one sync
            flags = overflows.tolist()
            bad = next(name for (name, _), flag in zip(flagged, flags, strict=True) if flag)
            raise DivergenceError(variance_message(where, bad))
    return loss, kl


def defers_checks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`train_epoch` can check ``optimizer``'s updates once per epoch:
    a fused Adam, whose ``found_inf`` skips an update on the device (no host sync)."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def checks_for(device: torch.device, optimizer: torch.optim.Optimizer) -> Literal["step", "epoch"]:
    """The ``checks`` of :func:`train_epoch` for a run on ``device``: once per epoch on a
    GPU when ``optimizer`` allows it, at every step elsewhere."""
    return "epoch" if device.type == "cuda" and defers_checks(optimizer) else "step"


class _DeviceEpoch:
    """The steps of one ``checks="epoch"`` epoch: checks and statistics stay on the device.

    Each step writes one row of ``rows`` with one copy: the loss, the KL, one probe per
    gradient, the mean cross-entropy, the number of wrong predictions, one probe per
    parameter after the update and the σ² overflow flags. A probe is the sum of
    ``t · 0``: 0 for finite entries and NaN for a NaN or inf, so, unlike a plain sum, it
    cannot overflow from large finite values. ``skip`` (fused Adam's ``found_inf``)
    becomes 1 at the first non-finite loss, KL or gradient and stays 1, so that update
    and every later one of the epoch are skipped on the device: the parameters stay
    those before the failing step (or right after a failing update, as with the checks
    at every step). :meth:`finish` reads the rows once and raises the
    :class:`DivergenceError` of the first failure, as :func:`_checked_step` would have.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, device: torch.device
    ) -> None:
        if not defers_checks(optimizer):
            raise ValueError(
                "checks='epoch' needs a fused torch.optim.Adam (its found_inf skips an "
                f"update without a host sync), got {type(optimizer).__name__} "
                f"with fused={optimizer.defaults.get('fused')}"
            )
        self.model, self.optimizer = model, optimizer
        self.params = list(model.named_parameters())
        self.variance_names = [name for name, _ in _variance_flags(model)]
        self.batches: list[int] = []  # the examples of each step done
        width = 4 + 2 * len(self.params) + len(self.variance_names)
        self.rows = torch.zeros(steps, width, dtype=torch.float64, device=device)
        self.skip = torch.zeros((), dtype=torch.float32, device=device)  # found_inf

    def step(self, index: int, terms: ElboTerms, wrong: Tensor, batch: int) -> None:
        """Backward pass and fused Adam step ``index`` of a batch of ``batch`` examples with
        ``wrong`` wrong predictions (skipped once anything failed)."""
        self.batches.append(batch)
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        grads = _probes((p.grad for _, p in self.params), terms.loss)
        before = _stacked([terms.loss, terms.kl, *grads])
        failed = torch.isfinite(before).logical_not_().any()
        torch.maximum(self.skip, failed.to(self.skip.dtype), out=self.skip)
        self.optimizer.found_inf = self.skip  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        params = _probes((p for _, p in self.params), terms.loss)
        flags = [flag for _, flag in _variance_flags(self.model)]
        self.rows[index].copy_(torch.cat([before, _stacked([terms.nll, wrong, *params, *flags])]))

    def running(self, steps: int) -> dict[str, float]:
        """The mean loss and training error of the first ``steps`` steps (one host read)."""
        p = len(self.params)
        rows = self.rows[:steps, [0, 3 + p]].tolist()
        seen = sum(self.batches[:steps])
        return {
            "loss": sum(r[0] * b for r, b in zip(rows, self.batches, strict=False)) / seen,
            "error": sum(r[1] for r in rows) / seen,
        }

    def finish(self) -> dict[str, float]:
        """The epoch's statistics, or the :class:`DivergenceError` of its first failure."""
        rows = self.rows.tolist()  # the one host read of the epoch
        steps, p = len(rows), len(self.params)
        rows = rows[: len(self.batches)]
        unapplied = "neither this update nor a later one of the epoch was applied"
        for index, row in enumerate(rows):
            where, (loss, kl) = f"step {index + 1}/{steps}", row[:2]
            grads, params, variances = row[2 : 2 + p], row[4 + p : 4 + 2 * p], row[4 + 2 * p :]
            if not (math.isfinite(loss) and math.isfinite(kl)):
                raise DivergenceError(loss_message(where, loss, kl, unapplied))
            if (bad := first_failed(grads)) is not None:
                name = self.params[bad][0]
                raise DivergenceError(gradient_message(where, name, loss, kl, unapplied))
            if (bad := first_failed(params)) is not None:
                raise DivergenceError(parameter_message(where, self.params[bad][0]))
            if (bad := first_failed(variances)) is not None:
                raise DivergenceError(variance_message(where, self.variance_names[bad]))
        seen = sum(self.batches)
        return {
            "loss": sum(r[0] * b for r, b in zip(rows, self.batches, strict=True)) / seen,
            "nll": sum(r[2 + p] * b for r, b in zip(rows, self.batches, strict=True)) / seen,
            "kl": rows[-1][1],
            "train_error": sum(r[3 + p] for r in rows) / seen,
        }


def _probes(tensors: Iterable[Tensor | None], like: Tensor) -> list[Tensor]:
    """Per tensor, the sum of ``|t · 0|``: 0, or NaN if ``t`` holds a NaN or inf (0 for
    ``None``, a missing gradient; on ``like``'s device). As two multi-tensor (``_foreach``)
    operations, a launch or two on a GPU for all tensors instead of two per tensor (the
    temporaries ``t · 0`` of all tensors then exist at once: one model's size at peak); a
    sum propagates NaN on every backend."""
    tensors = list(tensors)
    present = [t.detach() for t in tensors if t is not None]
    sums = iter(torch._foreach_norm(torch._foreach_mul(present, 0.0), 1) if present else [])
    return [next(sums) if t is not None else like.new_zeros(()) for t in tensors]


def _stacked(values: list[Tensor]) -> Tensor:
    """0-dim tensors (any dtypes, one device) as one float64 vector (one conversion)."""
    return torch.stack([v.detach() for v in values]).to(torch.float64)


def first_failed(values: list[float]) -> int | None:
    """The index of the first probe or flag that marks a failure (not 0 or not finite)."""
    return next((i for i, v in enumerate(values) if v != 0 or not math.isfinite(v)), None)


REPORT_EVERY = 50  # steps between the progress reads of train_epoch(checks="epoch")


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    kl_weight: float | Callable[[float], float],
    generator: torch.Generator | None = None,
    on_batch: Callable[[int, dict[str, float]], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    checks: Literal["step", "epoch"] = "step",
    objective: BatchObjective | None = None,
) -> dict[str, float]:
    """One pass over (x, y) in shuffled minibatches minimizing the per-example negative ELBO.

    ``kl_weight``: β, or β as a function of the fraction of the epoch done before a step
    (0 at its first step). Returns the epoch means of ``loss``, ``nll`` (cross-entropy),
    the last step's ``kl`` and β (``kl_weight``), and the training ``error`` (of the noisy
    forward passes). Raises :class:`DivergenceError`
    (naming the step and the quantity) instead of applying an update when the loss,
    the KL or a gradient is NaN/inf, or when an update makes a parameter NaN/inf.
    ``shard=(rank, world)``: this worker's share of every (global) batch.

    ``checks="step"`` reads the loss and the checks on the host at every step (cheap on
    a CPU). ``checks="epoch"`` (for a GPU, where each read stalls the device queue)
    keeps them and the statistics on the device and reads them once at the end of
    the epoch (and for ``on_batch`` every :data:`REPORT_EVERY` steps); the first failing
    step and every later one leave the parameters unchanged (fused Adam's
    ``found_inf``), and the layers' own per-call NaN/inf output checks are off for the
    epoch, so a NaN input is reported as divergence there. It needs a fused Adam
    (:func:`defers_checks`).

    ``objective``: the batch objective of ``model`` on the ``x.shape[0]`` examples (default:
    the eager :class:`BatchObjective`); a compiled one turns the layers' own per-call
    checks off, as ``checks="epoch"`` does (they would read back to the host inside the
    graph), so that a non-finite forward pass is caught by the loss's check.
    """
    if checks not in ("step", "epoch"):
        raise ValueError(f"checks must be 'step' or 'epoch', got {checks!r}")
    rank, world = shard
    model.train()
    start = time.perf_counter()
    n = x.shape[0]
    objective = BatchObjective(model, n) if objective is None else objective
    if objective.model is not model or objective.dataset_size != n:
        raise ValueError(
            f"the objective is that of another model or data set size "
            f"({objective.dataset_size} examples; training on {n})"
        )
    steps = -(-n // batch_size)
    on_device = _DeviceEpoch(model, optimizer, steps, x.device) if checks == "epoch" else None
    totals = [0.0, 0.0, 0.0]  # loss·b, nll·b and wrong predictions (checks="step")
    seen, beta, kl = 0, 0.0, 0.0
    with finite_checks(model, enabled=on_device is None and not objective.compiled):
        for step, (xb, yb) in enumerate(
            iterate_batches(x, y, batch_size, shuffle=True, generator=generator)
        ):
            where = f"step {step + 1}/{steps}"
            if world > 1:
                xb, yb = xb[rank::world], yb[rank::world]
            beta = kl_weight(step / steps) if callable(kl_weight) else kl_weight
            seen += yb.shape[0]
            if on_device is not None:
                terms, wrong = objective(xb, yb, beta)
                on_device.step(step, terms, wrong, yb.shape[0])
                if on_batch is not None and (step + 1) % REPORT_EVERY == 0:
                    on_batch(step + 1, on_device.running(step + 1))
                continue
            terms, wrong = _checked_terms(objective, xb, yb, beta, where)
            loss, kl = _checked_step(model, optimizer, terms, where)
            totals[0] += loss * yb.shape[0]
            totals[1] += terms.nll.item() * yb.shape[0]
            totals[2] += wrong.item()
            if on_batch is not None:
                on_batch(step + 1, {"loss": totals[0] / seen, "error": totals[2] / seen})
    if on_device is not None:
        stats = on_device.finish()
        if on_batch is not None and steps % REPORT_EVERY:
            on_batch(steps, {"loss": stats["loss"], "error": stats["train_error"]})
    else:
        stats = {
            "loss": totals[0] / seen,
            "nll": totals[1] / seen,
            "kl": kl,
            "train_error": totals[2] / seen,
        }
    return {**stats, "kl_weight": beta, "seconds": time.perf_counter() - start}


@contextmanager
def finite_checks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, the stochastic layers' per-call NaN/inf output checks
    (``check_finite``, a host sync each) are off inside; their shape checks stay on."""
    if enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, StochasticModule)]
    saved = [vars(m).get("check_finite") for m in layers]
    for m in layers:
        m.check_finite = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            if value is None:
                del m.check_finite
            else:
                m.check_finite = value


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000, mc_samples: int = 0
) -> dict[str, Any]:
    """Test error, NLL and ECE of the deterministic (pruned posterior-mean) network.

    With ``mc_samples = K > 0``, also of the predictive distribution averaged
    over K sampled forward passes (``mc_error``, ``mc_nll``).
    """
    if not (isinstance(mc_samples, int) and mc_samples >= 0):
        raise ValueError(f"mc_samples must be an integer >= 0, got {mc_samples!r}")
    model.eval()
    probs, mc_probs = [], []
    for xb, _ in iterate_batches(x, y, batch_size, shuffle=False):
        probs.append(model(xb).softmax(-1))
        if mc_samples:
            with mc_sampling(model):
                mc_probs.append(
                    torch.stack([model(xb).softmax(-1) for _ in range(mc_samples)]).mean(0)
                )
    result = _scores(torch.cat(probs), y)
    if mc_samples:
        result.update({f"mc_{k}": v for k, v in _scores(torch.cat(mc_probs), y).items()})
    return result


def _scores(probs: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
    """Error, NLL and expected calibration error (equal-width confidence bins)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == y).float()
    which = (confidence * bins).long().clamp_max(bins - 1)
    count = torch.zeros(bins, device=probs.device).index_add_(0, which, torch.ones_like(confidence))
    gap = torch.zeros(bins, device=probs.device).index_add_(0, which, confidence - correct)
    return {
        "error": 1.0 - correct.mean().item(),
        "nll": F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
        "ece": (gap.abs().sum() / count.sum()).item(),
    }
