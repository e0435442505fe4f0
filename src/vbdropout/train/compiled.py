"""The batch objective compiled with ``torch.compile``, falling back to eager on failure.

On a GPU the forward and backward graphs of a training step (the objective and its
gradient, the bulk of the step's kernels) are compiled and captured as CUDA graphs
(``mode="reduce-overhead"``), which removes the per-kernel launch cost that dominates
small networks; the fused Adam step and the device-side checks of
:func:`~vbdropout.train.loop.train_epoch` (``checks="epoch"``) follow as a few more
kernels, with no host synchronisation. On a CPU the default mode compiles without CUDA
graphs (slower than the fused CPU kernels of the eager layers on the LeNets:
benchmarks/bench_compile.py), so ``compile="auto"`` compiles on CUDA only.

A compilation that fails (no C++ compiler or Triton, an op the compiler does not take)
must not fail a run: the first call for each batch shape is a trial of the compiled
forward and backward pass that leaves no trace (random state, parameters, buffers and
gradients are put back); when it raises and the eager objective does not, the run goes
on eagerly with a warning, and :attr:`CompiledObjective.status` says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import kernels
from ..losses import ElboTerms
from .loop import BatchObjective

__all__ = ["COMPILE_CHOICES", "CompiledObjective", "CompiledStep", "compile_mode", "uses_compile"]

COMPILE_CHOICES = ("auto", "on", "off")


def uses_compile(choice: str, device: torch.device) -> bool:
    """Whether a run with ``compile=choice`` on ``device`` compiles its objective: ``on``
    always, ``auto`` on CUDA only (see the module docstring), ``off`` never."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def compile_mode(device: torch.device) -> Literal["reduce-overhead", "default"]:
    """``torch.compile``'s mode on ``device``: CUDA graphs on CUDA, plain compilation elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class CompiledStep:
    """``fn(*inputs, kl_weight)`` run as a ``torch.compile`` graph, else eagerly.

    β reaches the graph as a 0-dim tensor on ``device``, refilled at every call, so that a
    KL warm-up (a new β at every step) does not recompile. ``dynamic=False``: one graph per
    input shape (the full batches and, where the batch size does not divide the data set,
    the last one). The first call for each input shape is a trial: the graph's forward
    pass and, through ``loss(output)``, its backward pass (compiled at its first call),
    after which the random state, the values of ``tensors`` and the gradients of its
    leaves are put back. When the trial, or the forward pass of a later call (which may
    recompile after a training event changed a guarded attribute), raises and ``fn`` run
    eagerly does not, the compilation failed: that call and every later one run ``fn``
    eagerly, with one warning. (A backward graph that fails to compile after the trial,
    i.e. only for a recompiled forward graph, fails the run.)
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        loss: Callable[[Any], Tensor],
        tensors: list[Tensor],
        device: torch.device,
    ) -> None:
        self.fn, self.loss, self.tensors, self.device = fn, loss, tensors, device
        self.mode = compile_mode(device)
        self.compiled = True
        self.status = f"compiled (torch.compile, mode {self.mode})"
        if device.type == "cpu":
            kernels.available()  # build the fused kernels now: their build cannot be traced
        self._graph = torch.compile(fn, mode=self.mode, dynamic=False)
        self._kl_weight = torch.zeros((), device=device)
        self._tried: set[tuple[tuple[int, ...], ...]] = set()  # the input shapes that passed

    def __call__(self, *inputs: Any, kl_weight: float) -> Any:
        if not self.compiled:
            return self.fn(*inputs, kl_weight)
        self._kl_weight.fill_(kl_weight)
        shapes = tuple(tuple(t.shape) for t in _tensors(inputs))
        try:
            if shapes not in self._tried:
                self._trial(inputs)
                self._tried.add(shapes)
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done
            return self._graph(*inputs, self._kl_weight)
        except Exception as err:  # also a recompilation after a training event changed a guard
            result = self.fn(*inputs, kl_weight)  # a user's error raises again, eagerly
            self._fall_back(err)
            return result

    def _trial(self, inputs: tuple[Any, ...]) -> None:
        """A compiled forward and backward pass on ``inputs`` that leaves no trace."""
        saved = [t.detach().clone() for t in self.tensors]
        grads = [t.grad for t in self.tensors]
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                self.loss(self._graph(*inputs, self._kl_weight)).backward()
        finally:
            with torch.no_grad():
                for t, value in zip(self.tensors, saved, strict=True):
                    t.copy_(value)
            for t, grad in zip(self.tensors, grads, strict=True):
                t.grad = grad

    def _fall_back(self, err: Exception) -> None:
        """Run eagerly from now on, saying why once."""
        lines = str(err).strip().splitlines() or [""]
        why = f"{type(err).__name__}: {lines[0][:300]}"
        self.compiled = False
        self.status = f"eager: torch.compile failed ({why})"
        warnings.warn(
            f"torch.compile failed, training eagerly instead ({why})", RuntimeWarning, stacklevel=3
        )


def _tensors(inputs: Any) -> list[Tensor]:
    """The tensors in ``inputs`` (tensors, and dicts, lists and tuples of them)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (list, tuple)):
        return [t for item in inputs for t in _tensors(item)]
    return []


class CompiledObjective(BatchObjective):
    """:class:`~vbdropout.train.loop.BatchObjective` run as a :class:`CompiledStep`."""

    def __init__(self, model: nn.Module, dataset_size: int, device: torch.device) -> None:
        super().__init__(model, dataset_size)
        tensors = [*model.parameters(), *model.buffers()]
        self.step = CompiledStep(self.terms, lambda out: out[0].loss, tensors, device)

    @property
    def compiled(self) -> bool:
        return self.step.compiled

    @property
    def status(self) -> str:
        return self.step.status

    def __call__(self, x: Tensor, y: Tensor, kl_weight: float) -> tuple[ElboTerms, Tensor]:
        return self.step(x, y, kl_weight=kl_weight)
