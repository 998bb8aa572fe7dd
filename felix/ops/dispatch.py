"""The op layer's machinery: one op, several backends, one dispatch rule.

Every Felix op is declared once (a `torch.library` custom op, so `torch.compile` can trace its
callers) and implemented by named backends:

* ``reference`` -- pure torch. The spec: runs anywhere, every other backend is tested against it.
* ``triton``    -- the Triton kernels in ``felix.ops.kernels``: on a GPU (CUDA or ROCm), or on CPU
                   tensors under ``TRITON_INTERPRET=1`` (how the test suite runs them).
* ``cpu``       -- the C++ extension ``felix._C`` (OpenMP), for CPU tensors.
* ``hip``       -- the optional GPU extension ``felix._C_gpu`` (csrc/hip, HIP/CUDA), for GPU tensors;
                   only chosen when asked for by name.

Automatic dispatch (``backend=None``): Triton for GPU tensors, C++ for CPU tensors, the reference
otherwise (or when the preferred backend is missing). A caller may force any backend by name; a
backend that cannot run the given tensors is refused with an error that says why.

Backend implementations register with :func:`register_impl` and import their heavy modules
lazily, so ``import felix`` never imports Triton or builds a kernel.

Autocast: a backend always runs with autocast switched off (:func:`implementation` wraps it), so it computes
exactly what its spec says for the dtypes it is given -- CPU autocast would otherwise silently turn the
reference's fp32 matmuls into bf16 ones. The public API of a matmul-like op (attention, lowrank_linear,
quant_matmul, linear_ce_quail) takes autocast into account *before* the op, as torch's own ops do:
:func:`autocast_operands` casts its floating operands to the autocast dtype (F.linear / SDPA's rule), so
under ``torch.autocast(..., dtype=torch.bfloat16)`` the op is the spec on bf16 operands, with fp32
accumulation (and, for the loss, fp32 logits). Codecs are not matmuls: autocast does not change them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Callable, NamedTuple

import torch

from felix.ops import _ext, _gpu_ext

BACKENDS = ("reference", "triton", "cpu", "hip")

_IMPLS: dict[str, dict[str, Callable]] = {}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def register_impl(op: str, backend: str):
    """Decorator: register `fn` as `backend`'s implementation of op `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def implementation(op: str, backend: str) -> Callable:
    """`backend`'s implementation of `op`, wrapped to run with autocast off (see the module docstring)."""
    try:
        fn = _IMPLS[op][backend]
    except KeyError:
        have = ", ".join(_IMPLS.get(op, {})) or "none"
        raise ValueError(f"op {op!r} has no {backend!r} backend (it has: {have})") from None

    @functools.wraps(fn)
    def without_autocast(*args, **kwargs):
        if not any(torch.is_autocast_enabled(kind) for kind in _AUTOCAST_DEVICE_TYPES):
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for kind in _AUTOCAST_DEVICE_TYPES:
                stack.enter_context(torch.autocast(kind, enabled=False))
            return fn(*args, **kwargs)

    return without_autocast


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # ROCm GPUs are device type "cuda" in torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives matmul operands on `device` now, or None when autocast is off there."""
    kind = device.type
    if kind not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_operands(*tensors):
    """The operands of a matmul-like op as autocast would hand them to F.linear: floating tensors other than
    float64 cast to the autocast dtype of their device; everything else (None, ints, float64) unchanged.
    Lists of tensors are cast element-wise. Outside autocast, the inputs are returned as given."""

    def cast(t):
        if isinstance(t, (list, tuple)):
            return type(t)(cast(e) for e in t)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        dt = autocast_dtype(t.device)
        return t if dt is None or t.dtype == dt else t.to(dt)

    return tuple(cast(t) for t in tensors)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def arch_key(device: torch.device) -> str:
    """Which launch-config entry (the LAUNCH_CONFIGS tables in kernels/*.py) a device uses: "interpreter"
    for CPU tensors / TRITON_INTERPRET=1, "gfx11" for RDNA3 (RX 7800 XT), "sm90" for Hopper, else
    "default". felix.ops.aot.ARCH_KEYS maps the AOT targets onto the same keys."""
    if triton_interpreting() or device.type == "cpu":
        return "interpreter"
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return "gfx11" if getattr(props, "gcnArchName", "").startswith("gfx11") else "default"
    return "sm90" if props.major == 9 else "default"


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    import triton  # optional (the test extra): only the triton backend needs it, and `import felix` must not

    if torch.cuda.is_available():
        kind = "ROCm" if torch.version.hip else "CUDA"
        return BackendStatus(True, f"triton {triton.__version__} on {kind} device {torch.cuda.get_device_name()}")
    if triton_interpreting():
        return BackendStatus(
            True, f"triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for tests)"
        )
    return BackendStatus(
        False,
        f"triton {triton.__version__} is installed but there is no GPU "
        "(set TRITON_INTERPRET=1 to run kernels on CPU tensors, slowly)",
    )


def _cpu_status() -> BackendStatus:
    ext, why = _ext.load()
    if ext is None:
        return BackendStatus(False, why)
    return BackendStatus(True, f"felix._C (C++/OpenMP, {ext.max_threads()} threads)")


def _hip_status() -> BackendStatus:
    ext, why = _gpu_ext.load()
    if ext is None:
        return BackendStatus(False, why)
    kind = "ROCm" if torch.version.hip else "CUDA"
    return BackendStatus(True, f"felix._C_gpu (HIP/CUDA source built for {kind}) on {torch.cuda.get_device_name()}")


def backends() -> dict[str, BackendStatus]:
    """What each backend can do on this machine, and why not where it cannot."""
    return {
        "reference": BackendStatus(True, f"pure torch {torch.__version__}, runs anywhere"),
        "triton": _triton_status(),
        "cpu": _cpu_status(),
        "hip": _hip_status(),
    }


@torch.compiler.assume_constant_result
def backend_available(backend: str) -> bool:
    """Cached availability (a constant to torch.compile, so dispatch never breaks a graph)."""
    return _available(backend)


@functools.lru_cache(maxsize=None)
def _available(backend: str) -> bool:
    return backends()[backend].available


def resolve_backend(op: str, requested: str | None, device: torch.device) -> str:
    """Pick the backend for `op` on tensors living on `device` (see the module docstring)."""
    have = _IMPLS.get(op, {})
    if requested is None:
        if device.type == "cuda" and "triton" in have and backend_available("triton"):
            return "triton"
        if device.type == "cpu" and "cpu" in have and backend_available("cpu"):
            return "cpu"
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; backends: {', '.join(BACKENDS)}")
    implementation(op, requested)  # raises if the op lacks it
    if not backend_available(requested):
        raise ValueError(f"backend {requested!r} is not available: {backends()[requested].reason}")
    why = device_mismatch(requested, device)
    if why:
        raise ValueError(why)
    return requested


def device_mismatch(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors living on `device` (None: it can). The one rule resolve_backend and
    runnable_backends (felix selftest, benchmarks) share."""
    if backend == "cpu" and device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got a tensor on {device}"
    if backend == "hip" and device.type != "cuda":
        return f"backend 'hip' needs GPU tensors, got a tensor on {device}"
    if backend == "triton" and device.type == "cpu" and not triton_interpreting():
        return (
            "backend 'triton' needs GPU tensors; CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
        )
    return None


def runnable_backends(op: str, device: torch.device) -> list[str]:
    """The backends implementing `op` that are available here and run on `device`, in registration order."""
    status = backends()
    return [name for name in _IMPLS.get(op, {}) if status[name].available and device_mismatch(name, device) is None]
