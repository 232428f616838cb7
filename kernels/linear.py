"""GEMM with a fused epilogue in Triton: y = act(a @ b + bias) + residual, and its backward.

One kernel, `_gemm_kernel`, serves fastgpt.linear (a = x, b = weight^T, read through strides:
nothing is transposed in memory) and fastgpt.matmul (2-D and batched 3-D). A BLOCK_M x BLOCK_N
tile of the output is computed by walking K in steps of BLOCK_K with an fp32 accumulator; the
epilogue runs on that accumulator in registers before the one store:

    z = acc + bias                 (bias per output column; float32 or the input dtype)
    pre = z                        (stored only when the backward needs it)
    y = act(z)                     gated (swiglu/geglu): act(g) * u, g and u two accumulators
    y = y + residual
    store y in the input dtype

Gated activations read b as 2N columns: columns [0, N) are the gate, [N, 2N) the up
projection, so for nn.Linear's layout the weight is (2N, K) with the gate rows first (the
concatenation [gate_proj; up_proj] of a Llama MLP). A program computes the gate and up tiles of
the same output columns, so the activation never leaves registers.

Launch forms, constexprs of the one kernel (one argument list; `_gemm_tile` is the tile code
they share):
- PERSISTENT: one program per SM walks the tiles in steps of the program count (chosen when the
  output is more than a wave of tiles); else one program per output tile.
- TMA: A and B tiles come through Hopper's tensor memory accelerator (descriptors built by the
  launcher; the comment at the TensorDescriptor import says why host-side) instead of masked
  pointer loads; chosen on devices of compute capability >= 9.0 when this triton has
  descriptors, the dot runs on tensor cores (16-bit or tf32) and the operands qualify
  (`_tma_layout`: unit last stride, 16-byte aligned base and rows). b is described as
  b^T, (Nb, K) rows, when its K stride is 1 (nn.Linear's weight: the forward), or as itself,
  (K, Nb) rows, when its column stride is 1 (row-major b: torch.matmul, the backward's dx).
  Only the K loop differs (`_dot_descriptors` vs `_dot_pointers`); the epilogue and its masked
  stores are the same code (`_epilogue`). Batched launches (batch > 1) keep the pointer path.

Tile order: programs are numbered along groups of GROUP_M tile rows (Triton tutorial 03's
"grouped ordering"): consecutive programs share the same few A row blocks and sweep B's column
blocks, so both stay in L2 while they are reused.

Precision: fp32 accumulation always. fp16/bf16 inputs use tensor-core dots. fp32 inputs use tf32
tensor cores only when torch.backends.cuda.matmul.allow_tf32 allows it (as torch.matmul does),
else exact fp32 products ("ieee").

Backward (fastgpt/linear.py's autograd): `_act_bwd_kernel` turns dy and the saved pre-activation
into dz = dy * act'(pre) (gated: dg = dy * u * act'(g), du = dy * act(g)) and per-program
column partial sums for dbias in one pass; then dx = dz @ W and dW = dz^T @ x are two more calls
of `_gemm_kernel` with no epilogue (dW's a = dz^T has a unit row stride, not a unit K stride: the
pointer path). The pre-activation is saved, not recomputed: it costs M x N of memory (what eager
PyTorch's F.linear + activation saves too) and saves a third GEMM.
"""


import functools

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch, on_device, sm_count

# Host-side TMA descriptors (triton >= 3.3; None where this triton lacks them: the pointer path
# then serves every launch). Host-side rather than tl.make_tensor_descriptor in the kernel: a
# device-side descriptor needs a global-memory scratch allocator installed with
# triton.set_allocator, process-wide state a library must not set behind its caller's back;
# a host descriptor is built by the launcher from the tensor, costs no scratch memory, and its
# block shape is set per autotune config by a pre_hook (`_set_tma_blocks`).
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# Element types of a, b (and of y, residual, pre and every gradient).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Activation kinds, as the `ACT` constexpr of the kernels (the names fastgpt.linear takes).
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4, "swiglu": 5, "geglu": 6}
GATED = ("swiglu", "geglu")

_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (dim 0, the tiles, has none)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# Under the interpreter: one small config, no autotuning. Unequal block sizes so that tests with
# dims of a few dozen cross several tiles and tails in every direction.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                                    num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for Hopper, by (element size,
# gated). The 16-bit rows are the shapes the Triton matmul tutorial and FlashAttention-style
# GEMMs use on H100 (128 x 256 x 64 with 8 warps, 128 x 128 x 64 with 4-8 warps), plus small
# tiles for decode-sized M. Gated launches hold two accumulators: their row keeps tiles of at
# most 8192 outputs per 8 warps or 4096 per 4 warps (ptxas, sm_90a, triton 3.9: 128 x 128 with
# 8 warps spilled 72 bytes, 128 x 64 with 4 warps 56). fp32 (tf32 or exact) halves BLOCK_K for
# the same shared memory. Every row compiles for sm_90a without spills and within shared memory
# with every epilogue (tests/test_triton_sm90.py), so the autotuner only chooses between
# configs that can run at full speed. The heavier epilogues of gelu (erf) and silu take fewer
# outputs per warp (`_HEAVY_EPILOGUE_OUTPUTS_PER_WARP`).
_CONFIG_TABLE = {
    (2, False): ((128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
                 (128, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
                 (64, 64, 64, 8, 4, 4), (16, 128, 128, 1, 4, 4), (16, 64, 128, 1, 4, 5)),
    (2, True): ((128, 64, 64, 8, 8, 4), (64, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4),
                (64, 64, 64, 8, 4, 4), (16, 128, 128, 1, 4, 4), (16, 64, 128, 1, 4, 5)),
    (4, False): ((128, 128, 32, 8, 8, 3), (128, 64, 32, 8, 4, 4), (64, 64, 32, 8, 4, 4),
                 (16, 64, 64, 1, 4, 4)),
    (4, True): ((128, 64, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4), (16, 64, 64, 1, 4, 4)),
}


def _config(m, n, k, group, warps, stages, pre_hook=None):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group},
                         num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def _configs():
    """Every config of the table: what the autotuner is built with."""
    rows = _CONFIG_TABLE.values()
    return [_config(*c) for c in dict.fromkeys(c for row in rows for c in row)]


# Activations whose epilogue holds more live values per output than the others (erf's and
# exp's polynomials beside the accumulator), and the most outputs per warp their tiles keep:
# with 4096 per warp they spilled 32-112 bytes (sm_90a, triton 3.9: 16-bit 128 x 256 with 8
# warps; gelu also 256 x 128 with 8 and 128 x 128 with 4), and the persistent kernel's gelu 44-84
# at 2048 per warp, pointer and TMA paths alike.
_HEAVY_EPILOGUE = (ACTIVATIONS["gelu"], ACTIVATIONS["silu"])
_HEAVY_EPILOGUE_OUTPUTS_PER_WARP = {False: 2048, True: 1024}  # by persistent


def _configs_for(element_size, gated, persistent=False, tma=False, act="none"):
    """The configs the autotuner tries for one launch: the one place that picks tiles, warps
    and pipeline stages for the GEMM.

    The persistent kernel takes the table's row less the configs with over 2048 outputs per
    warp, whose accumulators plus the tile loop's state spill there (sm_90a, triton 3.9: 128 x
    256 with 8 warps 164 bytes, 128 x 128 with 4 warps 160, where the per-tile kernel spills
    none). TMA launches take the same configs as the pointer path (none spilled more there;
    tests/test_triton_sm90.py), each with the pre_hook that gives the descriptors its tiles.
    gelu and silu keep the tiles of at most `_HEAVY_EPILOGUE_OUTPUTS_PER_WARP`."""
    row = _CONFIG_TABLE[(2 if element_size <= 2 else 4, gated)]
    if persistent:
        row = [c for c in row if c[0] * c[1] <= 2048 * c[4]]
    if ACTIVATIONS[act] in _HEAVY_EPILOGUE:
        row = [c for c in row if c[0] * c[1] <= _HEAVY_EPILOGUE_OUTPUTS_PER_WARP[persistent] * c[4]]
    return [_config(*c, pre_hook=_set_tma_blocks if tma else None) for c in row]


def _prune(configs, named_args, **kwargs):
    act = next(name for name, value in ACTIVATIONS.items() if value == kwargs["ACT"])
    return _configs_for(named_args["C"].element_size(), kwargs["ACT"] >= ACTIVATIONS["swiglu"],
                        kwargs["PERSISTENT"], kwargs["TMA"], act)


def _set_tma_blocks(nargs):
    """A TMA config's pre_hook: the descriptors' block shapes are the config's tiles (the block
    shape is part of a descriptor's type, so each config compiles against its own)."""
    block_m, block_n, block_k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["A"].block_shape = [block_m, block_k]
    nargs["B"].block_shape = [block_n, block_k] if nargs["B_NK"] else [block_k, block_n]


def _bucket(n):
    """n rounded up to a power of 2: the autotune key, so that a new M (a decode batch, a
    sequence length) reuses the tuned config of its size class instead of re-benchmarking."""
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1, through exp (libdevice's tanh is not portable across
    # backends and the interpreter); the exponent is capped where e^t overflows float32
    # (tanh is -1 to float precision long before).
    return 2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * x, 80.0))) - 1.0


@triton.jit
def _activate(z, ACT: tl.constexpr):
    """act(z) for the non-gated kinds; for gated kinds, the gate's activation."""
    if ACT == 1 or ACT == 6:  # gelu (erf), and geglu's gate
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:  # gelu_tanh
        return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 3:  # relu
        return tl.maximum(z, 0.0)
    elif ACT == 4 or ACT == 5:  # silu, and swiglu's gate (exponent capped as in _tanh)
        return z / (1.0 + tl.exp(tl.minimum(-z, 80.0)))
    else:
        return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, matching `_activate`; relu'(0) = 0 as torch gives."""
    if ACT == 1 or ACT == 6:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    elif ACT == 3:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 4 or ACT == 5:
        s = 1.0 / (1.0 + tl.exp(tl.minimum(-z, 80.0)))
        return s * (1.0 + z * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid` in grouped ordering: programs walk GROUP_M tile
    rows column by column, so a group's A rows and the current B columns are reused from L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows
    tile_n = (pid % per_group) // rows
    return tile_m, tile_n


@triton.jit
def _dot_pointers(
    A, B, M, N, K, stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
    tile_m, tile_n, batch, GATED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The K loop of one tile through pointers and masks: (acc, acc_up), fp32 accumulators of
    the output (gated: the gate) and, gated, of the up projection."""
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = (A + batch * stride_ab + rows[:, None].to(tl.int64) * stride_am
              + ks[None, :] * stride_ak)
    b_ptrs = (B + batch * stride_bb + ks[:, None].to(tl.int64) * stride_bk
              + cols[None, :].to(tl.int64) * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :],
                           other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, acc_up


@triton.jit
def _dot_descriptors(
    A, B, N, K, tile_m, tile_n, GATED: tl.constexpr, B_NK: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The K loop of one tile through TMA descriptors, as `_dot_pointers` returns it. TMA fills
    what lies outside a described matrix with zeros, so no masks: rows past M and columns past
    N are never stored, K past K adds 0 * 0. A gate tile whose columns cross N reads the first up
    columns there; the store drops them too."""
    off_m = tile_m * BLOCK_M
    off_n = tile_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = A.load([off_m, k0])
        # B_NK: B describes b^T, (Nb, K) rows (nn.Linear's weight), tiles (BLOCK_N, BLOCK_K).
        b = B.load([off_n, k0]).T if B_NK else B.load([k0, off_n])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = B.load([N + off_n, k0]).T if B_NK else B.load([k0, N + off_n])
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _epilogue(
    acc, acc_up, C, Bias, Res, Pre, M, N, stride_cb, stride_cm, stride_rm, stride_pb, stride_pm,
    tile_m, tile_n, batch, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Bias, the saved pre-activation, the activation and the residual on the accumulators in
    registers, then the one masked store of the tile."""
    GATED: tl.constexpr = ACT >= 5
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(Bias + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Round the pre-activation to the stored dtype first when it is saved, so that the forward
    # and the backward see the same values.
    z = acc.to(C.dtype.element_ty).to(tl.float32) if SAVE_PRE else acc
    if SAVE_PRE:
        pre_ptrs = Pre + batch * stride_pb + rows[:, None].to(tl.int64) * stride_pm + cols[None, :]
        tl.store(pre_ptrs, z.to(Pre.dtype.element_ty), mask=mask)
    y = _activate(z, ACT)
    if GATED:
        u = acc_up.to(C.dtype.element_ty).to(tl.float32) if SAVE_PRE else acc_up
        if SAVE_PRE:
            tl.store(pre_ptrs + N, u.to(Pre.dtype.element_ty), mask=mask)
        y = y * u
    if HAS_RES:
        res_ptrs = Res + rows[:, None].to(tl.int64) * stride_rm + cols[None, :]
        y += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    c_ptrs = C + batch * stride_cb + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_tile(
    A, B, C, Bias, Res, Pre, M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_cb, stride_cm,
    stride_rm, stride_pb, stride_pm,
    tile_m, tile_n, batch,    # the output tile and the batch (int64) this call computes
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr,
    TMA: tl.constexpr, B_NK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One output tile: the K loop into fp32 accumulators, then the epilogue and the store."""
    if TMA:
        acc, acc_up = _dot_descriptors(A, B, N, K, tile_m, tile_n, ACT >= 5, B_NK, PRECISION,
                                       BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc, acc_up = _dot_pointers(A, B, M, N, K, stride_ab, stride_am, stride_ak, stride_bb,
                                    stride_bk, stride_bn, tile_m, tile_n, batch, ACT >= 5,
                                    PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    _epilogue(acc, acc_up, C, Bias, Res, Pre, M, N, stride_cb, stride_cm, stride_rm, stride_pb,
              stride_pm, tile_m, tile_n, batch, ACT, HAS_BIAS, HAS_RES, SAVE_PRE, BLOCK_M,
              BLOCK_N)


# The autotune key: M's size class, the sizes, and the constexprs that change the configs
# (ACT, PERSISTENT, TMA) or how tiles are loaded (B_NK).
_GEMM_KEY = ["M_BUCKET", "N", "K", "ACT", "PERSISTENT", "TMA", "B_NK"]


@triton.autotune(configs=_configs(), key=_GEMM_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm_kernel(
    A, B, C,                  # a (batch, M, K), b (batch, K, N or 2N gated), c (batch, M, N);
                              # TMA: A and B are descriptors of a[0] and b[0] (or b[0]^T)
    Bias, Res, Pre,           # bias (N or 2N,), residual (M, N), pre (batch, M, N or 2N) or dummies
    M, N, K,
    M_BUCKET,                 # M rounded up to a power of 2 (the autotune key)
    stride_ab, stride_am, stride_ak,    # a and b: the pointer path only
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm,     # c and pre: unit column stride
    stride_rm,                # residual rows (unit column stride)
    stride_pb, stride_pm,
    ACT: tl.constexpr,        # ACTIVATIONS value
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PERSISTENT: tl.constexpr,  # programs walk the tiles (grid: programs, batch); else one
                               # program per tile (grid: tiles, batch)
    TMA: tl.constexpr,        # A and B are TMA descriptors (one batch), else pointers
    B_NK: tl.constexpr,       # TMA: B describes b^T, (Nb, K) rows; else b, (K, Nb) rows
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs ("ieee" or "tf32")
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    batch = tl.program_id(1).to(tl.int64)
    if PERSISTENT:
        # As many programs as SMs, each walking the tiles pid, pid + programs, ... in grouped
        # order, so the GPU holds one wave that never drains into a half-empty tail, and a
        # program's next tile reuses what its group left in L2.
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
            tile_m, tile_n = _tile_of(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _gemm_tile(A, B, C, Bias, Res, Pre, M, N, K, stride_ab, stride_am, stride_ak,
                       stride_bb, stride_bk, stride_bn, stride_cb, stride_cm, stride_rm,
                       stride_pb, stride_pm, tile_m, tile_n, batch, ACT, HAS_BIAS, HAS_RES,
                       SAVE_PRE, TMA, B_NK, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        tile_m, tile_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _gemm_tile(A, B, C, Bias, Res, Pre, M, N, K, stride_ab, stride_am, stride_ak, stride_bb,
                   stride_bk, stride_bn, stride_cb, stride_cm, stride_rm, stride_pb, stride_pm,
                   tile_m, tile_n, batch, ACT, HAS_BIAS, HAS_RES, SAVE_PRE, TMA, B_NK,
                   PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _act_bwd_kernel(
    DY, Pre, DZ, Partial,     # dy (M, N), pre (M, N or 2N), dz like pre, partial (programs, N or 2N)
    M, N,
    stride_dym,               # dy rows (unit column stride); pre, dz contiguous
    ROWS_PER_PROGRAM,         # rows each program walks (its dbias partial covers them)
    ACT: tl.constexpr,
    HAS_DZ: tl.constexpr,     # False: act is none, dz is dy (only dbias is computed)
    NEED_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    GATED: tl.constexpr = ACT >= 5
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    nz = 2 * N if GATED else N
    sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid_m * ROWS_PER_PROGRAM
    for r0 in range(first, min(first + ROWS_PER_PROGRAM, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < min(first + ROWS_PER_PROGRAM, M))[:, None] & col_ok[None, :]
        dy = tl.load(DY + rows[:, None].to(tl.int64) * stride_dym + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        if HAS_DZ:
            at = rows[:, None].to(tl.int64) * nz + cols[None, :]
            g = tl.load(Pre + at, mask=mask, other=0.0).to(tl.float32)
            if GATED:
                u = tl.load(Pre + at + N, mask=mask, other=0.0).to(tl.float32)
                dg = dy * u * _activate_grad(g, ACT)
                du = dy * _activate(g, ACT)
                tl.store(DZ + at, dg.to(DZ.dtype.element_ty), mask=mask)
                tl.store(DZ + at + N, du.to(DZ.dtype.element_ty), mask=mask)
                sum_g += tl.sum(dg.to(DZ.dtype.element_ty).to(tl.float32), axis=0)
                sum_u += tl.sum(du.to(DZ.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dg = dy * _activate_grad(g, ACT)
                tl.store(DZ + at, dg.to(DZ.dtype.element_ty), mask=mask)
                sum_g += tl.sum(dg.to(DZ.dtype.element_ty).to(tl.float32), axis=0)
        else:
            sum_g += tl.sum(dy, axis=0)
    if NEED_DBIAS:
        tl.store(Partial + pid_m * nz + cols, sum_g, mask=col_ok)
        if GATED:
            tl.store(Partial + pid_m * nz + N + cols, sum_u, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _precision(a):
    if a.dtype != torch.float32 or interpreting():
        return "ieee" if a.dtype == torch.float32 else "tf32"  # 16-bit: the argument is unused
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Programs of the persistent kernel off a GPU (the interpreter): a few, so that each walks
# several tiles.
_INTERPRETER_PROGRAMS = 3


def _persistent_programs(device, tiles_128):
    """Programs of a persistent launch on `device`, or None for the one-program-per-tile kernel.
    Persistent when the output holds more 128 x 128 tiles than the GPU has SMs (more than one
    wave, where a tail of half-empty waves can cost); by design, not measured yet."""
    if device.type != "cuda":
        return None
    programs = sm_count(device.index)
    return programs if tiles_128 > programs else None


# TMA's alignment, in bytes, of a described matrix's base address and row stride.
_TMA_ALIGN = 16


def _tma_layout(capability, element_size, a_ptr, a_strides, b_ptr, b_strides, n, gated):
    """How a TMA launch describes b, or None where the operands keep the pointer path.

    Args:
        capability: (major, minor) of the CUDA device, or None off CUDA.
        element_size: bytes per element of a and b.
        a_ptr, a_strides: a's address and (M, K) strides; b_ptr, b_strides: b's address and
            (K, Nb) strides.
        n: output columns (N), gated: b holds 2N columns (the up tile starts at column N).

    Returns:
        "nk": b^T is described, (Nb, K) with unit K stride: nn.Linear's weight for b = weight^T,
        the forward's layout. "kn": b itself, (K, Nb) with unit column stride: torch.matmul's
        row-major b and the backward's dx = dz @ weight. None: no TMA (before Hopper, without
        host descriptors in this triton, or a layout TMA cannot describe: a unit stride missing,
        a base address or row stride off 16 bytes).
    """
    if TensorDescriptor is None or capability is None or tuple(capability) < (9, 0):
        return None

    def aligned(elements):
        return elements * element_size % _TMA_ALIGN == 0

    if a_ptr % _TMA_ALIGN or b_ptr % _TMA_ALIGN or a_strides[1] != 1 or not aligned(a_strides[0]):
        return None
    stride_bk, stride_bn = b_strides
    if stride_bk == 1 and aligned(stride_bn):
        return "nk"
    # A column offset of a descriptor tile must be 16-byte aligned too (the up tile's is N).
    if stride_bn == 1 and aligned(stride_bk) and (not gated or aligned(n)):
        return "kn"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device_index):
    return torch.cuda.get_device_capability(device_index)


def gemm(a, b, act="none", bias=None, residual=None, save_pre=False, persistent=None, tma=None):
    """y = act(a @ b + bias) + residual, and the pre-activation when `save_pre`.

    Args:
        a: (M, K) or (batch, M, K); any strides.
        b: (K, Nb) or (batch, K, Nb), a's dtype and device, any strides; Nb = N, or 2N for a
            gated `act` (columns [0, N) the gate, [N, 2N) the up projection). A 2-D b with a
            3-D a is shared by every batch.
        act: a key of ACTIVATIONS.
        bias: None or (Nb,) contiguous, a's dtype or float32.
        residual: None or (M, N) with unit column stride, a's dtype (2-D a only).
        save_pre: also return z = a @ b + bias, (..., M, Nb), contiguous, a's dtype (for the
            backward; only meaningful with an activation).
        persistent: None (the automatic choice, `_persistent_programs`), or True / False to
            force the persistent kernel or the one-program-per-tile one.
        tma: None (the automatic choice: TMA descriptors on a GPU of compute capability 9.0 or
            newer where `_tma_layout` accepts the operands and there is one batch), True to
            force them (asserting that the operands qualify; also under the interpreter), or
            False for the pointer path.

    Returns:
        (y, pre): y (..., M, N) contiguous in a's dtype; pre as above, or None.
    """
    assert act in ACTIVATIONS, act
    assert a.dtype in DTYPES and b.dtype == a.dtype, (a.dtype, b.dtype)
    batched = a.dim() == 3
    a3 = a if batched else a.unsqueeze(0)
    b3 = b if b.dim() == 3 else b.unsqueeze(0)
    batch, M, K = a3.shape
    nb = b3.shape[2]
    assert b3.shape[1] == K and b3.shape[0] in (1, batch), (tuple(a.shape), tuple(b.shape))
    N = nb // 2 if act in GATED else nb
    assert act not in GATED or nb == 2 * N, nb
    y = torch.empty((batch, M, N), device=a.device, dtype=a.dtype)
    pre = torch.empty((batch, M, nb), device=a.device, dtype=a.dtype) if save_pre else None
    if bias is not None:
        assert bias.shape == (nb,) and bias.is_contiguous() and bias.dtype in (a.dtype, torch.float32)
    if residual is not None:
        assert not batched and residual.shape == (M, N) and residual.dtype == a.dtype
        assert residual.stride(1) == 1 or N == 1
    if y.numel() == 0:
        return (y if batched else y[0]), (pre if batched or pre is None else pre[0])
    assert batch <= _MAX_GRID_YZ, batch
    b_batch_stride = b3.stride(0) if b3.shape[0] == batch and batch > 1 else 0
    dummy = y  # never read: HAS_BIAS / HAS_RES / SAVE_PRE are False

    def tiles(meta):
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])

    if persistent is None:
        programs = _persistent_programs(a.device, triton.cdiv(M, 128) * triton.cdiv(N, 128))
    elif persistent:
        programs = sm_count(a.device.index) if a.device.type == "cuda" else _INTERPRETER_PROGRAMS
    else:
        programs = None

    # TMA: one batch (batched operands keep the pointer path: a 2-D descriptor per batch would
    # not fit one launch), K > 0 (a descriptor's dims are positive). The automatic choice also
    # leaves exact fp32 products (FMA dots, no tensor cores to feed) on the pointer path: with
    # TMA tiles they spilled 104-2148 bytes (sm_90a, triton 3.9), with pointer loads none.
    precision = _precision(a)
    layout = None
    exact_fp32 = a.dtype == torch.float32 and precision == "ieee"
    if tma or (tma is None and not exact_fp32 and a.device.type == "cuda"):
        if batch == 1 and K > 0:
            capability = (9, 0) if tma else _capability(a.device.index)
            layout = _tma_layout(capability, a.element_size(), a3.data_ptr(), a3.stride()[1:],
                                 b3.data_ptr(), b3.stride()[1:], N, act in GATED)
    assert not tma or layout is not None, (
        f"tma=True: the operands do not qualify (a strides {tuple(a.stride())}, b strides "
        f"{tuple(b.stride())}, batch {batch}; TMA needs one batch, unit last strides and 16-byte "
        f"aligned addresses and rows)")
    if layout is None:
        a_arg, b_arg = a3, b3
    else:
        # Placeholder block shapes: each config's pre_hook sets its own (`_set_tma_blocks`).
        a_arg = TensorDescriptor(a3[0], [M, K], [a3.stride(1), 1], [1, 1])
        b2 = b3[0].t() if layout == "nk" else b3[0]
        b_arg = TensorDescriptor(b2, list(b2.shape), [b2.stride(0), 1], [1, 1])

    def grid(meta):
        return (tiles(meta) if programs is None else min(programs, tiles(meta)), batch)

    args = (a_arg, b_arg, y, bias if bias is not None else dummy,
            residual if residual is not None else dummy, pre if save_pre else dummy,
            M, N, K, _bucket(M),
            a3.stride(0), a3.stride(1), a3.stride(2),
            b_batch_stride, b3.stride(1), b3.stride(2),
            y.stride(0), y.stride(1),
            residual.stride(0) if residual is not None else 0,
            pre.stride(0) if save_pre else 0, pre.stride(1) if save_pre else 0)
    meta = dict(ACT=ACTIVATIONS[act], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                SAVE_PRE=save_pre, PERSISTENT=programs is not None, TMA=layout is not None,
                B_NK=layout == "nk", PRECISION=precision)
    if layout is not None and interpreting():
        # The interpreter launches its one config without the autotuner's pre_hooks.
        _set_tma_blocks(dict(A=a_arg, B=b_arg, B_NK=meta["B_NK"], **_INTERPRETER_CONFIG.kwargs))
    with on_device(a):
        launch(_gemm_kernel, grid, *args, interpreter_config=_INTERPRETER_CONFIG, **meta)
    if not batched:
        return y[0], (pre[0] if save_pre else None)
    return y, pre


# Rows each act-backward program walks, and its tile: enough rows that the dbias partials
# (programs x 2N floats) stay a small fraction of dz's bytes.
_ACT_BWD_ROWS = 256
_ACT_BWD_BLOCK = (32, 128)


def act_backward(dy, pre, act, need_dbias):
    """dz = dy * act'(pre) (gated: [dg | du]) and, if `need_dbias`, dbias = dz.sum(0) in
    float32 (per-program partials summed in a fixed order: deterministic).

    Args:
        dy: (M, N), unit column stride. pre: (M, Nz) contiguous (the forward's saved z), or None
            for act "none" (then dz is dy itself and only dbias is computed).
    Returns:
        (dz, dbias or None).
    """
    M, N = dy.shape
    assert dy.stride(1) == 1 or N == 1
    gated = act in GATED
    nz = 2 * N if gated else N
    has_dz = act != "none"
    if has_dz:
        assert pre is not None and pre.shape == (M, nz) and pre.is_contiguous() and pre.dtype == dy.dtype
        dz = torch.empty_like(pre)
    else:
        dz = dy
    if not need_dbias and not has_dz:
        return dz, None
    programs = max(triton.cdiv(M, _ACT_BWD_ROWS), 1)
    partial = torch.empty((programs, nz), device=dy.device, dtype=torch.float32)
    block_m, block_n = _ACT_BWD_BLOCK
    if M > 0:
        with on_device(dy):
            _act_bwd_kernel[(programs, triton.cdiv(N, block_n))](
                dy, pre if has_dz else dy, dz, partial, M, N, dy.stride(0), _ACT_BWD_ROWS,
                ACT=ACTIVATIONS[act], HAS_DZ=has_dz, NEED_DBIAS=need_dbias,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    else:
        partial.zero_()
    return dz, (partial.sum(0) if need_dbias else None)
