"""LayerNorm and RMSNorm in Triton: forward (optionally fused with a residual add) and backward.

One kernel family serves both norms. RMSNorm is LayerNorm without centring and without bias, so
every kernel takes `RMS: tl.constexpr` and compiles the mean out when it is set:

    LayerNorm: xhat = (h - mean(h)) * rstd,  rstd = 1 / sqrt(mean((h - mean(h))^2) + eps)
    RMSNorm:   xhat = h * rstd,              rstd = 1 / sqrt(mean(h^2) + eps)
    y = xhat * weight (+ bias),              h = x, or x + residual rounded to x's dtype

Backward, per row, with g = dy * weight:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))    (RMSNorm: no mean(g) term)  (+ dh)
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy

Statistics and all arithmetic are in fp32 (fp64 for fp64 input); every kernel reads that
"stats dtype" off its Rstd pointer, so it is a compile-time constant there.

Two layouts of the work, chosen by `_launch_config`:
  * row in registers (rows up to 32 KiB forward, 8192 elements backward): a program loads a
    whole row once and does the reduction and the elementwise work on it in registers: one read
    of each input and one write of each output.
  * looped (larger N): a row would spill, so it is walked in chunks of BLOCK_N. The forward makes
    two passes over the row in one program (statistics, then normalise; the second pass mostly
    hits L2). The backward first computes the two per-row means with `_norm_bwd_row_terms_kernel`
    and then runs the same main kernel as the register layout with one program per
    (row block, column chunk), which reads those means instead of reducing the row itself.

dweight/dbias are reduced without atomics (so they are deterministic): the backward launches a
fixed number of programs (one resident wave), each walks a contiguous block of rows, keeps its
partial sums in registers and writes one row of a (programs, N) buffer. That buffer has a few
hundred rows against the M rows of each input, so torch's `.sum(0)` over it (deterministic, one
small launch) is cheap next to the kernel, and a hand-written reduction kernel would buy nothing.
"""

import torch
import triton
import triton.language as tl

from .utils import check_rows, check_vector, on_device, sm_count, warps_for

# Element types of x (and of everything shaped like it). weight and bias may have any floating
# dtype: the kernels load them and convert to the statistics dtype.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Largest hidden size the op promises and tests (the looped layout has no limit of its own).
MAX_HIDDEN = 65536

# Register budget, from ptxas on sm_90 (triton 3.9, hidden size a multiple of 16): a program
# has at most 16 warps here, i.e. 128 registers per thread at full use of the register file.
#   forward:  48-80 registers up to 32 elements per thread (16384 bf16 at 16 warps), no spills.
#   backward: it keeps dweight/dbias sums and dy, g, xhat, weight live per element:
#             ~100-128 registers at 16 elements per thread (8192 at 16 warps), with at most
#             16 bytes of spill stores (fp32 at 8192, fp64 looped), and 200-330 bytes of
#             spills at 32 (16384 bf16).
# tests/test_triton_sm90.py compiles every launch variant for sm_90a and holds these limits.
# So a row stays in registers up to 32 KiB of input in the forward (16384 fp16/bf16, 8192
# fp32, 4096 fp64 elements) and up to 8192 elements in the backward; longer rows are looped.
_MAX_ROW_BYTES = 32 * 1024
_MAX_BWD_ROW = 8192

# Backward programs are sized to what is resident at once: at ~100-128 registers per thread
# (above) an SM's 65536 registers hold about 16 warps. One wave of programs, each streaming a
# contiguous block of rows, also keeps the partial-sum buffer (programs x N) small.
_BWD_WARPS_PER_SM = 16

# Programs for the backward under the CPU interpreter: a few, so that row blocks of uneven
# length are exercised, but the interpreter (which runs programs one after another) stays fast.
_BWD_PROGRAMS_INTERPRETER = 4


# ----------------------------------------------------------------------------------------------
# Shared device code (inlined into the kernels below)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_src(
    X,  # pointer to the input row (already offset to the row)
    R,  # pointer to the residual row (already offset), or None
    cols,  # (BLOCK_N,) column indices
    mask,  # (BLOCK_N,) cols < N
    HAS_RESIDUAL: tl.constexpr,
    ACC: tl.constexpr,  # stats dtype
):
    """The row chunk to normalise, in the stats dtype: x, or x + residual rounded to x's dtype
    (the rounded h is both what the forward returns and what it normalises). Padding reads 0."""
    h = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        r = tl.load(R + cols, mask=mask, other=0.0).to(ACC)
        h = (h + r).to(X.dtype.element_ty).to(ACC)
    return h


@triton.jit
def _chunk_moments(
    h,  # (BLOCK_N,) values in the stats dtype, 0 where masked
    mask,  # (BLOCK_N,) valid entries
    count,  # number of valid entries
    RMS: tl.constexpr,
):
    """(mean, M2) of the valid entries, M2 = sum((h - mean)^2). The squares are taken about the
    chunk's own mean (two passes over registers), not as sum(h^2) - count * mean^2, which cancels
    catastrophically when |mean| >> std. RMSNorm: mean = 0, M2 = sum(h^2)."""
    if RMS:
        mean = 0.0
        centred = h
    else:
        mean = tl.sum(h, axis=0) / count
        centred = tl.where(mask, h - mean, 0.0)  # padding would otherwise add mean^2 per lane
    return mean, tl.sum(centred * centred, axis=0)


@triton.jit
def _rstd(m2, N, eps):
    """1 / sqrt(M2 / N + eps) in m2's dtype. eps is fp64 when compiled (see the kernels'
    annotation) so that fp64 norms use it unrounded; the sum is rounded back before the sqrt."""
    var = m2 / N
    return 1.0 / tl.sqrt((var + eps).to(var.dtype))


@triton.jit
def _xhat(h, mean, rstd, RMS: tl.constexpr):
    """Normalised values: (h - mean) * rstd, or h * rstd for RMSNorm."""
    if RMS:
        return h * rstd
    else:
        return (h - mean) * rstd


@triton.jit
def _fwd_store_chunk(
    h,  # (BLOCK_N,) the chunk being normalised, in the stats dtype
    mean,  # row mean (ignored for RMSNorm)
    rstd,  # row 1/std
    W,  # pointer to weight (N,), or None
    B,  # pointer to bias (N,), or None
    Y,  # pointer to the output row (already offset)
    H,  # pointer to the h output row (already offset), or None
    cols,  # (BLOCK_N,) column indices
    mask,  # (BLOCK_N,) cols < N
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Write y = xhat * weight + bias (and h when a residual was added) for one row chunk."""
    if HAS_RESIDUAL:
        tl.store(H + cols, h.to(H.dtype.element_ty), mask=mask)
    y = _xhat(h, mean, rstd, RMS)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(h.dtype)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(h.dtype)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load_chunk(
    DY,  # pointer to the dy row (already offset)
    Src,  # pointer to the normalised-input row (already offset)
    w,  # (BLOCK_N,) weight chunk in the stats dtype (unused without HAS_WEIGHT)
    mean,  # row mean (ignored for RMSNorm)
    rstd,  # row 1/std
    cols,  # (BLOCK_N,) column indices
    mask,  # (BLOCK_N,) cols < N
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,  # stats dtype
):
    """(dy, g = dy * weight, xhat) for one row chunk in the stats dtype, all 0 in the padding.
    xhat is zeroed there explicitly: (0 - mean) * rstd is not 0, and padding lanes feed the row
    sums and the dweight partials, so they must hold exact zeros whatever dy, mean and rstd are."""
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(ACC)
    src = tl.load(Src + cols, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, _xhat(src, mean, rstd, RMS), 0.0)
    if HAS_WEIGHT:
        g = dy * w
    else:
        g = dy
    return dy, g, xhat


@triton.jit
def _load_mean(Mean, row, RMS: tl.constexpr):
    """The saved row mean; RMSNorm saves none (its xhat ignores it)."""
    if RMS:
        return 0.0
    else:
        return tl.load(Mean + row)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    X,  # pointer to the input, (M, N), unit column stride
    R,  # pointer to the residual, (M, N), unit column stride, or None
    W,  # pointer to the weight, (N,), or None
    B,  # pointer to the bias, (N,), or None
    Y,  # pointer to the output, (M, N) contiguous, x's dtype
    H,  # pointer to the output h = x + residual, (M, N) contiguous, or None
    Mean,  # pointer to the row means, (M,) stats dtype, or None for RMSNorm
    Rstd,  # pointer to the row 1/std, (M,) stats dtype; its dtype is the compute dtype
    stride_x,  # row stride of X, in elements
    stride_r,  # row stride of R, in elements
    N,  # hidden size (columns)
    eps: tl.float64,  # added to the variance; fp64 so that fp64 norms get it unrounded
    RMS: tl.constexpr,  # RMSNorm (no mean, no bias) instead of LayerNorm
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per chunk, a power of 2
    ROW_IN_REGS: tl.constexpr,  # BLOCK_N >= N: one chunk holds the whole row
):
    """One program per row. Writes Y, H (with a residual), Mean (LayerNorm) and Rstd."""
    ACC: tl.constexpr = Rstd.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 elements
    X += row * stride_x
    if HAS_RESIDUAL:
        R += row * stride_r
        H += row * N
    Y += row * N

    if ROW_IN_REGS:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        h = _load_src(X, R, cols, mask, HAS_RESIDUAL, ACC)
        mean, m2 = _chunk_moments(h, mask, N, RMS)
        rstd = _rstd(m2, N, eps)
        _fwd_store_chunk(
            h, mean, rstd, W, B, Y, H, cols, mask, RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS
        )
    else:
        # Pass 1: statistics, merging each chunk's (count, mean, M2) into the running ones with
        # Chan et al.'s pairwise update, which is as stable as a two-pass variance.
        count = tl.zeros([], dtype=ACC)  # entries merged so far (exact: N <= 2**24)
        mean = tl.zeros([], dtype=ACC)
        m2 = tl.zeros([], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_src(X, R, cols, mask, HAS_RESIDUAL, ACC)
            n_b = tl.minimum(N - start, BLOCK_N).to(ACC)
            mean_b, m2_b = _chunk_moments(h, mask, n_b, RMS)
            if RMS:
                m2 += m2_b
            else:
                delta = mean_b - mean
                mean += delta * (n_b / (count + n_b))
                m2 += m2_b + delta * delta * (count * n_b / (count + n_b))
                count += n_b
        rstd = _rstd(m2, N, eps)
        # Pass 2: normalise (and write h). This program read the row just before, so these reads
        # should mostly hit L2; h is recomputed with the same rounding, so it is the same h.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = _load_src(X, R, cols, mask, HAS_RESIDUAL, ACC)
            _fwd_store_chunk(
                h, mean, rstd, W, B, Y, H, cols, mask, RMS, HAS_RESIDUAL, HAS_WEIGHT, HAS_BIAS
            )

    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _norm_bwd_row_terms_kernel(
    DY,  # pointer to the output gradient, (M, N) contiguous
    Src,  # pointer to the normalised input, (M, N), unit column stride
    W,  # pointer to the weight, (N,), or None
    Mean,  # pointer to the saved row means, (M,), or None for RMSNorm
    Rstd,  # pointer to the saved row 1/std, (M,) stats dtype
    MeanGXhat,  # pointer to the output mean(g * xhat) per row, (M,) stats dtype
    MeanG,  # pointer to the output mean(g) per row, (M,) stats dtype, or None for RMSNorm
    stride_src,  # row stride of Src, in elements
    N,  # hidden size (columns)
    RMS: tl.constexpr,  # RMSNorm: mean(g) is not needed
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per chunk, a power of 2
):
    """Looped layout only: one program per row walks the row in chunks and writes the two row
    means the dx formula needs, so the main kernel can then work on column chunks."""
    ACC: tl.constexpr = Rstd.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    DY += row * N
    Src += row * stride_src
    mean = _load_mean(Mean, row, RMS)
    rstd = tl.load(Rstd + row)
    # Per-lane sums across chunks, then one tree reduction: better rounding than adding up
    # one scalar per chunk.
    sum_gxhat = tl.zeros([BLOCK_N], dtype=ACC)
    sum_g = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        _, g, xhat = _bwd_load_chunk(DY, Src, w, mean, rstd, cols, mask, RMS, HAS_WEIGHT, ACC)
        sum_gxhat += g * xhat
        if not RMS:
            sum_g += g
    tl.store(MeanGXhat + row, tl.sum(sum_gxhat, axis=0) / N)
    if not RMS:
        tl.store(MeanG + row, tl.sum(sum_g, axis=0) / N)


@triton.jit
def _norm_bwd_kernel(
    DY,  # pointer to the output gradient, (M, N) contiguous
    DH,  # pointer to the gradient of the h output, (M, N) contiguous, or None
    Src,  # pointer to the normalised input (x, or h with a residual), (M, N), unit column stride
    W,  # pointer to the weight, (N,), or None
    Mean,  # pointer to the saved row means, (M,), or None for RMSNorm
    Rstd,  # pointer to the saved row 1/std, (M,) stats dtype; its dtype is the compute dtype
    MeanGXhat,  # pointer to mean(g * xhat) per row, (M,) (looped layout), or None
    MeanG,  # pointer to mean(g) per row, (M,) (looped layout, LayerNorm), or None
    DX,  # pointer to the input gradient, (M, N) contiguous, Src's dtype
    DW_partial,  # pointer to per-program dweight sums, (programs, N) stats dtype, or None
    DB_partial,  # pointer to per-program dbias sums, (programs, N) stats dtype, or None
    stride_src,  # row stride of Src, in elements
    M,  # rows
    N,  # hidden size (columns)
    rows_per_program,  # length of each program's contiguous block of rows
    RMS: tl.constexpr,  # RMSNorm: no mean(g) term
    HAS_DH: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per chunk, a power of 2
    ROW_IN_REGS: tl.constexpr,  # one chunk holds the whole row: reduce it here
):
    """Grid (programs, column chunks). Program (p, c) walks rows [p * rows_per_program, ...) in
    column chunk c, writes dx there and its dweight/dbias partial sums to row p of the buffers.
    With the row in registers (one chunk) it computes the row means itself; otherwise it reads
    them from `_norm_bwd_row_terms_kernel`."""
    ACC: tl.constexpr = Rstd.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)  # loaded once, reused by every row
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    db = tl.zeros([BLOCK_N], dtype=ACC)
    # int64 bounds make the row index int64: row * N can pass 2**31 elements.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        mean = _load_mean(Mean, row, RMS)
        rstd = tl.load(Rstd + row)
        dy, g, xhat = _bwd_load_chunk(
            DY + row * N, Src + row * stride_src, w, mean, rstd, cols, mask, RMS, HAS_WEIGHT, ACC
        )
        if ROW_IN_REGS:
            mean_gxhat = tl.sum(g * xhat, axis=0) / N
        else:
            mean_gxhat = tl.load(MeanGXhat + row)
        dx = g - xhat * mean_gxhat
        if not RMS:
            if ROW_IN_REGS:
                dx -= tl.sum(g, axis=0) / N
            else:
                dx -= tl.load(MeanG + row)
        dx *= rstd
        if HAS_DH:
            dx += tl.load(DH + row * N + cols, mask=mask, other=0.0).to(ACC)
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += dy * xhat
        if NEED_DB:
            db += dy
    if NEED_DW:
        tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_partial + pid * N + cols, db, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launch_config(n_cols, element_size, backward, block_n=None):
    """The one place that picks block size and warps, for every kernel in this file.

    Returns (BLOCK_N, num_warps). BLOCK_N is the whole row rounded up to a power of 2 while that
    fits the register budget above (row in registers), else the largest chunk that does (looped
    layout). `block_n` (a power of 2) forces the chunk size; it exists for tests, to run the
    looped layout on small rows.

    num_warps gives each warp 1 KiB of the chunk (utils.warps_for), at most 16 elements per
    thread for 16-bit inputs (8 warps for a 4096-wide bf16 row). It is capped at 16 warps, where
    the largest forward chunk reaches 32 elements per thread (still without spills, above).
    """
    max_block = _MAX_ROW_BYTES // element_size
    if backward:
        max_block = min(max_block, _MAX_BWD_ROW)
    if block_n is None:
        block_n = min(triton.next_power_of_2(n_cols), max_block)
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of 2, got {block_n}")
    return block_n, warps_for(block_n, element_size)


def _bwd_row_blocks(n_rows, n_chunks, num_warps, device):
    """(rows_per_program, programs) for the backward: about _BWD_WARPS_PER_SM resident warps on
    every SM across all column chunks (a few programs under the interpreter), each program a
    contiguous block of rows, and no program left without rows."""
    if device.type == "cuda":
        target = sm_count(device.index) * max(_BWD_WARPS_PER_SM // num_warps, 1)
        target = triton.cdiv(target, n_chunks)
    else:
        target = _BWD_PROGRAMS_INTERPRETER
    rows_per_program = triton.cdiv(n_rows, min(target, n_rows))
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)


def norm_fwd(x, weight, bias, residual, eps: float, rms: bool, *, block_n=None):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last dim, optionally of x + residual.

    x: (M, N) with x.stride(1) == 1 (any row stride; no copy is made); float32, float16,
       bfloat16 or float64.
    residual: None or (M, N), stride(1) == 1, x's dtype.
    weight, bias: None or contiguous (N,), any floating dtype (bias is None for RMSNorm).
    block_n: tests only; forces the chunk size (a power of 2), e.g. to run the looped layout.

    Returns (y, h, mean, rstd):
      y: (M, N) contiguous, x's dtype.
      h: x + residual, (M, N) contiguous, x's dtype, rounded before it is normalised; None
         without a residual.
      mean: (M,) stats dtype (float64 for float64 x, else float32); None for RMSNorm.
      rstd: (M,) stats dtype.
    """
    M, N = x.shape
    check_rows("x", x, (M, N))
    if residual is not None:
        check_rows("residual", residual, (M, N), x.dtype)
    check_vector("weight", weight, N)
    check_vector("bias", bias, N)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean = None if rms else torch.empty((M,), dtype=stats_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=stats_dtype, device=x.device)
    BLOCK_N, num_warps = _launch_config(N, x.element_size(), backward=False, block_n=block_n)
    with on_device(x):
        _norm_fwd_kernel[(M,)](
            x, residual, weight, bias, y, h, mean, rstd,
            x.stride(0), 0 if residual is None else residual.stride(0),
            N, eps,
            RMS=rms,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK_N=BLOCK_N,
            ROW_IN_REGS=BLOCK_N >= N,
            num_warps=num_warps,
        )
    return y, h, mean, rstd


def norm_bwd(
    dy, dh, src, weight, mean, rstd, rms: bool, need_dweight: bool, need_dbias: bool, *,
    block_n=None,
):
    """Gradients of `norm_fwd`.

    dy: (M, N) contiguous, gradient of y. dh: None or (M, N) contiguous, gradient of h (added
    to dx). src: (M, N) with stride(1) == 1, the tensor that was normalised (h with a residual,
    else x). weight: None or contiguous (N,), any floating dtype. mean, rstd: from `norm_fwd`
    (mean None for RMSNorm).
    block_n: tests only, as in `norm_fwd`.

    Returns (dx, dweight, dbias): dx (M, N) contiguous in src's dtype; dweight, dbias (N,) in
    the stats dtype (float64 for float64 src, else float32; the caller casts) or None when not
    asked for.
    """
    M, N = src.shape
    check_rows("src", src, (M, N))
    check_rows("dy", dy, (M, N), src.dtype, contiguous=True)
    if dh is not None:
        check_rows("dh", dh, (M, N), src.dtype, contiguous=True)
    check_vector("weight", weight, N)
    check_vector("rstd", rstd, M)
    check_vector("mean", mean, M)
    stats_dtype = rstd.dtype
    dx = torch.empty((M, N), dtype=src.dtype, device=src.device)
    BLOCK_N, num_warps = _launch_config(N, src.element_size(), backward=True, block_n=block_n)
    n_chunks = triton.cdiv(N, BLOCK_N)
    row_in_regs = n_chunks == 1
    rows_per_program, programs = _bwd_row_blocks(M, n_chunks, num_warps, src.device)

    def new(*shape):
        return torch.empty(shape, dtype=stats_dtype, device=src.device)

    dw_partial = new(programs, N) if need_dweight else None
    db_partial = new(programs, N) if need_dbias else None
    mean_gxhat = mean_g = None
    with on_device(src):
        if not row_in_regs:
            mean_gxhat = new(M)
            mean_g = None if rms else new(M)
            _norm_bwd_row_terms_kernel[(M,)](
                dy, src, weight, mean, rstd, mean_gxhat, mean_g,
                src.stride(0), N,
                RMS=rms,
                HAS_WEIGHT=weight is not None,
                BLOCK_N=BLOCK_N,
                num_warps=num_warps,
            )
        _norm_bwd_kernel[(programs, n_chunks)](
            dy, dh, src, weight, mean, rstd, mean_gxhat, mean_g, dx, dw_partial, db_partial,
            src.stride(0), M, N, rows_per_program,
            RMS=rms,
            HAS_DH=dh is not None,
            HAS_WEIGHT=weight is not None,
            NEED_DW=need_dweight,
            NEED_DB=need_dbias,
            BLOCK_N=BLOCK_N,
            ROW_IN_REGS=row_in_regs,
            num_warps=num_warps,
        )
    dweight = dw_partial.sum(0) if need_dweight else None
    dbias = db_partial.sum(0) if need_dbias else None
    return dx, dweight, dbias
