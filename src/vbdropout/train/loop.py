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
    "DivergenceError",
    "checks_for",
    "defers_checks",
    "evaluate",
    "make_adam",
    "train_epoch",
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


def _loss_message(where: str, loss: float, kl: float, unapplied: str) -> str:
    return f"{where}: loss={loss} kl={kl} ({unapplied})"


def _gradient_message(where: str, name: str, loss: float, kl: float, unapplied: str) -> str:
    return f"{where}: the gradient of {name} is NaN/inf at loss={loss} kl={kl} ({unapplied})"


def _parameter_message(where: str, name: str) -> str:
    return f"{where}: parameter {name} became NaN/inf in the update (learning rate too large?)"


def _variance_message(where: str, name: str) -> str:
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


def _checked_forward(model: nn.Module, x: Tensor, where: str) -> Tensor:
    """``model(x)``, with a layer's refusal of NaN/inf activations reported as divergence.

    Finite inputs and finite parameters can still overflow the activations (e.g.
    after a too large learning rate). The Gaussian layers then raise a
    ``FloatingPointError`` (non-finite output from a finite input), or a
    ``ValueError`` mentioning "NaN or inf" when an earlier layer produced them;
    for finite ``x`` both are divergence. A non-finite ``x`` stays a ``ValueError``.
    """
    try:
        return model(x)
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
        raise DivergenceError(_loss_message(where, loss, kl, _NOT_APPLIED))
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    params = list(model.named_parameters())
    bad = _first_nonfinite((name, p.grad) for name, p in params)
    if bad is not None:
        raise DivergenceError(_gradient_message(where, bad, loss, kl, _NOT_APPLIED))
    optimizer.step()
    bad = _first_nonfinite(params)
    if bad is not None:
        raise DivergenceError(_parameter_message(where, bad))
    flagged = _variance_flags(model)
    if flagged:  # finite parameters can still imply σ² = exp(log σ²) = inf
        overflows = torch.stack([flag for _, flag in flagged])
        if bool(overflows.any()):  # one sync
            flags = overflows.tolist()
            bad = next(name for (name, _), flag in zip(flagged, flags, strict=True) if flag)
            raise DivergenceError(_variance_message(where, bad))
    return loss, kl


def defers_checks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`train_epoch` can check ``optimizer``'s updates once per epoch:
    a fused Adam, whose ``found_inf`` skips an update on the device (no host sync)."""
    return isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))


def checks_for(device: torch.device, optimizer: torch.optim.Optimizer) -> Literal["step", "epoch"]:
    """The ``checks`` of :func:`train_epoch` for a run on ``device``: once per epoch on a
    GPU when ``optimizer`` allows it, at every step elsewhere."""
    return "epoch" if device.type == "cuda" and defers_checks(optimizer) else "step"


class _DeferredChecks:
    """The divergence checks of :func:`_checked_step` without a host sync per step.

    Each step's loss, KL, gradients, updated parameters and σ² overflow flags are
    tested on the device. The first failure is recorded (step, kind, which tensor,
    loss and KL) and sets the fused Adam's ``found_inf``, which makes it skip that
    update and every later one of the epoch, so the parameters stay those before the
    failing step (or, for a failure of the update itself, right after it, as in the
    per-step checks). :meth:`raise_if_failed` reads the record once, at the end.
    """

    KINDS = ("loss", "gradient", "parameter", "sigma2")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
        if not defers_checks(optimizer):
            raise ValueError(
                "checks='epoch' needs a fused torch.optim.Adam (its found_inf skips an "
                f"update without a host sync), got {type(optimizer).__name__} "
                f"with fused={optimizer.defaults.get('fused')}"
            )
        self.model, self.optimizer, self.steps = model, optimizer, steps
        self.params = list(model.named_parameters())
        device = self.params[0][1].device
        self.skip = torch.zeros((), device=device)  # Adam's found_inf: 1.0 skips updates
        self.first = torch.zeros(3, dtype=torch.long, device=device)  # step+1, kind, tensor
        self.values = torch.zeros(2, device=device)  # the loss and KL at that step

    def _record(self, bad: Tensor, step: int, kind: str, terms: ElboTerms) -> None:
        """Record failure ``kind`` at ``step`` where ``bad`` (one flag per tensor) has one."""
        fresh = bad.any() & (self.first[0] == 0)
        index = bad.long().argmax()
        record = torch.stack([index * 0 + step + 1, index * 0 + self.KINDS.index(kind), index])
        self.first.copy_(torch.where(fresh, record, self.first))
        values = torch.stack([terms.loss.detach(), terms.kl.detach()]).to(self.values.dtype)
        self.values.copy_(torch.where(fresh, values, self.values))
        self.skip.copy_(torch.maximum(self.skip, fresh.to(self.skip.dtype)))

    def step(self, terms: ElboTerms, step: int) -> None:
        """Backward and a fused Adam step that is skipped once anything failed."""
        self._record(
            ~torch.isfinite(torch.stack([terms.loss, terms.kl]).detach()), step, "loss", terms
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        self._record(self._nonfinite(p.grad for _, p in self.params), step, "gradient", terms)
        self.optimizer.found_inf = self.skip  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        self._record(self._nonfinite(p for _, p in self.params), step, "parameter", terms)
        if flagged := _variance_flags(self.model):
            self._record(torch.stack([flag for _, flag in flagged]), step, "sigma2", terms)

    def _nonfinite(self, tensors: Iterable[Tensor | None]) -> Tensor:
        """One flag per tensor of ``self.params`` (False for a missing gradient): whether
        the sum of ``t · 0`` is not finite. It is 0 for finite entries and NaN for a NaN
        or inf, so unlike a plain sum it cannot overflow from large finite values."""
        sums = [
            (t.detach() * 0).sum() if t is not None else self.skip.new_zeros(())
            for t in tensors
        ]  # fmt: skip
        return ~torch.isfinite(torch.stack([s.float() for s in sums]))

    def raise_if_failed(self) -> None:
        """Raise the :class:`DivergenceError` of the first failure (one host sync)."""
        step, kind, index = self.first.tolist()
        if not step:
            return
        where = f"step {step}/{self.steps}"
        loss, kl = self.values.tolist()
        unapplied = "neither this update nor a later one of the epoch was applied"
        kind = self.KINDS[kind]
        if kind == "loss":
            message = _loss_message(where, loss, kl, unapplied)
        elif kind == "gradient":
            message = _gradient_message(where, self.params[index][0], loss, kl, unapplied)
        elif kind == "parameter":
            message = _parameter_message(where, self.params[index][0])
        else:
            message = _variance_message(where, _variance_flags(self.model)[index][0])
        raise DivergenceError(message)


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
    ``found_inf``), and the layers' own per-call NaN checks are off for the epoch, so a
    NaN input is reported as divergence there. It needs a fused Adam
    (:func:`defers_checks`).
    """
    if checks not in ("step", "epoch"):
        raise ValueError(f"checks must be 'step' or 'epoch', got {checks!r}")
    rank, world = shard
    model.train()
    start = time.perf_counter()
    n = x.shape[0]
    steps = -(-n // batch_size)
    deferred = _DeferredChecks(model, optimizer, steps) if checks == "epoch" else None
    # loss·b, nll·b, wrong: on the device with deferred checks, floats otherwise
    sums: Tensor | list[float] = (
        torch.zeros(3, dtype=torch.float64, device=x.device) if deferred else [0.0, 0.0, 0.0]
    )
    seen, beta, kl = 0, 0.0, 0.0
    with _layer_checks(model, enabled=deferred is None):
        for step, (xb, yb) in enumerate(
            iterate_batches(x, y, batch_size, shuffle=True, generator=generator)
        ):
            where = f"step {step + 1}/{steps}"
            if world > 1:
                xb, yb = xb[rank::world], yb[rank::world]
            beta = kl_weight(step / steps) if callable(kl_weight) else kl_weight
            b = yb.shape[0]
            seen += b
            if deferred is not None:
                logits = model(xb)
                terms = elbo_terms(logits, yb, model, n, beta, reduction="mean")
                deferred.step(terms, step)
                wrong = (logits.argmax(1) != yb).sum()
                sums += torch.stack([terms.loss.detach() * b, terms.nll.detach() * b, wrong])
                kl = terms.kl.detach()
                report = on_batch is not None and (
                    (step + 1) % REPORT_EVERY == 0 or step + 1 == steps
                )
                values = sums.tolist() if report else None
            else:
                logits = _checked_forward(model, xb, where)
                terms = elbo_terms(logits, yb, model, n, beta, reduction="mean")
                loss, kl = _checked_step(model, optimizer, terms, where)
                sums[0] += loss * b
                sums[1] += terms.nll.item() * b
                sums[2] += (logits.argmax(1) != yb).sum().item()
                values = sums
            if on_batch is not None and values is not None:
                on_batch(step + 1, {"loss": values[0] / seen, "error": values[2] / seen})
    if deferred is not None:
        deferred.raise_if_failed()
        sums, kl = sums.tolist(), float(kl)
    return {
        "loss": sums[0] / seen,
        "nll": sums[1] / seen,
        "kl": kl,
        "kl_weight": beta,
        "train_error": sums[2] / seen,
        "seconds": time.perf_counter() - start,
    }


REPORT_EVERY = 50  # steps between the progress reads of train_epoch(checks="epoch")


@contextmanager
def _layer_checks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, the stochastic layers' per-call NaN checks are off inside."""
    if enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, StochasticModule)]
    saved = [m.__dict__.get("check_inputs") for m in layers]
    for m in layers:
        m.check_inputs = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            if value is None:
                del m.check_inputs
            else:
                m.check_inputs = value


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
