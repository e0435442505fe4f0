"""The batch objective compiled with ``torch.compile``, falling back to eager on failure.

On a GPU the objective of a training step and its gradient (the forward and backward
graphs, the bulk of the step's kernels) are compiled and captured as CUDA graphs
(``mode="reduce-overhead"``), which removes their per-kernel launch cost, the cost that
dominates small networks. The fused Adam step and the device-side checks of
:func:`~vbdropout.train.loop.train_epoch` (``checks="epoch"``) stay eager: with no host
synchronisation, as some 25 small kernels. On a CPU the default mode compiles without
CUDA graphs; there the eager layers with their fused CPU kernels are faster for single
runs, while replicas (which cannot use those kernels under ``vmap``) are faster
compiled (benchmarks/bench_compile.py), so ``compile="auto"`` compiles on CUDA and, on
a CPU, replicas. Methods whose forward pass breaks the graph at every step declare why
(:attr:`~vbdropout.models.methods.Method.no_compile_reason`) and train eagerly.

A compilation that fails must not fail a run: the first call for each input shape is a
trial of the compiled forward and backward pass that leaves no trace (the random state,
the state tensors and their gradients are put back); when it, or a later call's forward
pass, raises and the eager objective does not, the run goes on eagerly with a warning,
and :attr:`CompiledStep.status` says why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..losses import ElboTerms
from ..models.methods import Method
from .config import COMPILE_CHOICES
from .loop import BatchObjective

__all__ = [
    "CompiledObjective",
    "CompiledStep",
    "compile_mode",
    "compiles",
    "not_compiled",
    "run_objective",
    "uses_compile",
]


def uses_compile(choice: str, device: torch.device, replicas: bool = False) -> bool:
    """Whether ``compile=choice`` asks for compilation on ``device`` (of a replica group,
    with ``replicas``): ``on`` always, ``auto`` on CUDA and for replicas (see the module
    docstring), ``off`` never."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return choice == "on" or (choice == "auto" and (device.type == "cuda" or replicas))


def compiles(choice: str, device: torch.device, method: Method, replicas: bool = False) -> bool:
    """Whether a run (a replica group, with ``replicas``) of ``method`` with
    ``compile=choice`` on ``device`` is compiled."""
    return uses_compile(choice, device, replicas) and method.no_compile_reason is None


def run_objective(
    model: nn.Module, dataset_size: int, device: torch.device, choice: str, method: Method
) -> BatchObjective:
    """The batch objective of a run of ``method``: compiled where :func:`compiles`, else
    eager, its status saying why where compilation was asked for (a warning too when
    ``choice`` is ``"on"``). A data-parallel model is compiled only with ``"on"``: a
    compilation that fails in one worker only would leave that worker a collective
    (DDP's buffer broadcast) ahead of the others when it retries eagerly."""
    if choice == "auto" and isinstance(model, nn.parallel.DistributedDataParallel):
        return BatchObjective(model, dataset_size)
    if compiles(choice, device, method):
        return CompiledObjective(model, dataset_size, device)
    why = not_compiled(choice, device, method)
    if why is not None and choice == "on":
        warnings.warn(f"compile on: {why}; training eagerly", RuntimeWarning, stacklevel=2)
    return BatchObjective(model, dataset_size, why)


def not_compiled(
    choice: str, device: torch.device, method: Method, replicas: bool = False
) -> str | None:
    """Why a run (a replica group, with ``replicas``) that ``compile=choice`` asks to
    compile is not: the method's reason; ``None`` where it was not asked or is compiled."""
    if not uses_compile(choice, device, replicas) or method.no_compile_reason is None:
        return None
    return f"{method.name} is not compiled: {method.no_compile_reason}"


def compile_mode(device: torch.device, data_parallel: bool = False) -> str:
    """``torch.compile``'s mode: CUDA graphs on CUDA, plain compilation elsewhere and for a
    data-parallel model (whose gradient all-reduce hooks CUDA graphs would capture)."""
    return "reduce-overhead" if device.type == "cuda" and not data_parallel else "default"


class CompiledStep:
    """``fn(*inputs, kl_weight)`` run as a ``torch.compile`` graph, else eagerly.

    β reaches the graph as a 0-dim tensor on ``device``, refilled at every call, so that a
    KL warm-up (a new β at every step) does not recompile. ``dynamic=False``: one graph per
    input shape (the full batches and, where the batch size does not divide the data set,
    the last one). Compiling starts from empty caches (``torch.compiler.reset``), so that
    runs one after another in a process (``vbd reproduce``) do not pile up graphs of the
    same code towards torch's recompile limit; reaching it raises (and falls back, below)
    instead of running eagerly unnoticed.

    The first call for each shape of the tensor inputs (the batch; for replicas its
    leading dimension is their number) is a trial: the graph's forward pass and, through
    ``loss(output)``, its backward pass (compiled at its first call), after which the
    random state, the values of the call's ``state`` tensors and their gradients are put
    back. When the trial, or the forward pass of a later call (which may recompile after a
    training event changed a guarded attribute), raises and ``fn`` run eagerly does not,
    the compilation failed: that call and every later one run ``fn`` eagerly, with one
    warning. (A backward graph that fails to compile only after the trial, for a
    recompiled forward graph, fails the run; on CUDA the graphs are recorded at the first
    call after the trial, outside it.)
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        loss: Callable[[Any], Tensor],
        device: torch.device,
        mode: str,
        no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.fn, self.loss, self.device, self.mode, self.no_sync = fn, loss, device, mode, no_sync
        self.compiled = True
        self.status = f"compiled (torch.compile, mode {mode})"
        if device.type == "cpu":
            kernels.available()  # build the fused kernels now: their build cannot be traced
        torch.compiler.reset()  # process-wide: also other code's compiled graphs recompile
        self._graph = torch.compile(fn, mode=mode, dynamic=False)
        self._kl_weight = torch.zeros((), device=device)
        # the shapes of the tensor inputs (the batch: it also tells the replicas) that passed
        self._tried: set[tuple[tuple[int, ...], ...]] = set()

    def __call__(self, *inputs: Any, kl_weight: float, state: list[Tensor]) -> Any:
        """``fn(*inputs, kl_weight)``; ``state``: the tensors a trial must put back (the
        parameters and buffers the call reads)."""
        if not self.compiled:
            return self.fn(*inputs, kl_weight)
        self._kl_weight.fill_(kl_weight)
        shapes = tuple(tuple(t.shape) for t in inputs if isinstance(t, Tensor))
        dynamo = torch._dynamo.config
        limit_raises = dynamo.fail_on_recompile_limit_hit  # set directly: a patch costs µs
        dynamo.fail_on_recompile_limit_hit = True
        try:
            if shapes not in self._tried:
                self._trial(inputs, state)
                self._tried.add(shapes)
            self._mark_step()
            return self._graph(*inputs, self._kl_weight)
        except Exception as err:  # also a recompilation after a training event changed a guard
            # a user's error raises again, eagerly (a graph that failed while running, not
            # while compiling, may have drawn random numbers or changed buffers first)
            result = self.fn(*inputs, kl_weight)
            self._fall_back(err)
            return result
        finally:
            dynamo.fail_on_recompile_limit_hit = limit_raises

    def _mark_step(self) -> None:
        """With CUDA graphs: a new step begins, the last one's outputs are done with."""
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _trial(self, inputs: tuple[Any, ...], state: list[Tensor]) -> None:
        """A compiled forward and backward pass on ``inputs`` that leaves no trace."""
        saved = [t.detach().clone() for t in state]
        grads = [t.grad for t in state]
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            for t in state:
                t.grad = None  # the trial's gradients must not add to the step's
            with torch.random.fork_rng(devices=devices), self.no_sync():
                self._mark_step()
                self.loss(self._graph(*inputs, self._kl_weight)).backward()
        finally:
            with torch.no_grad():
                for t, value in zip(state, saved, strict=True):
                    t.copy_(value)
            for t, grad in zip(state, grads, strict=True):
                t.grad = grad

    def _fall_back(self, err: Exception) -> None:
        """Run eagerly from now on, saying why once."""
        lines = str(err).strip().splitlines() or [""]
        why = f"{type(err).__name__}: {lines[0][:300]}"
        self.compiled = False
        self.status = f"eager: torch.compile failed ({why})"
        warnings.warn(
            f"torch.compile failed, training eagerly instead ({why})", RuntimeWarning, stacklevel=2
        )


class CompiledObjective(BatchObjective):
    """:class:`~vbdropout.train.loop.BatchObjective` run as a :class:`CompiledStep`.

    For a :class:`~torch.nn.parallel.DistributedDataParallel` model the trial's backward
    pass does not all-reduce (``no_sync``), and the mode is the default one (no CUDA
    graphs); see :func:`run_objective` for what a failure in one worker only does.
    """

    def __init__(self, model: nn.Module, dataset_size: int, device: torch.device) -> None:
        super().__init__(model, dataset_size)
        parallel = isinstance(model, nn.parallel.DistributedDataParallel)
        self.state = [*model.parameters(), *model.buffers()]
        self.step = CompiledStep(
            self.terms,
            lambda out: out[0].loss,
            device,
            compile_mode(device, parallel),
            model.no_sync if parallel else contextlib.nullcontext,
        )

    @property
    def compiled(self) -> bool:
        return self.step.compiled

    @property
    def status(self) -> str:
        return self.step.status

    def __call__(self, x: Tensor, y: Tensor, kl_weight: float) -> tuple[ElboTerms, Tensor]:
        return self.step(x, y, kl_weight=kl_weight, state=self.state)
