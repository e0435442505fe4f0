"""Compile and load the fused CPU kernels (cpu.cpp) once, or say why not."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["ENV_VAR", "available", "compiling", "require", "set_enabled", "status", "supports"]

ENV_VAR = "VBDROPOUT_CPU_KERNELS"
_SOURCE = Path(__file__).with_name("cpu.cpp")
_log = logging.getLogger(__name__)
_state: dict[str, Any] = {
    "enabled": os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off"),
    "loaded": None,
    "reason": "not built yet",
}


def set_enabled(enabled: bool) -> bool:
    """Turn the fused kernels on or off for this process; returns the previous setting.

    Off, every caller runs its eager PyTorch version (e.g. to compare the two, or
    for double backward). On, the kernels are built on their next use if needed.
    """
    previous = bool(_state["enabled"])
    _state["enabled"] = bool(enabled)
    return previous


def _compile_flags() -> list[str]:
    """-O3 with vectorized libm (glibc's libmvec needs -ffast-math's __FAST_MATH__).

    -ffast-math is a compile flag only: at link time it would add crtfastmath.o,
    which turns on flush-to-zero for the whole process when the library loads.
    """
    flags = ["-O3", "-ffast-math"] + (["-fopenmp"] if _torch_uses_libgomp() else [])
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mavx512dq", "-mprefer-vector-width=512"]
    return flags


def _torch_uses_libgomp() -> bool:
    """Whether torch runs on GNU OpenMP (libgomp is loaded in this process).

    Only then are the kernels built with -fopenmp: linked to the same libgomp, they
    share torch's thread pool. Beside another OpenMP runtime (LLVM's, Intel's) a
    second one would compete with it, so there the kernels run single-threaded.
    """
    try:
        with open("/proc/self/maps") as maps:
            return "libgomp" in maps.read()
    except OSError:  # no /proc: not Linux
        return False


@contextmanager
def _ninja_on_path() -> Any:
    """Put the ``ninja`` package's binary on PATH for the build (a venv's bin/ may not be)."""
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _extension_name(flags: list[str]) -> str:
    """The library's name: CPU capability and a digest of the source, flags and torch."""
    digest = hashlib.sha256(
        (_SOURCE.read_text() + " ".join(flags) + torch.__version__).encode()
    ).hexdigest()[:12]
    return f"vbdropout_cpu_{torch.backends.cpu.get_cpu_capability().lower()}_{digest}"


def _build() -> None:
    """Load the library, building it first unless a finished build of it exists.

    The name encodes the source, the flags and torch's version, so an existing
    ``NAME.so`` with no build lock beside it is this very library: it is loaded
    directly, without torch's rebuild check, which rewrites the build file and
    runs ninja in every process (and recompiles whenever the Python environment's
    path changes, though the library would be the same).
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    flags = _compile_flags()
    name = _extension_name(flags)
    directory = Path(_get_build_directory(name, False))
    _remove_stale_lock(directory / "lock")
    built = directory / f"{name}.so"
    if built.exists() and not (directory / "lock").exists():
        torch.ops.load_library(str(built))
        return
    start = time.perf_counter()
    openmp = ["-fopenmp"] if "-fopenmp" in flags else []
    with _ninja_on_path():
        load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=openmp + (["-lmvec"] if _has_libmvec() else []),
            is_python_module=False,
            verbose=False,
        )
    _log.info("vbdropout CPU kernels ready (%s, %.1f s)", name, time.perf_counter() - start)


STALE_LOCK_SECONDS = 600
"""A build lock older than this was left by a killed build (a build takes seconds)."""


def _remove_stale_lock(lock: Path) -> None:
    """Delete the lock file of a build that was killed mid-way (SIGKILL, OOM killer):
    torch would otherwise wait for it forever, silently, at the first training step."""
    with suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS:
            _log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink()


def _has_libmvec() -> bool:
    import ctypes.util

    return ctypes.util.find_library("mvec") is not None


def available() -> bool:
    """Whether the fused kernels are loaded; builds them on the first call."""
    if not _state["enabled"]:
        return False
    if _state["loaded"] is None:
        if hasattr(torch.ops.vbdropout, "lrt_sample"):  # loaded by a reloaded copy of us
            _state.update(loaded=True, reason="")
            with suppress(RuntimeError):  # that copy may have registered them already
                _register_fake_kernels()
        else:
            try:
                _build()
                _register_fake_kernels()
                _state.update(loaded=True, reason="")
            except Exception as error:  # no compiler, no ninja, a failed build...
                reason = f"build failed ({type(error).__name__}: {_first_error(error)})"
                _state.update(loaded=False, reason=reason)
                _log.warning("vbdropout CPU kernels unavailable, using eager PyTorch: %s", reason)
    return bool(_state["loaded"])


def _first_error(error: Exception) -> str:
    """The compiler's first error line, else the exception's first line."""
    lines = str(error).strip().splitlines() or [""]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines)[0][:300]


def require() -> None:
    """Raise ``RuntimeError`` saying why, unless the kernels are on and loaded."""
    if not available():
        raise RuntimeError(f"vbdropout's fused CPU kernels are not in use: {status()}")


def status() -> str:
    """``"fused"`` or ``"eager: <why>"`` (builds the kernels if not tried yet)."""
    if not _state["enabled"]:
        return f"eager: disabled ({ENV_VAR}=0 or set_enabled(False))"
    return "fused" if available() else f"eager: {_state['reason']}"


def supports(*tensors: Tensor) -> bool:
    """Whether the kernels are on and take these tensors: CPU float32, non-empty, dense
    (contiguous or channels-last), outside CPU autocast and ``torch.func``
    transforms (which the autograd functions do not implement); builds the kernels
    on the first call."""
    if not _state["enabled"] or _autocast_or_functorch():
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.layout != torch.strided:
            return False
        if t.numel() == 0:  # zero-sized layers and batches: the eager path handles them
            return False
        if not (
            t.is_contiguous()
            or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        ):
            return False
    return available()


def _autocast_or_functorch() -> bool:
    try:
        autocast = torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        autocast = torch.is_autocast_cpu_enabled()
    return bool(autocast) or functorch_active()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is tracing the current
    code: hand-written autograd functions without a vmap rule must then step aside."""
    return bool(getattr(torch._C, "_are_functorch_transforms_active", lambda: False)())


def compiling() -> bool:
    """Whether torch.compile is tracing the current code."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _register_fake_kernels() -> None:
    """Shape-only versions of the ops, so that torch.compile/export can trace them."""
    register = getattr(torch.library, "register_fake", None)
    if register is None:  # torch < 2.4: tracing falls back to the eager callers
        return

    @register("vbdropout::kl_sum")
    def _(theta: Tensor, log_sigma2: Tensor, prior: int, constants: list[float]) -> Tensor:
        return theta.new_empty(())

    @register("vbdropout::kl_sum_backward")
    def _(
        theta: Tensor, log_sigma2: Tensor, prior: int, constants: list[float], grad: Tensor
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(theta), torch.empty_like(theta)

    @register("vbdropout::sigma2_and_kl")
    def _(
        theta: Tensor, log_sigma2: Tensor, prior: int, constants: list[float]
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(theta), theta.new_empty(())

    @register("vbdropout::weight_grads_")
    def _(*args: Any) -> None:
        return None

    @register("vbdropout::lrt_sample")
    def _(mean: Tensor, var: Tensor, seed: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return torch.empty_like(mean), torch.empty_like(mean)
