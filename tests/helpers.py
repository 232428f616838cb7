"""Shared test helpers: backend/device matrix and the low-precision error rule."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Where each backend runs in this suite: triton on the GPU when there is one, else through the
# interpreter on CPU tensors; native on CPU always and on CUDA when there is a GPU; "auto" is
# backend=None (the automatic choice, including its torch fallback inside the op).
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param(None, "cpu", id="auto-cpu"),
    pytest.param("native", "cpu", id="native-cpu"),
    pytest.param("triton", "cuda" if HAS_CUDA else "cpu",
                 id="triton-cuda" if HAS_CUDA else "triton-interp"),
    pytest.param("native", "cuda", id="native-cuda", marks=pytest.mark.gpu),
    pytest.param(None, "cuda", id="auto-cuda", marks=pytest.mark.gpu),
]

# Small absolute slack, scaled by the reference's magnitude: about one unit in the last place
# of the dtype, so that a zero eager error does not demand a bit-exact kernel.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_rule(name, out, out_eager, ref):
    """fastgpt's max error at a dtype <= 2x eager PyTorch's at that dtype (+ small atol),
    both against the high-precision reference. NaN positions must match the reference."""
    ref = ref.double()
    out_d, eager_d = out.double(), out_eager.double()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out_d), nan), f"{name}: NaN positions differ from reference"
    if nan.all():
        return
    ok = ~nan
    err = (out_d - ref)[ok].abs().max().item() if ref.numel() else 0.0
    err_eager = (eager_d - ref)[ok].abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref[ok].abs().max().item()) if ref.numel() else 1.0
    bound = 2 * err_eager + ATOL[out.dtype] * scale
    assert err <= bound, (f"{name}: max error {err:.3e} > bound {bound:.3e} "
                          f"(eager {err_eager:.3e}, dtype {out.dtype})")
