"""Backends and the op registry: what is built and usable here, and which backend runs an input.

Three backends serve the ops:

========  =====================================================  ===============================
name      what                                                   devices
========  =====================================================  ===============================
torch     eager PyTorch: the reference oracle and the fallback  any
triton    Triton kernels (``fastgpt.kernels``)                   CUDA; CPU only under
                                                                 ``TRITON_INTERPRET=1`` (tests)
native    C++ extension ``fastgpt._C`` through the dispatcher    CPU; CUDA when built with it,
                                                                 on the architectures built for
========  =====================================================  ===============================

An op is one :class:`Op`: per backend an implementation and a ``supports`` check (None, or the
reason it cannot serve an input, naming the argument), and a preference order per device type.
``backend=None`` takes the first backend in that order that is usable on the input's device and
supports the input, falling back to "torch"; a named backend that cannot serve the input raises
:class:`BackendError` saying why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("torch", "triton", "native")


class BackendError(ValueError):
    """A named backend cannot serve the given input (the message says which argument)."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is usable on a device here, and if not, why."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


# ------------------------------------------------------------------ loading the backends

# Modules imported so far, and why those that failed did. Plain dicts, so that torch.compile
# traces a lookup as a constant; the imports themselves happen in _import_error, which
# torch.compile runs for real at trace time.
_modules: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}

# Run once, right after fastgpt._C first loads: each op family registers fake implementations
# and autocast on its C++ ops there (they exist only once the library is loaded).
_native_hooks: List[Callable[[], None]] = []


def on_native_load(hook: Callable[[], None]) -> None:
    """Call `hook` once the extension is loaded (now, if it already is)."""
    _native_hooks.append(hook)
    if "fastgpt._C" in _modules:
        hook()


@torch.compiler.assume_constant_result
def _import_error(module: str) -> str:
    """Import `module` once: "" if it is loaded, else why not (importing triton costs about a
    second, and a failed import would fail again)."""
    if module not in _modules and module not in _import_errors:
        try:
            _modules[module] = importlib.import_module(module)
        except Exception as exc:  # any import failure makes the backend unavailable
            _import_errors[module] = f"{type(exc).__name__}: {exc}"
        else:
            if module == "fastgpt._C":
                for hook in _native_hooks:
                    hook()
    return _import_errors.get(module, "")


def native_module():
    """The loaded ``fastgpt._C`` extension. Raises BackendError if it cannot be loaded."""
    error = _import_error("fastgpt._C")
    if error:
        raise BackendError(f"extension fastgpt._C not built or failed to load: {error}")
    return _modules["fastgpt._C"]


def kernel_module(name: str):
    """The Triton kernels of one op family (``fastgpt.kernels.<name>``), imported on first use.
    Raises BackendError if they cannot be imported."""
    module = f"fastgpt.kernels.{name}"
    error = _import_error(module)
    if error:
        raise BackendError(f"the triton kernels {module} failed to import: {error}")
    return _modules[module]


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_archs(text: str) -> List[Tuple[int, int, str]]:
    """``"8.0;9.0a;12.0+PTX"`` (what ``fastgpt._C.CUDA_ARCHS`` reports) as
    ``[(8, 0, "sass"), (9, 0, "sass-a"), (12, 0, "sass"), (12, 0, "ptx")]``."""
    out = []
    for entry in filter(None, text.replace(" ", ";").split(";")):
        ptx = entry.endswith("+PTX")
        entry = entry[:-4] if ptx else entry
        arch_specific = entry.endswith("a")
        major, minor = entry.rstrip("a").split(".")
        out.append((int(major), int(minor), "sass-a" if arch_specific else "sass"))
        if ptx:
            out.append((int(major), int(minor), "ptx"))
    return out


def runs_on(archs: Sequence[Tuple[int, int, str]], capability: Tuple[int, int]) -> bool:
    """Whether a binary holding `archs` has code for a device of compute `capability`: SASS
    for the same major version and a minor version no higher (sm_80 runs on 8.6), SASS built
    for exactly that arch-specific target (sm_90a runs on 9.0 only), or PTX for an
    architecture no newer than the device (the driver compiles it)."""
    for major, minor, kind in archs:
        if kind == "sass" and major == capability[0] and minor <= capability[1]:
            return True
        if kind == "sass-a" and (major, minor) == capability:
            return True
        if kind == "ptx" and (major, minor) <= capability:
            return True
    return False


@torch.compiler.assume_constant_result
def unavailable(name: str, device_type: str, device_index: int = -1) -> str:
    """Why backend `name` is unusable on that device here, or "" if it is usable.
    `device_index` -1 is the current CUDA device. (A string, so that torch.compile can take the
    answer as a constant at trace time.)"""
    if name == "torch":
        if device_type == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return ""
    if name == "triton":
        error = _import_error("triton")
        if error:
            return f"triton failed to import: {error}"
        if device_type == "cpu":
            return "" if _triton_interpret() else \
                "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    elif name == "native":
        error = _import_error("fastgpt._C")
        if error:
            return f"extension fastgpt._C not built or failed to load: {error}"
        if device_type == "cpu":
            return ""
        if device_type == "cuda" and not _modules["fastgpt._C"].WITH_CUDA:
            return "extension built without CUDA"
    else:
        raise BackendError(f"backend must be one of {BACKENDS}, got {name!r}")
    if device_type != "cuda":
        return f"no {name} kernels for device type {device_type!r}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if name == "native":
        index = device_index if device_index >= 0 else torch.cuda.current_device()
        return _native_cuda_reason(index)
    return ""


@functools.lru_cache(maxsize=None)
def _native_cuda_reason(index: int) -> str:
    """Whether the extension has code for CUDA device `index` (cached: it cannot change)."""
    archs = _modules["fastgpt._C"].CUDA_ARCHS
    capability = torch.cuda.get_device_capability(index)
    if runs_on(parse_archs(archs), capability):
        return ""
    return (f"extension built for CUDA architectures {archs!r}, none of which runs on this device "
            f"(compute capability {capability[0]}.{capability[1]}); rebuild it with "
            f"FASTGPT_CUDA_ARCHS={capability[0]}.{capability[1]}")


def status(name: str, device: torch.device) -> BackendStatus:
    """Whether backend `name` is usable on `device` here, and if not, why."""
    reason = unavailable(name, device.type, -1 if device.index is None else device.index)
    return BackendStatus(not reason, reason)


def available_backends() -> Dict[str, Dict[str, BackendStatus]]:
    """Per backend and device kind (``"cpu"``, ``"cuda"``, the current CUDA device): usable
    here, or why not.

    >>> fastgpt.available_backends()["native"]["cuda"]
    BackendStatus(available=False, reason='torch sees no CUDA device')
    """
    devices = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda")}
    return {name: {kind: status(name, dev) for kind, dev in devices.items()} for name in BACKENDS}


# ------------------------------------------------------------------- the default backend

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


# ------------------------------------------------------------------------------ the registry


def _always(*args) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op. `supports` takes the op's arguments and returns
    None, or why this backend cannot serve them (naming the argument)."""

    run: Callable
    supports: Callable[..., Optional[str]] = _always


class Op:
    """An op: its implementation per backend and the order in which the automatic choice tries
    them per device type (always ending at "torch", which serves every input).

    >>> LAYER_NORM = Op("layer_norm", {"cpu": ("native",), "cuda": ("native", "triton")})
    >>> @LAYER_NORM.implement("native", supports=lambda x, *rest: ...)
    ... def _(x, weight, ...): ...
    >>> LAYER_NORM.choose(backend, x.device, x, weight, ...)(x, weight, ...)
    """

    def __init__(self, name: str, preference: Dict[str, Tuple[str, ...]]):
        self.name = name
        self.preference = {dev: tuple(order) + ("torch",) for dev, order in preference.items()}
        self.impls: Dict[str, Impl] = {}

    def implement(self, backend: str, supports: Callable[..., Optional[str]] = _always):
        """Decorator: register the function as this op's implementation on `backend`."""
        _check_name(backend)

        def register(fn: Callable) -> Callable:
            self.impls[backend] = Impl(fn, supports)
            return fn

        return register

    def choose(self, requested: Optional[str], device: torch.device, *args) -> Callable:
        """The implementation that runs this input: `requested` (else the :func:`use_backend`
        default) if it can serve it, else BackendError; with neither, the first backend of the
        preference order that can."""
        name = requested if requested is not None else _default_stack[-1]
        index = -1 if device.index is None else device.index
        if name is None:
            for candidate in self.preference.get(device.type, ("torch",)):
                impl = self.impls.get(candidate)
                if (impl is not None and not unavailable(candidate, device.type, index)
                        and impl.supports(*args) is None):
                    return impl.run
            return self.impls["torch"].run
        _check_name(name)
        impl = self.impls.get(name)
        if impl is None:
            raise BackendError(f"fastgpt.{self.name}: no {name!r} implementation")
        reason = unavailable(name, device.type, index)
        if reason:
            raise BackendError(f"fastgpt.{self.name}: backend {name!r} is unavailable on "
                               f"{device.type}: {reason}")
        reason = impl.supports(*args)
        if reason is not None:
            raise BackendError(f"fastgpt.{self.name}: backend {name!r} cannot serve this input: "
                               f"{reason}")
        return impl.run
