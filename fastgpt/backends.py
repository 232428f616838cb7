"""Backends: what is built and usable here, the default, and the per-input choice.

Three backends serve every op:

========  =====================================================  ===============================
name      what                                                   devices
========  =====================================================  ===============================
torch     eager PyTorch: the reference oracle and the fallback  any
triton    Triton kernels (``fastgpt.kernels``)                   CUDA; CPU only under
                                                                 ``TRITON_INTERPRET=1`` (tests)
native    C++ extension ``fastgpt._C`` through the dispatcher    CPU; CUDA when built with it
========  =====================================================  ===============================

``backend=None`` picks, per op and input, the fastest backend that can serve the input
(:data:`_PREFERENCE`); a named backend that cannot serve it raises :class:`BackendError`
naming the argument and the reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from typing import Callable, Dict, Iterator, List, Optional

import torch

BACKENDS = ("torch", "triton", "native")


class BackendError(ValueError):
    """A named backend cannot serve the given input (the message says which argument)."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is usable on a device kind here, and if not, why."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


_OK = BackendStatus(True)

# Probed lazily, once per process (importing triton costs about a second).
_probe_cache: Dict[str, object] = {}


def _probe(name: str, load: Callable[[], object]) -> object:
    """Import result or the exception that stopped it, cached."""
    if name not in _probe_cache:
        try:
            _probe_cache[name] = load()
        except Exception as exc:  # any import failure makes the backend unavailable
            _probe_cache[name] = exc
    return _probe_cache[name]


def native_module():
    """The loaded ``fastgpt._C`` module, or the exception raised by importing it."""
    return _probe("native", lambda: importlib.import_module("fastgpt._C"))


def triton_module():
    """The imported ``fastgpt.kernels`` package, or the exception raised by importing it."""
    return _probe("triton", lambda: importlib.import_module("fastgpt.kernels.layernorm"))


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _status(name: str, device_type: str) -> BackendStatus:
    if name == "torch":
        if device_type == "cuda" and not torch.cuda.is_available():
            return BackendStatus(False, "torch sees no CUDA device")
        return _OK
    if name == "triton":
        mod = triton_module()
        if isinstance(mod, Exception):
            return BackendStatus(False, f"triton kernels failed to import: {mod}")
        if device_type == "cpu":
            if _triton_interpret():
                return _OK
            return BackendStatus(False, "Triton runs CPU tensors only under TRITON_INTERPRET=1")
        if not torch.cuda.is_available():
            return BackendStatus(False, "torch sees no CUDA device")
        return _OK
    if name == "native":
        mod = native_module()
        if isinstance(mod, Exception):
            return BackendStatus(False, f"extension fastgpt._C not built or failed to load: {mod}")
        if device_type == "cuda":
            if not getattr(mod, "WITH_CUDA", 0):
                return BackendStatus(False, "extension built without CUDA")
            if not torch.cuda.is_available():
                return BackendStatus(False, "torch sees no CUDA device")
        return _OK
    raise BackendError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> Dict[str, Dict[str, BackendStatus]]:
    """Per backend and device kind (``"cpu"``, ``"cuda"``): usable here, or why not.

    >>> fastgpt.available_backends()["native"]["cuda"]
    BackendStatus(available=False, reason='extension built without CUDA')
    """
    return {name: {dev: _status(name, dev) for dev in ("cpu", "cuda")} for name in BACKENDS}


# The process-wide default set by use_backend(); a plain list (not a ContextVar) so that
# torch.compile can read it while tracing without a graph break.
_default_stack: List[Optional[str]] = [None]


def _check_name(name: Optional[str]) -> None:
    if name is not None and name not in BACKENDS:
        raise BackendError(f"backend must be None or one of {BACKENDS}, got {name!r}")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Set the default backend of every fastgpt op inside the ``with`` block.

    ``name`` is ``"torch"``, ``"triton"``, ``"native"`` or ``None`` (automatic choice). An
    explicit ``backend=`` argument still wins. The default is process-wide (not per thread).
    """
    _check_name(name)
    _default_stack.append(name)
    try:
        yield
    finally:
        _default_stack.pop()


def default_backend() -> Optional[str]:
    """The backend set by the innermost :func:`use_backend`, or None (automatic)."""
    return _default_stack[-1]


# Automatic choice: per device kind, the backends to try in order; `choose` skips one that
# cannot serve the input (the op's `why_not`: dtype, hidden size).
# CPU: native first. Measured on the 2-core CI machine at 8192x4096 (bench/results/
# *-cpu-20261122-012450, -024041): 2.2x to 32x eager PyTorch, forward and backward, fp32 and
# bf16, in a default process. With a warm heap (*-012806, -024341), which leaves only the
# kernels' own cost, native is 1.00x to 10x eager (bf16 LayerNorm forward: a tie at worst). On tiny inputs the custom op's
# Python overhead makes eager faster (*-012411, 8x768: 0.2-0.6x); the choice stays native
# there because inside the op the alternative is the torch fallback, a chain of ops that is
# slower still. Triton on CPU is the interpreter: never.
# CUDA: native, then triton, by design rather than measurement so far (no GPU results yet);
# revisit with bench/gpu_check.sh results.
_PREFERENCE = {"cpu": ("native", "torch"), "cuda": ("native", "triton", "torch")}


def choose(
    op: str,
    device: torch.device,
    requested: Optional[str],
    why_not: Callable[[str], Optional[str]],
) -> str:
    """The backend that runs `op` on this input.

    `why_not(name)` returns None when backend `name` can serve the input, else the reason
    (naming the argument). A requested backend that cannot serve it raises BackendError; the
    automatic choice falls back quietly along :data:`_PREFERENCE`, ending at "torch".
    """
    name = requested if requested is not None else default_backend()
    if name is not None:
        _check_name(name)
        status = _status(name, device.type)
        if not status:
            raise BackendError(f"fastgpt.{op}: backend {name!r} is unavailable on {device.type}: "
                               f"{status.reason}")
        reason = why_not(name)
        if reason is not None:
            raise BackendError(f"fastgpt.{op}: backend {name!r} cannot serve this input: {reason}")
        return name
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        if _status(candidate, device.type) and why_not(candidate) is None:
            return candidate
    return "torch"
