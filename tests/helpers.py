"""Shared test helpers: the backend/device matrix and the accuracy rule."""
import pytest
import torch

from fastgpt.testing import compare

HAS_CUDA = torch.cuda.is_available()

# Where each backend runs in this suite: triton on the GPU when there is one, else through the
# interpreter on CPU tensors; native on CPU always and on CUDA when there is a GPU; "auto" is
# backend=None (the automatic choice).
TORCH_CPU = pytest.param("torch", "cpu", id="torch-cpu")
KERNEL_BACKEND_DEVICES = [
    pytest.param(None, "cpu", id="auto-cpu"),
    pytest.param("native", "cpu", id="native-cpu"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu",
                 id="triton-cuda" if HAS_CUDA else "triton-interp"),
    pytest.param("native", "cuda", id="native-cuda", marks=pytest.mark.gpu),
    pytest.param(None, "cuda", id="auto-cuda", marks=pytest.mark.gpu),
]
# With the torch backend too, for behaviour (shapes, errors, gradients' plumbing). Accuracy
# tests use KERNEL_BACKEND_DEVICES: the torch backend is eager PyTorch, and comparing it with
# eager PyTorch could not fail.
BACKEND_DEVICES = [TORCH_CPU] + KERNEL_BACKEND_DEVICES


def choice(op, x, *params, backend=None):
    """The backend name an Op's choice gives (its implementations are registered functions)."""
    run = op.choose(backend, x.device, x, *params)
    return next(name for name, impl in op.impls.items() if impl.run is run)


def assert_close_rule(name, out, out_eager, ref, atol=0.0):
    """fastgpt.testing.compare as an assertion: max error at a dtype <= 2x eager PyTorch's at
    that dtype (+ a small floor), both against the float64 reference; NaN where it has NaN."""
    failure = compare(out, out_eager, ref, atol)
    assert failure is None, f"{name}: {failure}"
