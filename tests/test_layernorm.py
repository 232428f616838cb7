"""fastgpt.layer_norm and fastgpt.rms_norm on every backend, against a float64 reference.

Both ops share one implementation per backend (RMSNorm = LayerNorm without centring and
bias), so every test here runs for both.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import backends
from fastgpt.layernorm import LAYER_NORM, RMS_NORM
from helpers import BACKEND_DEVICES, HAS_CUDA, KERNEL_BACKEND_DEVICES, assert_close_rule, choice

OPS = ["layer_norm", "rms_norm"]
OP_OF = {"layer_norm": LAYER_NORM, "rms_norm": RMS_NORM}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, affine): 1 row, tiny and prime hidden sizes, 3-D and 4-D inputs, many rows, and the
# largest hidden size the Triton / CUDA kernels claim. affine: "wb" weight and bias (weight
# only for rms_norm), "w" weight only, "none".
CASES = [
    ((1, 1), "wb"),
    ((1, 3), "none"),
    ((5, 17), "w"),
    ((2, 3, 127), "wb"),
    ((2, 2, 3, 768), "w"),
    ((3, 4097), "wb"),
    ((2, 65536), "wb"),
    ((67, 256), "wb"),
]


def _unsupported(backend, device, dtype):
    """True where a named backend rejects the dtype by design (checked in test_errors)."""
    return backend == "native" and device == "cpu" and dtype == torch.float16


def make_inputs(op, shape, affine, dtype, device, residual, seed=0, requires_grad=False,
                param_dtype=None):
    """x, weight, bias, residual; parameters in param_dtype (default: x's dtype)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rnd(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=device, dtype=dt)

    pdt = param_dtype or dtype
    x = rnd(*shape, scale=2.0, shift=0.5)  # a non-zero mean exercises the centring
    w = rnd(n, scale=0.2, shift=1.0, dt=pdt) if affine in ("wb", "w") else None
    b = rnd(n, scale=0.5, dt=pdt) if affine == "wb" and op == "layer_norm" else None
    r = rnd(*shape) if residual else None
    return tuple(t.requires_grad_(requires_grad) if t is not None else None for t in (x, w, b, r))


def fastgpt_fn(op, backend):
    if op == "layer_norm":
        return lambda x, w, b, r: fastgpt.layer_norm(x, w, b, 1e-5, r, backend=backend)
    return lambda x, w, b, r: fastgpt.rms_norm(x, w, 1e-5, r, backend=backend)


def eager_fn(op):
    """Eager PyTorch. Parameters of another dtype than x are upcast to float32 first where torch
    does not take the mix itself (exact: a 16-bit value converts to float32 without rounding)."""
    def fn(x, w, b, r):
        h = x + r if r is not None else x
        n = x.shape[-1]
        mixes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
        w, b = (p if p is None or p.dtype in mixes else p.float() for p in (w, b))
        y = F.layer_norm(h, (n,), w, b, 1e-5) if op == "layer_norm" else F.rms_norm(h, (n,), w, 1e-5)
        return y if r is None else (y, h)
    return fn


def run_with_grads(fn, inputs, grads_out, dtype=None):
    """Run fn on leaf copies of inputs (cast to dtype if given); return outputs and the
    gradients of every non-None input, as a flat list of tensors."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, used, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return [o.detach() for o in outs] + list(grads)


def check_against_reference(op, backend, inputs, seed=1, fn=None):
    """Outputs and every gradient of fastgpt (or `fn`) against the float64 reference, within
    twice eager PyTorch's error at the same dtypes; each output and gradient in the dtype of
    what it belongs to (y, h: x's; dweight, dbias: the parameter's)."""
    x = inputs[0]
    g = torch.Generator().manual_seed(seed)
    n_out = 2 if inputs[3] is not None else 1
    grads_out = [torch.randn(x.shape, generator=g).to(x.device) for _ in range(n_out)]
    got = run_with_grads(fn or fastgpt_fn(op, backend), inputs, grads_out)
    eager = run_with_grads(eager_fn(op), inputs, grads_out)
    ref = run_with_grads(eager_fn(op), inputs, grads_out, dtype=torch.float64)
    present = [(n, t) for n, t in zip(["dx", "dweight", "dbias", "dresidual"], inputs) if t is not None]
    names = ["y", "h"][:n_out] + [n for n, _ in present]
    dtypes = [x.dtype] * n_out + [t.dtype for _, t in present]
    for name, dtype, a, e, r in zip(names, dtypes, got, eager, ref):
        assert a.shape == r.shape and a.dtype == dtype, (name, a.dtype, dtype)
        assert_close_rule(name, a, e, r)
    if n_out == 2:  # h = x + residual, rounded exactly as eager rounds it
        assert torch.equal(got[1], eager[1])


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,affine", CASES, ids=[f"{'x'.join(map(str, s))}-{a}" for s, a in CASES])
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, shape, affine, dtype, residual, backend, device):
    inputs = make_inputs(op, shape, affine, dtype, device, residual)
    if _unsupported(backend, device, dtype):
        with pytest.raises(fastgpt.BackendError, match="dtype"):
            fastgpt_fn(op, backend)(*inputs)
        return
    if backend is None and choice(OP_OF[op], inputs[0]) == "torch":
        # The automatic choice fell back to eager PyTorch (fp16 on CPU): it must be exactly that.
        for a, e in zip(run_with_grads(fastgpt_fn(op, None), inputs, [torch.ones_like(inputs[0])] * 2),
                        run_with_grads(eager_fn(op), inputs, [torch.ones_like(inputs[0])] * 2)):
            assert torch.equal(a, e)
        return
    check_against_reference(op, backend, inputs)


# Mixed precision: parameters in another dtype than x. fp32 parameters beside 16-bit x is the
# case every mixed-precision training loop hands the norms; 16-bit parameters beside fp32 x and
# a 16-bit mix complete the picture.
MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
         (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype,param_dtype", MIXED, ids=[f"{x}-{p}".replace("torch.", "") for x, p in MIXED])
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 768), (3, 4097)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_mixed_precision_parameters(op, shape, dtype, param_dtype, residual, backend, device):
    inputs = make_inputs(op, shape, "wb", dtype, device, residual, param_dtype=param_dtype)
    if _unsupported(backend, device, dtype):
        return  # fp16 x on the native CPU kernels: refused by design (test_matches_reference)
    check_against_reference(op, backend, inputs)


def _strided_params(kind, n, device, dtype):
    """A weight and bias of n elements that are not plain contiguous tensors."""
    g = torch.Generator().manual_seed(7)
    base = (torch.rand(3 * n + 5, generator=g) + 0.5).to(device, dtype)
    if kind == "step":  # w[::2]
        return base[: 2 * n : 2], base[1 : 2 * n + 1 : 2]
    if kind == "expanded":  # one value broadcast to n: stride 0
        return (torch.tensor([1.5], device=device, dtype=dtype).expand(n),
                torch.tensor([-0.25], device=device, dtype=dtype).expand(n))
    if kind == "offset":  # a slice starting past the storage's first element
        return base[3 : 3 + n], base[n + 5 : 2 * n + 5]
    raise AssertionError(kind)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["step", "expanded", "offset"])
@pytest.mark.parametrize("op", OPS)
def test_strided_parameters(op, kind, param_dtype, backend, device):
    n = 67
    x = (torch.randn(9, n, generator=torch.Generator().manual_seed(2)) * 2 + 0.5).to(device)
    w, b = _strided_params(kind, n, device, param_dtype)
    inputs = (x, w, b if op == "layer_norm" else None, torch.randn_like(x))
    check_against_reference(op, backend, inputs)
    check_against_reference(op, backend, inputs[:3] + (None,))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_autocast_gives_torchs_dtype(op, backend, device):
    """Under torch.autocast the op returns what torch's own op returns on that device (CPU:
    autocast leaves both norms alone; CUDA: float32 for layer_norm, and for rms_norm where
    torch's version puts it on the float32 list), module included, gradients flowing."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, _ = make_inputs(op, (4, 64), "wb", dtype, device, False, requires_grad=True,
                                 param_dtype=torch.float32)
        with torch.autocast(device, dtype=torch.bfloat16):
            got = fastgpt_fn(op, backend)(x, w, b, None)
            want = eager_fn(op)(x, w, b, None)
            module = (fastgpt.nn.LayerNorm(64, backend=backend) if op == "layer_norm"
                      else fastgpt.nn.RMSNorm(64, eps=1e-5, backend=backend)).to(device)
            torch_module = (torch.nn.LayerNorm(64) if op == "layer_norm"
                            else torch.nn.RMSNorm(64, eps=1e-5)).to(device)
            assert module(x).dtype == torch_module(x).dtype
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        got.float().sum().backward()
        assert x.grad.dtype == x.dtype and w.grad.dtype == torch.float32


@pytest.mark.parametrize("ns", ["fastgpt", "fastgpt_triton"])
@pytest.mark.parametrize("op", OPS)
def test_autocast_registration_follows_torch(op, ns):
    """Our ops have an autocast kernel on a device exactly where torch's op has one."""
    fastgpt.layer_norm(torch.ones(1, 1), backend="native")  # loads fastgpt._C, registers its ops
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert (torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{op}", key)
                == torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)), key


# The CPU kernels write outputs of 16 MiB and more with streaming stores when their pages are
# already resident (stream_output in csrc/cpu/layernorm.cpp): through an L1 buffer, with h
# streamed from a scratch row. Fresh outputs (a default process: glibc mmaps large blocks) take
# the plain path, so these cases run in a child process whose heap reuses freed blocks
# (fastgpt.bench.cpuheap.warm_heap): after one warm-up call every large output lands on
# resident pages. 3075 fp32 columns put row starts off 16-byte alignment, where the kernels
# fall back to plain stores.
LARGE_CASES = [(op, shape, dtype, residual)
               for op in OPS
               for shape, dtype in [((4096, 1024), torch.float32), ((1366, 3075), torch.float32),
                                    ((8192, 1024), torch.bfloat16)]
               for residual in (False, True)]


def check_large_cases():
    from fastgpt.bench.cpuheap import warm_heap
    assert warm_heap()["applied"], "the check needs glibc's mallopt"
    for i, (op, shape, dtype, residual) in enumerate([LARGE_CASES[0]] + LARGE_CASES):
        assert shape[0] * shape[1] * dtype.itemsize >= 16 << 20
        inputs = make_inputs(op, shape, "wb", dtype, "cpu", residual, seed=i)
        check_against_reference(op, "native", inputs)


def test_native_cpu_large_outputs_on_resident_pages():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_layernorm as t; t.check_large_cases()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _strided_inputs(kind, device, n=96):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 2 * n, generator=g).to(device)
    if kind == "column-slice":  # rows 2n apart: the kernels read them in place
        return base[:, :n], torch.randn(6, n, generator=g).to(device)
    if kind == "transposed":  # last dim not unit-stride: one contiguous copy
        return (torch.randn(n, 6, generator=g).to(device).t(),
                torch.randn(n, 6, generator=g).to(device).t())
    if kind == "broadcast":  # a stride-0 row dimension
        return base[:1, :n].expand(6, n), torch.randn(6, n, generator=g).to(device)
    if kind == "permuted-4d":
        x = torch.randn(2, 3, 4, n, generator=g).to(device).permute(0, 2, 1, 3)
        return x, torch.randn(4, 2, 3, n, generator=g).to(device).transpose(0, 1)
    raise AssertionError(kind)


# The configurations the GPU benchmarks time, so that the first GPU run checks what is timed:
# bf16 at hidden 4096 over 4096+ rows (the CUDA kernels' vectorised, resident-row backward with
# a persistent grid), fp32 at 2048 and 8192 (one and several warps per row), a base pointer off
# 16-byte alignment (the scalar fallback), and strided fp32 master weights beside bf16 x.
GPU_HOT = [
    pytest.param((4096, 4096), torch.bfloat16, "plain", id="bf16-4096x4096"),
    pytest.param((4100, 4096), torch.bfloat16, "fp32-strided-weight", id="bf16-4100x4096-fp32w"),
    pytest.param((2048, 2048), torch.float32, "plain", id="fp32-2048x2048"),
    pytest.param((1024, 8192), torch.float32, "plain", id="fp32-1024x8192"),
    pytest.param((512, 4096), torch.bfloat16, "misaligned", id="bf16-512x4096-misaligned"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("shape,dtype,kind", GPU_HOT)
@pytest.mark.parametrize("op", OPS)
def test_gpu_hot_configurations(op, shape, dtype, kind, backend):
    m, n = shape
    pdtype = torch.float32 if kind == "fp32-strided-weight" else dtype
    x, w, b, r = make_inputs(op, shape, "wb", dtype, "cuda", True, param_dtype=pdtype)
    if kind == "misaligned":  # rows start one element past a 16-byte boundary
        x = torch.cat([x.new_zeros(m, 1), x], 1)[:, 1:]
        r = torch.cat([r.new_zeros(m, 1), r], 1)[:, 1:]
    if kind == "fp32-strided-weight":
        w = torch.stack([w, w]).t().reshape(-1)[::2]
        b = None if b is None else torch.stack([b, b]).t().reshape(-1)[::2]
    check_against_reference(op, backend, (x, w, b, r))
    check_against_reference(op, backend, (x, w, b, None))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("kind", ["column-slice", "transposed", "broadcast", "permuted-4d"])
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous(op, kind, backend, device):
    x, r = _strided_inputs(kind, device)
    n = x.shape[-1]
    w = torch.rand(n, device=device) + 0.5
    b = torch.randn(n, device=device) if op == "layer_norm" else None
    check_against_reference(op, backend, (x, w, b, r))
    check_against_reference(op, backend, (x, w, b, None))


@pytest.mark.skipif(not HAS_CUDA and not fastgpt.available_backends()["triton"]["cpu"],
                    reason="triton unavailable")
def test_column_slice_is_not_copied(monkeypatch):
    """Rows of a column slice reach the kernel launcher as a strided view, not a copy."""
    kernels = backends.kernel_module("layernorm")
    seen = {}
    real = kernels.norm_fwd

    def spy(x, *args, **kwargs):
        seen["stride"] = x.stride()
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "norm_fwd", spy)
    base = torch.randn(4, 64, device="cuda" if HAS_CUDA else "cpu")
    fastgpt.layer_norm(base[:, :32], backend="triton")
    assert seen["stride"] == (64, 1)


FP64_BACKENDS = [p for p in KERNEL_BACKEND_DEVICES if p.id in ("auto-cpu", "native-cpu", "triton-interp")]


@pytest.mark.parametrize("backend,device", FP64_BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_fp64(op, residual, backend, device):
    x, w, b, r = make_inputs(op, (3, 7), "wb", torch.float64, device, residual, seed=5,
                             requires_grad=True)
    leaves = [t for t in (x, w, b, r) if t is not None]
    fn = fastgpt_fn(op, backend)

    def f(*args):
        it = iter(args)
        return fn(*[next(it) if t is not None else None for t in (x, w, b, r)])

    assert torch.autograd.gradcheck(f, leaves)


# The ops behind each kernel backend: (namespace, device).
KERNEL_OPS = [
    pytest.param("fastgpt", "cpu", id="native-cpu"),
    pytest.param("fastgpt_triton", "cuda" if HAS_CUDA else "cpu",
                 id="triton-cuda" if HAS_CUDA else "triton-interp"),
    pytest.param("fastgpt", "cuda", id="native-cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("ns,device", KERNEL_OPS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, ns, device):
    """torch.library.opcheck on the ops each backend calls: schema, fake (meta) implementation,
    registered autograd, AOT dispatch; with strided fp32 parameters beside bf16 x too."""
    fastgpt.layer_norm(torch.ones(1, 1), backend="native")  # loads fastgpt._C, registers its ops
    ops = getattr(torch.ops, ns)
    for dtype, pdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        x, w, b, r = make_inputs(op, (3, 5, 33), "wb", dtype, device, True, requires_grad=True,
                                 param_dtype=pdtype)
        w_strided = torch.randn(66, device=device, dtype=pdtype)[::2].requires_grad_()
        if op == "layer_norm":
            torch.library.opcheck(ops.layer_norm, (x, w, b, r, 1e-5))
            torch.library.opcheck(ops.layer_norm, (x, w_strided, None, None, 1e-5))
            torch.library.opcheck(ops.layer_norm, (x, None, None, None, 1e-5))
        else:
            torch.library.opcheck(ops.rms_norm, (x, w, r, 1e-5))
            torch.library.opcheck(ops.rms_norm, (x, w_strided, None, 1e-5))
            torch.library.opcheck(ops.rms_norm, (x, None, None, 1e-5))
    x, w, b, r = (t if t is None else t.detach()
                  for t in make_inputs(op, (5, 40), "wb", torch.float32, device, True))
    dy = torch.randn_like(x)
    if op == "layer_norm":
        y, h, mean, rstd = ops.layer_norm(x, w, b, r, 1e-5)
        torch.library.opcheck(ops.layer_norm_backward, (dy, dy, h, w, mean, rstd, True, True))
    else:
        y, h, rstd = ops.rms_norm(x, w, r, 1e-5)
        torch.library.opcheck(ops.rms_norm_backward, (dy, None, h, w, rstd, True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_native_ops_reject_bad_operands(device):
    """The C++ ops check what they are given (they can be called directly): rows of no
    elements have no statistics, and parameters must match x's hidden size and device."""
    fastgpt.layer_norm(torch.ones(1, 1), backend="native")  # loads fastgpt._C
    ops = torch.ops.fastgpt
    x = torch.empty(3, 0, device=device)
    with pytest.raises(RuntimeError, match="x must have a hidden \\(last\\) dimension of size >= 1"):
        ops.layer_norm(x, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must have a hidden \\(last\\) dimension of size >= 1"):
        ops.rms_norm(x, None, None, 1e-5)
    rstd = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="src must have a hidden"):
        ops.layer_norm_backward(x, None, x, None, torch.zeros(3, device=device), rstd, False, False)
    x = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match="weight must have shape \\[8\\]"):
        ops.layer_norm(x, torch.ones(7, device=device), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="residual has dtype"):
        ops.rms_norm(x, None, x.double(), 1e-5)
    with pytest.raises(RuntimeError, match="rstd must hold 3"):
        ops.rms_norm_backward(x, None, x, None, torch.ones(2, device=device), False)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(op, backend, device):
    """torch.compile traces the ops in one graph (aot_eager: dynamo + AOTAutograd, the tracing
    that matters; test_compile_inductor covers code generation); outputs and gradients against
    the float64 reference, fp32 parameters beside bf16 x included."""
    for dtype in (torch.float32, torch.bfloat16):
        inputs = make_inputs(op, (4, 9, 64), "wb", dtype, device, True, param_dtype=torch.float32)
        compiled = torch.compile(fastgpt_fn(op, backend), fullgraph=True, backend="aot_eager")
        check_against_reference(op, backend, inputs, fn=compiled)


@pytest.mark.parametrize("op", OPS)
def test_compile_inductor(op):
    """A pre-norm block compiled by inductor around the auto-chosen op, backward included,
    against the same block in float64."""
    x, w, b, r = make_inputs(op, (2, 8, 48), "wb", torch.float32, "cpu", True)

    def block(x, r, w, b):
        y, h = fastgpt_fn(op, None)(x, w, b, r)
        return torch.relu(y) * 2 + h

    def eager_block(x, r, w, b):
        y, h = eager_fn(op)(x, w, b, r)
        return torch.relu(y) * 2 + h

    compiled = torch.compile(block, fullgraph=True)
    g = [torch.randn_like(x)]
    got = run_with_grads(compiled, (x, r, w, b), g)
    eager = run_with_grads(eager_block, (x, r, w, b), g)
    ref = run_with_grads(eager_block, (x, r, w, b), g, dtype=torch.float64)
    for name, a, e, rr in zip(["out", "dx", "dresidual", "dweight", "dbias"], got, eager, ref):
        assert_close_rule(name, a, e, rr)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_propagates(op, backend, device):
    x, w, b, r = make_inputs(op, (4, 33), "wb", torch.float32, device, False)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    got = fastgpt_fn(op, backend)(x, w, b, None)
    want = eager_fn(op)(x, w, b, None)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 3]]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_empty_rows(op, backend, device):
    x, w, b, r = make_inputs(op, (0, 3, 16), "wb", torch.float32, device, True, requires_grad=True)
    y, h = fastgpt_fn(op, backend)(x, w, b, r)
    assert y.shape == h.shape == x.shape
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_residual_grads_are_independent(backend, device):
    x, w, b, r = make_inputs("layer_norm", (3, 16), "wb", torch.float32, device, True)
    x.requires_grad_(), r.requires_grad_()
    y, h = fastgpt_fn("layer_norm", backend)(x, w, b, r)
    (y.sum() + h.sum()).backward()
    assert torch.equal(x.grad, r.grad)
    x.grad.add_(1)
    assert not torch.equal(x.grad, r.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_only_h_used(backend, device):
    """y unused: its gradient arrives as None; dx is then the residual stream's gradient."""
    x, w, b, r = make_inputs("layer_norm", (3, 16), "wb", torch.float32, device, True)
    x.requires_grad_()
    _, h = fastgpt_fn("layer_norm", backend)(x, w, b, r)
    (h * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


# ------------------------------------------------------------------------------ errors


def _call(op, x, w=None, b=None, r=None, eps=1e-5, backend=None):
    if op == "layer_norm":
        return fastgpt.layer_norm(x, w, b, eps, r, backend=backend)
    return fastgpt.rms_norm(x, w, eps, r, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_errors_name_the_argument(op):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        _call(op, x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        _call(op, x, r=torch.randn(4, 9))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        _call(op, x, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _call(op, torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="residual has dtype torch.float16 but x has dtype torch.float32"):
        _call(op, x, r=torch.randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        _call(op, x, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        _call(op, x, eps=-1e-5)
    with pytest.raises(ValueError, match="hidden \\(last\\) dimension of size >= 1"):
        _call(op, torch.randn(4, 0))
    with pytest.raises(fastgpt.BackendError, match="backend must be None or one of"):
        _call(op, x, backend="cuda")
    with pytest.raises(TypeError, match="weight must be floating point"):
        _call(op, x, torch.ones(8, dtype=torch.int32))
    if op == "layer_norm":
        with pytest.raises(ValueError, match="bias must have shape \\(8,\\)"):
            _call(op, x, b=torch.ones(9))


@pytest.mark.parametrize("op", OPS)
def test_hidden_size_limit(op):
    device = "cuda" if HAS_CUDA else "cpu"  # where the triton backend runs in this suite
    x = torch.randn(1, backends.kernel_module("layernorm").MAX_HIDDEN + 1, device=device)
    with pytest.raises(fastgpt.BackendError, match="hidden size 65537, over the triton kernels' limit"):
        _call(op, x, backend="triton")
    # The automatic choice (falling back to torch) and the CPU kernels have no such limit.
    torch.testing.assert_close(_call(op, x), eager_fn(op)(x, None, None, None))
    x = x.cpu()
    torch.testing.assert_close(_call(op, x, backend="native"), eager_fn(op)(x, None, None, None))


@pytest.mark.parametrize("op", OPS)
def test_unsupported_dtype_on_named_backend(op):
    x = torch.randn(2, 8, dtype=torch.float16)
    with pytest.raises(fastgpt.BackendError, match="x has dtype torch.float16; the native kernels on cpu"):
        _call(op, x, backend="native")
    assert choice(OP_OF[op], x) == "torch"  # the automatic choice falls back quietly


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastgpt.BackendError, match="TRITON_INTERPRET=1"):
        fastgpt.layer_norm(torch.randn(2, 8), backend="triton")
    assert fastgpt.available_backends()["triton"]["cpu"].available is False


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_unavailable_reason():
    status = fastgpt.available_backends()
    assert status["torch"]["cpu"] and status["native"]["cpu"]
    assert not status["native"]["cuda"] and status["native"]["cuda"].reason


# --------------------------------------------------------------------- backend choice


def test_auto_choice_on_cpu():
    assert choice(LAYER_NORM, torch.randn(2, 8)) == "native"
    assert choice(RMS_NORM, torch.randn(2, 8, dtype=torch.bfloat16)) == "native"


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_is_torchs_own_op(op):
    """backend="torch" is eager PyTorch, bit for bit, also where parameters have another dtype
    (a mix F.layer_norm refuses is run on exactly converted parameters)."""
    for dtype, pdtype in [(torch.float32, torch.float32)] + MIXED:
        x, w, b, r = make_inputs(op, (3, 40), "wb", dtype, "cpu", True, param_dtype=pdtype)
        for a, e in zip(fastgpt_fn(op, "torch")(x, w, b, r), eager_fn(op)(x, w, b, r)):
            assert a.dtype == dtype and torch.equal(a, e)


def test_archs_a_binary_runs_on():
    archs = backends.parse_archs("8.0;8.6;9.0;9.0a;12.0+PTX")
    assert archs == [(8, 0, "sass"), (8, 6, "sass"), (9, 0, "sass"), (9, 0, "sass-a"),
                     (12, 0, "sass"), (12, 0, "ptx")]
    runs = lambda text, cap: backends.runs_on(backends.parse_archs(text), cap)  # noqa: E731
    assert runs("8.0", (8, 9)) and runs("8.0", (8, 0)) and not runs("8.6", (8, 0))
    assert not runs("8.0", (9, 0))  # SASS never runs on another major version
    assert runs("9.0a", (9, 0)) and not runs("9.0a", (10, 0))
    assert not runs("9.0a", (9, 1))  # arch-specific code runs on that exact arch only
    assert runs("8.0;12.0+PTX", (12, 1)) and runs("9.0+PTX", (12, 0))  # PTX JIT-compiles forward
    assert not runs("12.0+PTX", (9, 0)) and not runs("", (9, 0))


def test_native_on_a_gpu_it_was_not_built_for_falls_back(monkeypatch):
    """A CUDA device the extension has no code for: "native" reports why, a named native call
    raises that, and the automatic choice takes Triton (simulated: a compute capability 8.0
    device and an extension built for sm_90a only)."""
    fastgpt.layer_norm(torch.ones(1, 1), backend="native")  # loads fastgpt._C
    real = backends._modules["fastgpt._C"]

    class Built:  # what fastgpt._C reports, as a CUDA build for sm_90a would
        WITH_CUDA = 1
        CUDA_ARCHS = "9.0a"
        NORM_DTYPES_CUDA = "float32,float16,bfloat16"
        NORM_MAX_HIDDEN_CUDA = real.NORM_MAX_HIDDEN_CUDA

    monkeypatch.setitem(backends._modules, "fastgpt._C", Built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    backends._native_cuda_reason.cache_clear()
    try:
        status = fastgpt.available_backends()["native"]["cuda"]
        assert not status and "9.0a" in status.reason and "8.0" in status.reason
        x = torch.empty(2, 8, device="meta")  # stands in for a CUDA tensor: only its device is read
        cuda = torch.device("cuda", 0)
        with pytest.raises(fastgpt.BackendError, match="built for CUDA architectures"):
            LAYER_NORM.choose("native", cuda, x)
        if fastgpt.available_backends()["triton"]["cuda"]:
            assert LAYER_NORM.choose(None, cuda, x) is LAYER_NORM.impls["triton"].run
    finally:
        backends._native_cuda_reason.cache_clear()


def test_use_backend_sets_default_and_explicit_wins():
    x = torch.randn(2, 8, dtype=torch.float16)
    with fastgpt.use_backend("native"):
        with pytest.raises(fastgpt.BackendError, match="backend 'native' cannot serve"):
            fastgpt.layer_norm(x)
        fastgpt.layer_norm(x, backend="torch")  # explicit argument wins
        with fastgpt.use_backend(None):
            fastgpt.layer_norm(x)  # automatic again inside
    fastgpt.layer_norm(x)
    with pytest.raises(fastgpt.BackendError):
        with fastgpt.use_backend("fast"):
            pass


# ------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("backend", ["native", None])
def test_layernorm_module_is_drop_in(backend):
    ref = torch.nn.LayerNorm(32)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    mod = fastgpt.nn.LayerNorm(32, backend=backend)
    mod.load_state_dict(ref.state_dict())
    assert isinstance(mod, torch.nn.LayerNorm)
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(mod(x), ref(x))
    r = torch.randn_like(x)
    y, h = mod(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r))


def test_module_variants_match_torch():
    x = torch.randn(3, 4, 6, 5)
    for ours, theirs in [
        (fastgpt.nn.LayerNorm((6, 5)), torch.nn.LayerNorm((6, 5))),
        (fastgpt.nn.LayerNorm(5, elementwise_affine=False), torch.nn.LayerNorm(5, elementwise_affine=False)),
        (fastgpt.nn.LayerNorm(5, bias=False), torch.nn.LayerNorm(5, bias=False)),
        (fastgpt.nn.RMSNorm(5), torch.nn.RMSNorm(5)),
        (fastgpt.nn.RMSNorm((6, 5), eps=1e-6), torch.nn.RMSNorm((6, 5), eps=1e-6)),
    ]:
        ours.load_state_dict(theirs.state_dict())
        if ours.weight is not None:
            with torch.no_grad():
                ours.weight.uniform_(0.5, 1.5)
                theirs.weight.copy_(ours.weight)
        torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="normalized_shape"):
        fastgpt.nn.RMSNorm(7)(x)


# ------------------------------------------------------------- Triton's looped layout


@pytest.mark.skipif(not HAS_CUDA and not fastgpt.available_backends()["triton"]["cpu"],
                    reason="triton unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_triton_looped_layout(rms, dtype):
    """Rows longer than a register block are walked in chunks (Chan-merged statistics, second
    pass to normalise); forcing a small chunk runs that layout on a small row, with a large
    mean to catch cancellation, strided rows, a residual and dh."""
    tk = backends.kernel_module("layernorm")
    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(11)
    m, n = 5, 4097
    base = (torch.randn(m, n + 3, generator=g) + 300.0).to(device, dtype)
    x = base[:, :n]  # strided, misaligned rows
    r = torch.randn(m, n, generator=g).to(device, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(device, dtype)
    b = None if rms else torch.randn(n, generator=g).to(device, dtype)
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    dh = torch.randn(m, n, generator=g).to(device, dtype)

    y, h, mean, rstd = tk.norm_fwd(x, w, b, r, 1e-5, rms, block_n=2048)  # 3 chunks
    assert torch.equal(h, x + r)
    # The reference normalises the rounded h, as the kernel must.
    y_ref, rstd_ref = _reference_fwd(h.double(), w.double(), None if b is None else b.double(), rms)
    y_eag = _reference_fwd(h.float(), w.float(), None if b is None else b.float(), rms)[0].to(dtype)
    assert_close_rule("y", y, y_eag, y_ref)
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-4, atol=0)

    got = tk.norm_bwd(dy, dh, h, w, mean, rstd, rms, True, not rms, block_n=2048)
    eag = _reference_bwd(dy.float(), dh.float(), h.float(), w.float(), rms)
    ref = _reference_bwd(dy.double(), dh.double(), h.double(), w.double(), rms)
    for name, a, e, r_ in zip(["dx", "dweight", "dbias"], got, eag, ref):
        if r_ is not None:
            e = e.to(dtype) if name == "dx" else e
            assert_close_rule(name, a, e, r_)


def _reference_fwd(h, w, b, rms):
    """(y, rstd) of the norm of rows h, in h's dtype."""
    centred = h if rms else h - h.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1) + 1e-5)
    y = centred * rstd[:, None] * w
    return (y if b is None else y + b), rstd


def _reference_bwd(dy, dh, h, w, rms):
    """(dx, dweight, dbias) of _reference_fwd by autograd, in h's dtype."""
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = None if rms else torch.zeros_like(w, requires_grad=True)
    y, _ = _reference_fwd(h, w, b, rms)
    grads = torch.autograd.grad(y, [t for t in (h, w, b) if t is not None], dy)
    return (grads[0] + dh, grads[1], None if rms else grads[2])
