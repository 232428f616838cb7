"""fastgpt.linear and fastgpt.matmul on every backend against a float64 reference (outputs and
every gradient, FlashAttention's 2x-eager rule), torch.matmul's semantics through the automatic
choice, errors, opcheck, torch.compile, autocast and fastgpt.nn.Linear."""
import pytest
import torch
import torch.nn.functional as F

import fastgpt
from fastgpt import BackendError
from fastgpt.linear import GATED, LINEAR, MATMUL, _eager_linear
from fastgpt.testing import CHECK_TOLERANCE

from helpers import HAS_CUDA, KERNEL_BACKEND_DEVICES, assert_close_rule, choice

INTERPRETED = not HAS_CUDA
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]


def kernel_dtypes(backend, device):
    if backend == "triton" and INTERPRETED:
        return (torch.float32, torch.float16)  # bf16 tl.dot is wrong in the interpreter
    if device == "cpu":
        return (torch.float32, torch.bfloat16)
    return (torch.float16, torch.bfloat16)


def base_dtype(backend, device):
    return torch.float32 if device == "cpu" or backend == "triton" else torch.bfloat16


def make_inputs(m_shape, n, k, activation, dtype, device, *, bias=True, residual=True, seed=0):
    """x (*m_shape, k), weight (rows, k), bias, residual and the output gradient, unit-scale
    products (weight ~ 1/sqrt(k)) so activations see their interesting range."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n if activation in GATED else n

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device,
                                                                              dtype=dtype)

    x = rnd(*m_shape, k)
    w = rnd(rows, k, scale=k ** -0.5)
    b = rnd(rows, scale=0.5) if bias else None
    r = rnd(*m_shape, n) if residual else None
    dy = rnd(*m_shape, n)
    return x, w, b, r, dy


def grads_of(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, dy)
    return (out.detach(), *grads)


def check_linear(backend, device, x, w, b, r, dy, activation, name):
    """fastgpt's output and gradients (x, weight, bias, residual) at x's dtype within the rule
    of eager's at that dtype, both against float64 eager."""
    def ours(x_, w_, b_, r_):
        return fastgpt.linear(x_, w_, b_, activation, r_, backend=backend)

    def eager(x_, w_, b_, r_):
        return _eager_linear(x_, w_, b_, activation, r_)

    got = grads_of(ours, (x, w, b, r), dy)
    want = grads_of(eager, (x, w, b, r), dy)
    ref = grads_of(eager, tuple(t.double() if t is not None else None for t in (x, w, b, r)),
                   dy.double())
    assert_close_rule(name, tuple(t.cpu() for t in got), tuple(t.cpu() for t in want),
                      tuple(t.cpu() for t in ref), atol=CHECK_TOLERANCE[x.dtype])


# ------------------------------------------------------------------------- accuracy sweeps

# The sizes: M in {1, 17, 4095}, N in {3, 768, 3072}, K in {7, 768}. The Triton
# interpreter (numpy, one program at a time) took 27-220 s for each product above 10^5 (M x N x
# K), so there it runs those up to 10^5 (4095 x 3 x 7 included: ~10 s) and the larger ones run
# compiled (native here; Triton and native on a GPU).
SIZES = [(m, n, k) for m in (1, 17, 4095) for n in (3, 768, 3072) for k in (7, 768)]


def _too_big_for_interpreter(backend, device, m, n, k):
    return backend == "triton" and device == "cpu" and m * n * k > 100_000


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("m,n,k", SIZES)
def test_sizes(backend, device, m, n, k):
    if _too_big_for_interpreter(backend, device, m, n, k):
        pytest.skip("the interpreter is too slow at this size; runs compiled on a GPU")
    dtype = base_dtype(backend, device)
    x, w, b, r, dy = make_inputs((m,), n, k, "gelu", dtype, device, seed=m + n + k)
    check_linear(backend, device, x, w, b, r, dy, "gelu", f"{backend}-{device}-{m}x{n}x{k}")


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_native_cpu_decode_rows(m):
    """A few rows of x (decoding) take the CPU's own GEMV-like product up to 4 rows, ATen's
    GEMM from 5; both within the rule, strided weight rows and a transposed x included."""
    x, w, b, r, dy = make_inputs((m,), 37, 41, "gelu_tanh", torch.float32, "cpu", seed=m)
    check_linear("native", "cpu", x, w, b, r, dy, "gelu_tanh", f"native-cpu-{m}-rows")
    wide = torch.randn(37, 50)[:, 3:44]  # rows 50 apart
    xt = torch.randn(41, m).t()  # unit row stride: ATen's path
    for x_ in (x, xt):
        check_linear("native", "cpu", x_, wide, b, r, dy, "gelu_tanh",
                     f"native-cpu-{m}-rows-strided")


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_every_dtype(backend, device, activation):
    for dtype in kernel_dtypes(backend, device):
        x, w, b, r, dy = make_inputs((2, 19), 40, 33, activation, dtype, device)
        check_linear(backend, device, x, w, b, r, dy, activation,
                     f"{backend}-{device}-{activation}-{dtype}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("activation", [None, "silu", "swiglu"])
def test_no_bias_no_residual(backend, device, activation):
    dtype = base_dtype(backend, device)
    x, w, _, _, dy = make_inputs((23,), 17, 29, activation, dtype, device, bias=False,
                                 residual=False)
    check_linear(backend, device, x, w, None, None, dy, activation, f"{backend}-{activation}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_one_dim_and_four_dim_x(backend, device):
    dtype = base_dtype(backend, device)
    for m_shape in ((), (2, 3, 5)):
        x, w, b, r, dy = make_inputs(m_shape, 12, 20, "relu", dtype, device)
        out = fastgpt.linear(x, w, b, "relu", r, backend=backend)
        assert out.shape == (*m_shape, 12)
        check_linear(backend, device, x, w, b, r, dy, "relu", f"{backend}-{m_shape}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_transposed_and_strided_operands(backend, device):
    dtype = base_dtype(backend, device)
    x, w, b, r, dy = make_inputs((31,), 24, 18, "gelu_tanh", dtype, device)
    xt = x.t().contiguous().t()  # column-major x
    wt = w.t().contiguous().t()  # column-major weight
    r_strided = torch.cat([r, r], dim=1)[:, ::2]  # a residual with column stride 2
    x_sliced = torch.cat([x, x], dim=1)[:, :18]  # row stride 36
    for xs, ws, rs in ((xt, w, r), (x, wt, r), (x_sliced, wt, r_strided)):
        check_linear(backend, device, xs, ws, b, rs, dy, "gelu_tanh", f"{backend}-strided")


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_mixed_precision_parameters(backend, device):
    """fp32 master weights and bias beside 16-bit activations: the output in x's dtype,
    gradients in each parameter's dtype."""
    dtype = kernel_dtypes(backend, device)[-1]
    x, w, b, r, dy = make_inputs((9,), 16, 24, "silu", dtype, device)
    w32, b32 = (t.float().requires_grad_() for t in (w, b))
    xg = x.detach().requires_grad_()
    out = fastgpt.linear(xg, w32, b32, "silu", r, backend=backend)
    assert out.dtype == dtype
    out.backward(dy)
    assert w32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32
    assert xg.grad.dtype == dtype
    # Eager PyTorch at x's dtype: the parameters cast to it (F.linear takes one dtype).
    want = grads_of(lambda x_, w_, b_: _eager_linear(x_, w_.to(dtype), b_.to(dtype), "silu", r),
                    (x, w32, b32), dy)
    ref = grads_of(lambda x_, w_, b_: _eager_linear(x_, w_, b_, "silu", r.double()),
                   (x.double(), w32.double(), b32.double()), dy.double())
    assert_close_rule(f"{backend}-mixed", (out.detach().cpu(), xg.grad.cpu(), w32.grad.cpu(),
                                           b32.grad.cpu()),
                      tuple(t.cpu() for t in want), tuple(t.cpu() for t in ref),
                      atol=CHECK_TOLERANCE[dtype])


def test_float64_gradcheck_native():
    g = torch.Generator().manual_seed(0)
    for activation in ACTIVATIONS:
        rows = 8 if activation in GATED else 4
        x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(rows, 5, dtype=torch.float64, generator=g, requires_grad=True)
        b = torch.randn(rows, dtype=torch.float64, generator=g, requires_grad=True)
        r = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda *t: fastgpt.linear(t[0], t[1], t[2], activation, t[3], backend="native"),
            (x, w, b, r)), activation


@pytest.mark.parametrize("activation", [None, "gelu_tanh", "swiglu"])
def test_triton_persistent_gemm(activation):
    """The persistent kernel (one program per SM walking the tiles; chosen automatically only for
    outputs over a wave of tiles on a GPU) against float64, forced here over several tiles per
    program."""
    from fastgpt.kernels import linear as kernels

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.float16
    x, w, b, r, _ = make_inputs((70,), 45, 37, activation, dtype, device)
    act = activation or "none"
    got = kernels.gemm(x, w.t(), act, bias=b, residual=r, persistent=True)[0]
    want = _eager_linear(x, w, b, activation, r)
    ref = _eager_linear(*(t.double() for t in (x, w, b)), activation, r.double())
    assert_close_rule(f"persistent-{act}", got.cpu(), want.cpu(), ref.cpu(),
                      atol=CHECK_TOLERANCE[dtype])


# The TMA path runs under the interpreter too (triton 3.9's interpreter takes host-side
# TensorDescriptor arguments and loads their tiles with zero fill past the matrix), so it is
# forced there and checked like the pointer path; on a GPU it is compiled for real. Sizes:
# M and N odd (the descriptors' zero fill and the masked store cover the tails), K crossing
# block tails but keeping 16-byte rows (a multiple of 4 fp32 or 8 fp16 elements); a row-major
# b ("kn") keeps 16-byte rows of Nb, and gated, an up tile starting on 16 bytes (N too).
TMA_CASES = [
    pytest.param(layout, dtype, activation, persistent,
                 id=f"{layout}-{str(dtype)[6:]}-{activation}{'-persistent' if persistent else ''}")
    for layout, dtype, activation, persistent in (
        ("nk", torch.float16, None, False), ("nk", torch.float32, "gelu_tanh", False),
        ("nk", torch.float16, "swiglu", False), ("nk", torch.float32, "geglu", True),
        ("nk", torch.float16, "silu", True), ("kn", torch.float16, None, False),
        ("kn", torch.float32, "swiglu", False), ("kn", torch.float16, "relu", True))
]


@pytest.mark.parametrize("layout,dtype,activation,persistent", TMA_CASES)
def test_triton_tma_gemm(layout, dtype, activation, persistent):
    """The TMA descriptor path, forced (chosen automatically only on a GPU of compute
    capability >= 9.0), with bias, residual and the saved pre-activation, against float64; b
    as fastgpt.linear passes it (weight^T, "nk") and row-major ("kn", torch.matmul's b)."""
    from fastgpt.kernels import linear as kernels

    if HAS_CUDA and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs compute capability 9.0")
    device = "cuda" if HAS_CUDA else "cpu"
    n, k = (45, 40) if layout == "nk" else (24, 40)
    x, w, b, r, _ = make_inputs((37,), n, k, activation, dtype, device)
    weight_t = w.t() if layout == "nk" else w.t().contiguous()
    act = activation or "none"
    got = kernels.gemm(x, weight_t, act, bias=b, residual=r, save_pre=activation is not None,
                       persistent=persistent, tma=True)
    z = F.linear(x, w, b)
    want = (_eager_linear(x, w, b, activation, r), z if activation else None)
    ref_z = F.linear(*(t.double() for t in (x, w, b)))
    ref = (_eager_linear(*(t.double() for t in (x, w, b)), activation, r.double()),
           ref_z if activation else None)
    assert_close_rule(f"tma-{layout}-{act}", tuple(t.cpu() if t is not None else None for t in got),
                      tuple(t.cpu() if t is not None else None for t in want),
                      tuple(t.cpu() if t is not None else None for t in ref),
                      atol=CHECK_TOLERANCE[dtype])


def _tma_layout_of(a, b, gated=False, capability=(9, 0)):
    """kernels.linear._tma_layout for tensors a (M, K) and b (K, Nb)."""
    from fastgpt.kernels import linear as kernels

    n = b.shape[1] // 2 if gated else b.shape[1]
    return kernels._tma_layout(capability, a.element_size(), a.data_ptr(), a.stride(),
                               b.data_ptr(), b.stride(), n, gated)


def test_triton_tma_choice():
    """TMA where the device, the installed triton and the operands allow it; the pointer path for
    every layout a descriptor cannot describe."""
    from fastgpt.kernels import linear as kernels

    x, w = torch.randn(33, 64, dtype=torch.float16), torch.randn(48, 64, dtype=torch.float16)
    assert _tma_layout_of(x, w.t()) == "nk"  # nn.Linear: b = weight^T
    assert _tma_layout_of(x, w.t().contiguous()) == "kn"  # row-major b
    assert _tma_layout_of(x, w.t(), gated=True) == "nk"
    assert _tma_layout_of(x, w.t(), capability=(10, 0)) == "nk"  # and after Hopper
    # Before Hopper, and off CUDA: no TMA.
    assert _tma_layout_of(x, w.t(), capability=(8, 9)) is None
    assert _tma_layout_of(x, w.t(), capability=None) is None
    # Rows off 16 bytes: K = 60 fp16 elements is 120 bytes (fp32: 240, aligned).
    x60, w60 = x[:, :60], w[:, :60]
    assert _tma_layout_of(x60.contiguous(), w.t()[:60]) is None  # a's rows
    assert _tma_layout_of(x, w60.contiguous().t()) is None  # weight rows of 120 bytes
    assert _tma_layout_of(x60.float().contiguous(), w60.float().contiguous().t()) == "nk"
    # A base address off 16 bytes (one element in), and no unit stride in a or in b.
    assert _tma_layout_of(x.flatten()[1:1 + 32 * 64].view(32, 64), w.t()) is None
    assert _tma_layout_of(x, w.flatten()[1:1 + 47 * 64].view(47, 64).t()) is None
    assert _tma_layout_of(x.t().contiguous().t(), w.t()) is None  # column-major a
    assert _tma_layout_of(x[:, ::2], w[:, ::2].t()) is None  # column stride 2
    assert _tma_layout_of(x, torch.randn(64, 96, dtype=torch.float16)[:, ::2]) is None
    # Row-major b, gated: the up tile starts at column N = 20 (40 bytes) in a 128-byte row.
    b_kn = torch.randn(64, 64, dtype=torch.float16)[:, :40]
    assert _tma_layout_of(x, b_kn, gated=True) is None and _tma_layout_of(x, b_kn) == "kn"
    # A triton without host-side descriptors keeps the pointer path.
    saved, kernels.TensorDescriptor = kernels.TensorDescriptor, None
    try:
        assert _tma_layout_of(x, w.t()) is None
    finally:
        kernels.TensorDescriptor = saved


def test_triton_tma_forced_needs_qualifying_operands():
    from fastgpt.kernels import linear as kernels

    x, w = torch.randn(5, 12), torch.randn(6, 12)
    with pytest.raises(AssertionError, match="do not qualify"):
        kernels.gemm(x[:, :10].contiguous(), w[:, :10].t(), tma=True)  # rows of 40 bytes
    with pytest.raises(AssertionError, match="do not qualify"):
        kernels.gemm(x.expand(2, 5, 12), w.t(), tma=True)  # batched


# --------------------------------------------------------------------------------- matmul

# torch.matmul's own shape cases: vectors, matrix-vector, batched with broadcast batch dims,
# 2-D b shared by a batch, and the kernel shapes (2-D, batched 3-D).
MATMUL_SHAPES = [((7,), (7,)), ((7,), (7, 5)), ((4, 7), (7,)), ((4, 7), (7, 5)),
                 ((3, 4, 7), (7, 5)), ((3, 4, 7), (3, 7, 5)), ((2, 1, 4, 7), (3, 7, 5)),
                 ((5, 7), (2, 3, 7, 4))]


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("shape_a,shape_b", MATMUL_SHAPES)
def test_matmul_follows_torch_matmul(backend, device, shape_a, shape_b):
    g = torch.Generator().manual_seed(len(shape_a) * 10 + len(shape_b))
    dtype = torch.float32 if backend == "triton" or device == "cpu" else torch.bfloat16
    a = torch.randn(shape_a, generator=g, dtype=torch.float64)
    b = torch.randn(shape_b, generator=g, dtype=torch.float64)
    kernel = backend if MATMUL.impls[backend or "torch"].supports(a, b) is None else None
    a_, b_ = a.to(device, dtype), b.to(device, dtype)
    fn = lambda x, y: fastgpt.matmul(x, y, backend=kernel)  # noqa: E731
    dy = torch.randn(torch.matmul(a, b).shape, generator=g, dtype=torch.float64)
    got = grads_of(fn, (a_, b_), dy.to(device, dtype))
    want = grads_of(torch.matmul, (a_, b_), dy.to(device, dtype))
    ref = grads_of(torch.matmul, (a, b), dy)
    assert_close_rule(f"matmul-{backend}", tuple(t.cpu() for t in got),
                      tuple(t.cpu() for t in want), ref, atol=CHECK_TOLERANCE[dtype])


def test_matmul_kernel_choice():
    a, b = torch.randn(4, 7), torch.randn(7, 5)
    assert choice(MATMUL, a, b) == "torch"  # on CPU torch.matmul is already ATen's GEMM
    with pytest.raises(BackendError, match="native matmul kernels run on CUDA"):
        fastgpt.matmul(a, b, backend="native")
    with pytest.raises(BackendError, match="batched operands"):
        fastgpt.matmul(torch.randn(7), b, backend="triton")


# -------------------------------------------------------------------------- behaviour


def test_automatic_choice_on_cpu():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert choice(LINEAR, x, w, None, "gelu", None, False) == "native"
    assert choice(LINEAR, x.half(), w.half(), None, "gelu", None, False) == "native"


def test_bad_input_names_the_argument():
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="weight has 7 columns"):
        fastgpt.linear(x, torch.randn(6, 7))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        fastgpt.linear(x, w, activation="tanh")
    with pytest.raises(ValueError, match="even number of rows"):
        fastgpt.linear(x, torch.randn(5, 8), activation="swiglu")
    with pytest.raises(ValueError, match="bias must have shape"):
        fastgpt.linear(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        fastgpt.linear(x, w, residual=torch.randn(3, 5))
    with pytest.raises(ValueError, match="residual must have the output's shape \\(3, 3\\)"):
        fastgpt.linear(x, w, activation="geglu", residual=torch.randn(3, 6))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        fastgpt.linear(x, torch.randn(8))
    with pytest.raises(TypeError, match="x must be floating point"):
        fastgpt.linear(x.long(), w)
    with pytest.raises(ValueError, match="inner dims 8 and 6 differ"):
        fastgpt.matmul(x, w)
    with pytest.raises(TypeError, match="b has dtype"):
        fastgpt.matmul(x, w.t().double())
    for ns in ("fastgpt", "fastgpt_triton"):  # the ops themselves check too
        with pytest.raises((RuntimeError, ValueError), match="unknown activation 'tanh'"):
            getattr(torch.ops, ns).linear(x, w, None, None, "tanh", False)


@pytest.mark.gpu
def test_device_mix_is_named():
    with pytest.raises(ValueError, match="weight is on"):
        fastgpt.linear(torch.randn(3, 8, device="cuda"), torch.randn(6, 8))


OPS = [pytest.param("fastgpt", "cpu", id="native-cpu"),
       pytest.param("fastgpt_triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
       pytest.param("fastgpt", "cuda", id="native-cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("ns,device", OPS)
@pytest.mark.parametrize("activation", ["none", "gelu", "swiglu"])
def test_opcheck(ns, device, activation):
    g = torch.Generator().manual_seed(0)
    rows = 10 if activation == "swiglu" else 5
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x, w, b, r = (torch.randn(s, generator=g).to(device, dtype).requires_grad_()
                  for s in ((6, 8), (rows, 8), (rows,), (6, 5)))
    ops = getattr(torch.ops, ns)
    torch.library.opcheck(ops.linear, (x, w, b, r, activation, True))
    if ns == "fastgpt_triton" or device == "cuda":  # native matmul is CUDA only
        torch.library.opcheck(ops.matmul, (x, w.t().detach().requires_grad_()))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_compile_fullgraph(backend, device):
    dtype = base_dtype(backend, device)
    x, w, b, r, dy = make_inputs((4, 6), 16, 24, "swiglu", dtype, device)

    def f(x_, w_, b_, r_):
        return fastgpt.linear(x_, w_, b_, "swiglu", r_, backend=backend)

    want = grads_of(f, (x, w, b, r), dy)
    got = grads_of(torch.compile(f, fullgraph=True), (x, w, b, r), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_autocast_gives_what_f_linear_gives(backend, device):
    x, w, b, r, _ = make_inputs((5,), 12, 16, None, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        want = F.linear(x, w, b) + r
        got = fastgpt.linear(x, w, b, None, r, backend=backend if device == "cuda" or
                             backend != "triton" else "native")
    assert got.dtype == want.dtype  # bf16 linear + fp32 residual: promoted, as eager
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------- fastgpt.nn.Linear


def test_nn_linear_is_torch_linear_compatible():
    torch.manual_seed(0)
    theirs = torch.nn.Linear(16, 8)
    ours = fastgpt.nn.Linear(16, 8, activation="gelu")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), F.gelu(theirs(x)))
    r = torch.randn(3, 8)
    torch.testing.assert_close(ours(x, residual=r), F.gelu(theirs(x)) + r)
    assert isinstance(ours, torch.nn.Linear) and ours.out_features == 8


def test_nn_linear_gated_holds_gate_then_up():
    torch.manual_seed(0)
    gate, up = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
    mlp = fastgpt.nn.Linear(16, 8, bias=False, activation="swiglu")
    assert mlp.weight.shape == (16, 16)
    with torch.no_grad():
        mlp.weight.copy_(torch.cat([gate.weight, up.weight]))
    x = torch.randn(5, 16)
    torch.testing.assert_close(mlp(x), F.silu(gate(x)) * up(x))
    with pytest.raises(ValueError, match="unknown activation"):
        fastgpt.nn.Linear(4, 4, activation="tanh")
