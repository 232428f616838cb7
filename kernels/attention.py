"""Scaled dot-product attention in Triton, FlashAttention-2 style: forward and backward.

Per (batch, query head), with s = scale * q k^T and the causal mask of torch's top-left
convention (query i sees keys j <= i, i.e. torch.ones(L, S).tril(); rows i >= S see every key):

    out = softmax(s) v,   lse = logsumexp(s) per row (natural log)

Forward (one program per query block of BLOCK_M rows): the keys the block can see are walked
in blocks of BLOCK_N with an online softmax (running max m and sum l per row), so the L x S
scores never leave the chip. Scores are kept in the log2 domain (s * log2(e), folded into the
scale) so that every exponential is an exp2; lse is converted back to natural log on store.
The key range is split in two loops: blocks every row of the query block sees in full run
without masks, and only the blocks at the end of the range (the causal diagonal, the S tail)
mask their scores. Causal key blocks that no row sees are outside the loop bounds.

Backward, with p = exp(s - lse) recomputed from the saved lse, dp = dout v^T and
delta = rowsum(dout * out) (= rowsum(p * dp)):

    ds = p * (dp - delta),   dq = scale * ds k,   dk = scale * ds^T q,   dv = p^T dout

  * `_attn_bwd_delta_kernel`: delta per query row, fp32.
  * `_attn_bwd_dkdv_kernel`: one program per (batch, kv head, key block) holds its dk/dv in
    registers and walks every query head of its group and every query block that can see the
    key block, so dk/dv of a kv head are summed over the group without atomics and without a
    repeated K/V (or a per-query-head dk/dv buffer).
  * `_attn_bwd_dq_kernel`: one program per (batch, query head, query block), walking the same
    key range as the forward.
  dq is computed apart from dk/dv (two passes over the scores instead of one) so that neither
  needs atomics: the results are deterministic and no fp32 dq buffer is needed.

Decoding over a KV cache (`attention_with_kvcache`, split-KV as flash-decoding): a few new
queries per batch row attend to that row's first kv_lens[b] cache rows, causal bottom-right.
At batch 1 the work is streaming the cache, so the kernels aim at memory bandwidth:
  * `_attn_kvcache_split_kernel`: one program per (batch, kv head, split) takes all the query
    heads of the kv head's group and all the new queries as the rows of one tile (G * Tq,
    padded to >= 16 for tl.dot), so each cache byte is read once per group; its split is an
    equal share, in whole key blocks, of the row's own length read on the device
    (`_split_key_range`), walked with the forward's key loop. It writes the split's normalised
    output and lse (fp32 workspace), or out itself when there is one split.
  * `_attn_kvcache_combine_kernel`: merges each output row's splits by log-sum-exp.
The split count comes from the shapes and the SM count only (`_kvcache_splits`), never from the
lengths, so a CUDA graph of a decode step stays valid as the cache fills.

GQA/MQA: query head h reads kv head h // (Hq // Hk) through its strides; nothing is repeated.

Accumulation is fp32 throughout. fp32 inputs use exact fp32 products (`input_precision="ieee"`:
a GPU's default tf32 keeps 10 mantissa bits, too few for the fp32 accuracy rule); fp16/bf16 use
tensor-core dots, with p and ds rounded to the input dtype as their operands.

Precision of dq at 16 bits: delta is computed from the rounded out, as FlashAttention does, so
each row's ds carries a common error of about one fp16/bf16 ulp of out, which adds up
coherently in dq = ds k (not in dk, where rows mix). Against eager PyTorch at the same dtype
(which forms ds from its own p and dp) dq comes out 0.5-1x eager's error typically and up to
~2.8x in small interpreter tests (L, S < 100); out, dk and dv stay within 1.2x.

Layout: q, k, v (and dout, out) may have any batch/head/row strides (0 for expanded tensors);
the last dim must be contiguous. Strides reach the kernels in units of 16 bytes (`IN_UNIT`),
so the compiler knows rows are aligned and streams them with 16-byte asynchronous copies; the
launchers copy the rare input that is not so (`_aligned_rows`). Offsets of a (batch, head) are
int64; offsets inside a tile are int32 (the launchers assert that they fit).

Where later features plug in:
  * packed variable-length batches (cu_seqlens): `_seq_rows` gives every kernel the first row
    and the length of its sequence; nothing else reads L or S per sequence.
  * sliding windows: `_key_range` / `_query_range` give the keys a query block sees and the
    queries a key block is seen by; a window raises the lower key bound (and adds a masked
    loop for the window's edge blocks beside the diagonal one).
  * logit soft-capping: the scores of every loop come from `_scores`.
  * lse is returned already (the backward needs it).
"""

import torch
import triton
import triton.language as tl

from .utils import launch, on_device, sm_count

# Element types of q, k, v (and of out and every gradient).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest head dim (E and Ev each) the kernels serve: a query tile of BLOCK_M x 256 is held in
# registers or shared memory for the whole key loop.
MAX_HEAD_DIM = 256

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): natural lse = log2-domain lse * ln(2)

# tl.dot needs at least 16 along every dim of a tile (a tensor-core instruction's K and N).
_MIN_BLOCK = 16

# Largest row count of a tile (BLOCK_M or BLOCK_N of any config below): offsets inside a tile are
# rows * row stride in int32, so the launchers require row stride * _MAX_TILE_ROWS < 2**31.
_MAX_TILE_ROWS = 128

# Thread-block grid dims 1 and 2 are limited to 65535 on CUDA (dim 0, query/key blocks, is not).
_MAX_GRID_YZ = 65535

# Elements of out (and of dout) per program of the delta pre-pass: it streams both once, and
# 4096 per 4 warps is 32 per thread of each (64-128 bytes), without spills at any head dim (a
# fixed 64 rows would hold 128 fp32 per thread of each at Ev = 256: 237 registers on sm_90a).
_DELTA_BLOCK_ELEMS = 4096
_DELTA_WARPS = 4


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------


# Under the interpreter: one small config, no autotuning. BLOCK_M != BLOCK_N so that tests with
# L, S of a few dozen cross several blocks, causal diagonals that span two key blocks (forward,
# dq) or two query steps (dk/dv), and tails in both directions.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, per element size and padded head dim
# (max of BLOCK_E, BLOCK_EV; 16 and 32 use the 64 row), for Hopper.
#   forward / dq: BLOCK_M query rows are held, key blocks of BLOCK_N are streamed.
#   dk/dv:        BLOCK_N key rows are held (k, v, dk, dv), query blocks of BLOCK_M are streamed.
# Chosen from sweeps of BLOCK_M/N in 16..128, 4/8 warps and 2/3 stages compiled for sm_90a
# (triton 3.9, ptxas -v, causal fp16 at head dims 64/128/256): every 16-bit config below
# compiles without spills and within shared memory (tests/test_triton_sm90.py holds that), so
# the autotuner only ever chooses between configs that can run at full speed. The sweeps showed:
#   * 4 warps with BLOCK_M = 128 (forward, dq) or BLOCK_N >= 64 (dk/dv) spill from head dim 128
#     on: a warp holds BLOCK_M / 4 rows of fp32 accumulators per head-dim column.
#   * dk/dv keeps four tiles live per key row (k, v and the fp32 dk, dv): at head dim 256 only
#     BLOCK_N = 32 is spill-free (it runs on mma.sync; wgmma needs 64 rows per warp group).
#   * fp32 (exact products on the FMA units, no tensor cores) holds a thread's rows of both
#     operands over the whole head dim: BLOCK_M x BLOCK_N = 64 x 32 spills 1-50 KB from head
#     dim 128 on. It runs one small-tile config per head dim (fp32 is the exact path, not the
#     fast one: nothing to tune between); its dk/dv kernel still spills 8-12 bytes when not
#     causal.
_CONFIG_TABLE = {
    "fwd": {
        (2, 64): ((128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                  (64, 32, 4, 3)),
        (2, 128): ((128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
                   (64, 32, 4, 3)),
        (2, 256): ((128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 4, 2)),
        (4, 64): ((64, 32, 8, 2),),
        (4, 128): ((32, 16, 8, 2),),
        (4, 256): ((32, 16, 8, 2),),
    },
    "dkdv": {
        (2, 64): ((32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3),
                  (32, 64, 8, 3)),
        (2, 128): ((32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3),
                   (64, 32, 8, 2)),
        (2, 256): ((64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)),
        (4, 64): ((32, 32, 8, 2),),
        (4, 128): ((16, 32, 8, 2),),
        (4, 256): ((16, 32, 8, 2),),
    },
    "dq": {
        (2, 64): ((128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                  (64, 32, 4, 3)),
        (2, 128): ((128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 2),
                   (64, 32, 4, 3)),
        (2, 256): ((128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3)),
        (4, 64): ((64, 32, 8, 2),),
        (4, 128): ((32, 16, 8, 2),),
        (4, 256): ((32, 16, 8, 2),),
    },
}


def _config(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _configs_for(kernel, block_e, block_ev, element_size):
    """The configs the autotuner tries for one launch of `kernel` ("fwd", "dkdv" or "dq"): the
    one place that picks block sizes, warps and pipeline stages for the attention kernels."""
    row = _CONFIG_TABLE[kernel][(element_size, max(block_e, block_ev, 64))]
    return [_config(*c) for c in row]


def _configs(kernel):
    """Every config `_configs_for` can give for `kernel`: what its autotuner is built with."""
    rows = _CONFIG_TABLE[kernel].values()
    return [_config(*c) for c in dict.fromkeys(c for row in rows for c in row)]


def _autotune(kernel):
    """Autotuning of one attention kernel over the configs `_configs_for` gives its launch.
    Keyed on the sequence lengths rounded up to a power of 2 (a decode step's growing S reuses
    the tuned config instead of re-benchmarking every length), the padded head dims, the mask
    and (added by Triton) the dtypes of the tensor arguments."""

    def configs_for_launch(configs, named_args, **kwargs):
        return _configs_for(kernel, kwargs["BLOCK_E"], kwargs["BLOCK_EV"],
                            named_args["Q"].element_size())

    return triton.autotune(
        configs=_configs(kernel),
        key=["L_BUCKET", "S_BUCKET", "BLOCK_E", "BLOCK_EV", "CAUSAL"],
        prune_configs_by={"early_config_prune": configs_for_launch},
    )


def _launch(tuned, grid, *args, interpreter_config=_INTERPRETER_CONFIG, **meta):
    """Launch an autotuned kernel (utils.launch), with this module's interpreter config."""
    launch(tuned, grid, *args, interpreter_config=interpreter_config, **meta)


def _block(dim):
    """A head dim padded to the tile width the kernels use: a power of 2, at least _MIN_BLOCK."""
    return max(triton.next_power_of_2(dim), _MIN_BLOCK)


# Decoding over a KV cache (`attention_with_kvcache`). Its split kernel holds the query rows of
# one kv head's group (BLOCK_M = G * Tq padded, chosen by the launcher, not tuned) and streams
# key blocks of BLOCK_N: the table gives (BLOCK_N, num_warps, num_stages) per element size and
# padded head dim (max of BLOCK_E, BLOCK_EV; 16 and 32 use the 64 row), for Hopper. The kernel
# is bandwidth-bound (each K/V byte is used by the G * Tq rows only): what matters is bytes in
# flight, num_stages * BLOCK_N * (E + Ev) per program through cp.async: 52-76 KB of shared
# memory at 16 rows (two or three programs per SM). Compiled for sm_90a (triton 3.9) at 16 rows
# (mma.sync) and 64 rows (wgmma; up to 251 registers and 160 KB at head dim 256) without spills
# (tests/test_triton_sm90.py holds that); not timed on a GPU yet.
_KVCACHE_CONFIG_TABLE = {
    (2, 64): ((128, 4, 3), (64, 4, 4)),
    (2, 128): ((64, 4, 3), (128, 8, 2)),
    (2, 256): ((64, 8, 2), (32, 4, 3)),
    (4, 64): ((32, 4, 2),),
    (4, 128): ((16, 8, 2),),
    (4, 256): ((16, 8, 2),),
}

# Under the interpreter: one small key block, so that short test caches cross several blocks in
# every split.
_KVCACHE_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)

# Rows (query heads of a group x new queries) of one split program, per element size; a larger
# G * Tq runs cdiv(G * Tq, this) programs per split, each reading the split's keys again. fp32
# (exact products on the FMA units hold both operands' rows in registers) spilled 20 KB at 64
# rows and head dim 256 on sm_90a; at 32 rows it spills none at head dims 64 and 128 and 4 bytes
# at 256 (within the fp32 spill budget of tests/test_triton_sm90.py).
_KVCACHE_MAX_BLOCK_M = {2: 64, 4: 32}

# Split count (host side, from shapes only: never from kv_lens, so a CUDA graph of a call stays
# valid as the lengths grow). On a GPU: enough programs for _KVCACHE_PROGRAMS_PER_SM per SM, but
# at least _KVCACHE_MIN_SPLIT_KEYS cache rows per split (the q load, the partial output and the
# combine stay small beside the keys each split streams) and at most _KVCACHE_MAX_SPLITS. By
# design, not measured yet: e.g. batch 1, 8 kv heads, 32k cache on 132 SMs gives 33 splits of
# ~1k keys (264 programs); MQA at batch 1 gives 128 splits of 256 keys; batch x kv heads >= 264
# gives 1 split, and no combine pass.
_KVCACHE_PROGRAMS_PER_SM = 2
_KVCACHE_MIN_SPLIT_KEYS = 256
_KVCACHE_MAX_SPLITS = 128
# Off a GPU (the interpreter): a few splits, so that the tests cross split boundaries.
_KVCACHE_CPU_SPLITS = 3

# Partial outputs per program of the combine kernel: splits x BLOCK_EV fp32 elements streamed in
# chunks of at most this many (32 per thread with 4 warps, as the delta pre-pass).
_COMBINE_BLOCK_ELEMS = 4096
_COMBINE_WARPS = 4


def _kvcache_config(block_n, warps, stages):
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _kvcache_configs_for(block_e, block_ev, element_size):
    """The configs the autotuner tries for one launch of the KV-cache split kernel."""
    row = _KVCACHE_CONFIG_TABLE[(element_size, max(block_e, block_ev, 64))]
    return [_kvcache_config(*c) for c in row]


def _kvcache_configs():
    """Every config `_kvcache_configs_for` can give: what the split kernel's autotuner holds."""
    rows = _KVCACHE_CONFIG_TABLE.values()
    return [_kvcache_config(*c) for c in dict.fromkeys(c for row in rows for c in row)]


def _kvcache_splits(programs, t_max, device):
    """Splits of each (batch, kv head)'s cache for `programs` programs per split (B * Hk * query
    row blocks) and a cache of t_max rows: see _KVCACHE_PROGRAMS_PER_SM."""
    if device.type == "cuda":
        want = triton.cdiv(_KVCACHE_PROGRAMS_PER_SM * sm_count(device.index), programs)
        most = min(triton.cdiv(t_max, _KVCACHE_MIN_SPLIT_KEYS), _KVCACHE_MAX_SPLITS)
    else:
        want = _KVCACHE_CPU_SPLITS
        most = triton.cdiv(t_max, _KVCACHE_INTERPRETER_CONFIG.kwargs["BLOCK_N"])
    return max(1, min(want, most))


# ----------------------------------------------------------------------------------------------
# Shared device code (inlined into the kernels below)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _seq_rows(b, L, S):
    """(first query row, query rows, first key row, key rows) of sequence b. In a padded batch
    every sequence starts at row 0 of its (batch, head) slice and has all L, S rows."""
    return 0, L, 0, S


@triton.jit
def _in_elements(stride_b, stride_h, stride_row, UNIT: tl.constexpr):
    """(batch, head, row) strides in elements, from the launchers' units of UNIT elements. As
    products with a constant they are known multiples of UNIT, so the compiler can issue vector
    (and asynchronous) loads of rows whose stride is not a multiple of 16, e.g. head dim 72."""
    return stride_b * UNIT, stride_h * UNIT, stride_row * UNIT


@triton.jit
def _row_offset(row, stride):
    """row * stride in int64 (a row of a long sequence times its stride can pass 2**31)."""
    return tl.cast(row, tl.int64) * stride


@triton.jit
def _key_range(m0, S_b, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(lo, hi, seen_by_all): keys [lo, hi) are seen by some query row of the block
    [m0, m0 + BLOCK_M), keys [lo, seen_by_all) by every row of it. The whole key blocks inside
    the latter need no mask (`_unmasked_end`); the blocks after them, up to hi, mask their
    scores (causal diagonal, S tail)."""
    lo = 0
    if CAUSAL:
        hi = tl.minimum(S_b, m0 + BLOCK_M)  # row m0 + BLOCK_M - 1 sees keys <= itself
        seen_by_all = tl.minimum(S_b, m0 + 1)  # row m0 sees keys <= m0
    else:
        hi = S_b
        seen_by_all = S_b
    return lo, hi, seen_by_all


@triton.jit
def _unmasked_end(lo, seen_by_all, BLOCK: tl.constexpr):
    """The end of the whole blocks of BLOCK from lo that lie inside [lo, seen_by_all)."""
    return lo + tl.maximum(seen_by_all - lo, 0) // BLOCK * BLOCK


@triton.jit
def _query_range(n0, L_b, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Query rows [lo, hi) that see some key of the block [n0, n0 + BLOCK_N), and the end `mid`
    of the causal diagonal: query blocks of BLOCK_M in [lo, mid) may see only part of the key
    block (causal mask), those in [mid, hi) see all of it."""
    if CAUSAL:
        lo = tl.minimum(n0, L_b)  # row i sees key n0 iff i >= n0
        mid = tl.minimum(lo + tl.cdiv(BLOCK_N, BLOCK_M) * BLOCK_M, L_b)
    else:
        lo = 0
        mid = 0
    return lo, mid, L_b


@triton.jit
def _load_tile(
    Ptr,  # pointer to row 0 of the tile
    stride_row,  # row stride, in elements (columns are contiguous)
    rows,  # (R,) row indices inside the tile, tl.arange(0, R)
    n_rows,  # valid rows of the tile (rows >= n_rows read 0); ignored without MASK_ROWS
    COLS: tl.constexpr,  # valid columns (the head dim)
    BLOCK_COLS: tl.constexpr,  # columns of the tile, a power of 2 >= COLS
    MASK_ROWS: tl.constexpr,  # the tile may run past the last valid row
):
    """An (R, BLOCK_COLS) tile in its own dtype, 0 outside the valid rows and columns."""
    cols = tl.arange(0, BLOCK_COLS)
    ptrs = Ptr + rows[:, None] * stride_row + cols[None, :]
    if MASK_ROWS:
        if COLS < BLOCK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < COLS), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if COLS < BLOCK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < COLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(
    Ptr,  # pointer to row 0 of the tile
    stride_row,  # row stride, in elements (columns are contiguous)
    x,  # (R, BLOCK_COLS) values, converted to Ptr's dtype
    rows,  # (R,) row indices inside the tile, tl.arange(0, R)
    n_rows,  # valid rows of the tile
    COLS: tl.constexpr,  # valid columns
    BLOCK_COLS: tl.constexpr,  # columns of the tile
):
    """Store the valid rows and columns of a tile."""
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < COLS)
    tl.store(Ptr + rows[:, None] * stride_row + cols[None, :], x.to(Ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _scores(a, b, qk_scale):
    """Scores in the log2 domain, fp32: (a @ b^T) * scale * log2(e). a, b are (rows, BLOCK_E)
    tiles of queries and keys (either way round); exact fp32 products for fp32 tiles."""
    return tl.dot(a, tl.trans(b), input_precision="ieee") * qk_scale


@triton.jit
def _load_lse2(Lse, rows, n_rows):
    """Saved lse of query rows, in the log2 domain. Rows without a visible key (lse = -inf) and
    rows past the end read +inf, so that their recomputed p = exp2(s - lse) is 0, not NaN."""
    lse = tl.load(Lse + rows, mask=rows < n_rows, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_loop(
    acc,  # (BLOCK_M, BLOCK_EV) fp32, running sum of p v (unnormalised)
    l_i,  # (BLOCK_M,) fp32, running sum of p
    m_i,  # (BLOCK_M,) fp32, running row max of the scores, log2 domain
    q,  # (BLOCK_M, BLOCK_E) query tile
    K,  # pointer to key row 0 of this sequence and kv head
    V,  # pointer to value row 0 of this sequence and kv head
    stride_kn,  # key row stride
    stride_vn,  # value row stride
    offs_m,  # (BLOCK_M,) query rows of the block, in the sequence
    start,  # first key of the loop, a multiple of BLOCK_N from the range's start
    end,  # end of the loop's keys
    S_b,  # keys in the sequence
    qk_scale,  # scale * log2(e)
    E: tl.constexpr,  # columns of k to load
    EV: tl.constexpr,  # columns of v to load
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,  # the blocks may hold keys past S_b or, causal, after some query row
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
):
    """Online softmax over the key blocks [start, end): returns the updated (acc, l_i, m_i)."""
    rows_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k = _load_tile(K + _row_offset(start_n, stride_kn), stride_kn, rows_n, S_b - start_n,
                       E, BLOCK_E, MASK)
        s = _scores(q, k, qk_scale)  # (BLOCK_M, BLOCK_N)
        if MASK:
            offs_n = start_n + rows_n
            visible = offs_n[None, :] < S_b
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_sub = m_new
        if MASK:
            # A row with no visible key so far keeps m = -inf; subtract 0 there instead, so its
            # p = exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN. (m itself stays -inf: a
            # substitute max would let later, very negative scores underflow.)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_tile(V + _row_offset(start_n, stride_vn), stride_vn, rows_n, S_b - start_n,
                       EV, BLOCK_EV, MASK)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["L_BUCKET", "S_BUCKET"])
def _attn_fwd_kernel(
    Q,  # pointer to queries, (B, H, L, E), unit last-dim stride
    K,  # pointer to keys, (B, HK, S, E), unit last-dim stride
    V,  # pointer to values, (B, HK, S, EV), unit last-dim stride
    Out,  # pointer to the output, (B, H, L, EV), Q's dtype
    Lse,  # pointer to the row log-sum-exp, (B, H, L) fp32 contiguous
    stride_qb, stride_qh, stride_qm,  # Q strides: batch, head, row
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_ob, stride_oh, stride_om,  # Out strides
    H,  # query heads
    GROUP,  # query heads per kv head (H // HK)
    L,  # query rows
    S,  # key rows
    scale,  # softmax scale of q k^T
    L_BUCKET,  # autotune key only (not read): L rounded up to a power of 2
    S_BUCKET,  # autotune key only (not read): S rounded up to a power of 2
    E: tl.constexpr,  # head dim of q, k
    EV: tl.constexpr,  # head dim of v
    CAUSAL: tl.constexpr,  # top-left causal mask
    IN_UNIT: tl.constexpr,  # input strides count units of this many elements (16 bytes)
    OUT_UNIT: tl.constexpr,  # output strides count units of this many elements (1 to 16 bytes)
    BLOCK_E: tl.constexpr,  # E padded to a power of 2 (>= 16)
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
):
    """Grid (cdiv(L, BLOCK_M), H, B): one program per query block of one (batch, head). Writes
    the block's rows of Out and Lse."""
    stride_qb, stride_qh, stride_qm = _in_elements(stride_qb, stride_qh, stride_qm, IN_UNIT)
    stride_kb, stride_kh, stride_kn = _in_elements(stride_kb, stride_kh, stride_kn, IN_UNIT)
    stride_vb, stride_vh, stride_vn = _in_elements(stride_vb, stride_vh, stride_vn, IN_UNIT)
    stride_ob, stride_oh, stride_om = _in_elements(stride_ob, stride_oh, stride_om, OUT_UNIT)
    # Input rows are whole 16-byte units, zero past E and EV (the launchers pad them): loads of
    # whole units keep the column masks in step with the vectors.
    E_IN: tl.constexpr = (E + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    EV_IN: tl.constexpr = (EV + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: (batch, head) offsets can pass 2**31 elements
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    q_start, L_b, k_start, S_b = _seq_rows(b, L, S)
    m0 = pid_m * BLOCK_M
    Q += b * stride_qb + h * stride_qh + _row_offset(q_start + m0, stride_qm)
    K += b * stride_kb + hk * stride_kh + _row_offset(k_start, stride_kn)
    V += b * stride_vb + hk * stride_vh + _row_offset(k_start, stride_vn)
    Out += b * stride_ob + h * stride_oh + _row_offset(q_start + m0, stride_om)
    Lse += (b * H + h) * L + q_start + m0

    rows_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows_m
    q = _load_tile(Q, stride_qm, rows_m, L_b - m0, E_IN, BLOCK_E, True)
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, hi, seen_by_all = _key_range(m0, S_b, BLOCK_M, CAUSAL)
    mid = _unmasked_end(lo, seen_by_all, BLOCK_N)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, lo, mid,
                                  S_b, qk_scale, E_IN, EV_IN, CAUSAL, False,
                                  BLOCK_N, BLOCK_E, BLOCK_EV)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, mid, hi,
                                  S_b, qk_scale, E_IN, EV_IN, CAUSAL, True,
                                  BLOCK_N, BLOCK_E, BLOCK_EV)

    # A row that saw no key has l = 0, acc = 0 and m = -inf: out 0 and lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(Out, stride_om, acc / l_safe[:, None], rows_m, L_b - m0, EV, BLOCK_EV)
    tl.store(Lse + rows_m, (m_i + tl.log2(l_safe)) * LN2, mask=rows_m < L_b - m0)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    Out,  # pointer to the forward output, (B, H, L, EV), unit last-dim stride
    DO,  # pointer to the output gradient, (B, H, L, EV), unit last-dim stride
    Delta,  # pointer to the result rowsum(dout * out), (B, H, L) fp32 contiguous
    stride_ob, stride_oh, stride_om,  # Out strides: batch, head, row
    stride_dob, stride_doh, stride_dom,  # DO strides
    H,  # query heads
    L,  # query rows
    EV: tl.constexpr,  # head dim of v (and out)
    UNIT: tl.constexpr,  # the stride arguments count units of this many elements
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
    BLOCK_M: tl.constexpr,  # rows per program
):
    """Grid (cdiv(L, BLOCK_M), H, B): delta = rowsum(dout * out) in fp32 for a block of rows."""
    stride_ob, stride_oh, stride_om = _in_elements(stride_ob, stride_oh, stride_om, UNIT)
    stride_dob, stride_doh, stride_dom = _in_elements(
        stride_dob, stride_doh, stride_dom, UNIT)
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, L_b, _, _ = _seq_rows(b, L, 0)
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    o = _load_tile(Out + b * stride_ob + h * stride_oh + _row_offset(q_start + m0, stride_om),
                   stride_om, rows, L_b - m0, EV, BLOCK_EV, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + _row_offset(q_start + m0, stride_dom),
                    stride_dom, rows, L_b - m0, EV, BLOCK_EV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + (b * H + h) * L + q_start + m0 + rows, delta, mask=rows < L_b - m0)


@triton.jit
def _dkdv_query_loop(
    dk,  # (BLOCK_N, BLOCK_E) fp32, running dk of the key block (without the scale)
    dv,  # (BLOCK_N, BLOCK_EV) fp32, running dv of the key block
    k,  # (BLOCK_N, BLOCK_E) key tile
    v,  # (BLOCK_N, BLOCK_EV) value tile
    Q,  # pointer to query row 0 of this sequence and query head
    DO,  # pointer to output-gradient row 0 of this sequence and query head
    Lse,  # pointer to the lse of row 0 of this sequence and query head
    Delta,  # pointer to the delta of row 0 of this sequence and query head
    stride_qm,  # query row stride
    stride_dom,  # output-gradient row stride
    offs_n,  # (BLOCK_N,) key rows of the block, in the sequence
    start,  # first query row of the loop
    end,  # end of the loop's query rows
    L_b,  # query rows in the sequence
    qk_scale,  # scale * log2(e)
    E: tl.constexpr,  # columns of q to load
    EV: tl.constexpr,  # columns of dout to load
    MASK: tl.constexpr,  # causal diagonal: some rows see only part of the key block
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
):
    """Add the contributions of query rows [start, end) to dk and dv, in transposed form (key
    rows first) so that no tile of scores needs a transpose: dv += p^T dout, dk += ds^T q."""
    rows_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        # Query rows past L_b read q = dout = 0 and lse = +inf (p = 0): they add nothing.
        q = _load_tile(Q + _row_offset(start_m, stride_qm), stride_qm, rows_m, L_b - start_m,
                       E, BLOCK_E, True)
        do = _load_tile(DO + _row_offset(start_m, stride_dom), stride_dom, rows_m,
                        L_b - start_m, EV, BLOCK_EV, True)
        offs_m = start_m + rows_m
        lse2 = _load_lse2(Lse, offs_m, L_b)
        delta = tl.load(Delta + offs_m, mask=offs_m < L_b, other=0.0)
        p_t = tl.exp2(_scores(k, q, qk_scale) - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit(do_not_specialize=["L_BUCKET", "S_BUCKET"])
def _attn_bwd_dkdv_kernel(
    Q,  # pointer to queries, (B, H, L, E), unit last-dim stride
    K,  # pointer to keys, (B, HK, S, E), unit last-dim stride
    V,  # pointer to values, (B, HK, S, EV), unit last-dim stride
    DO,  # pointer to the output gradient, (B, H, L, EV), unit last-dim stride
    Lse,  # pointer to the forward's lse, (B, H, L) fp32 contiguous
    Delta,  # pointer to rowsum(dout * out), (B, H, L) fp32 contiguous
    DK,  # pointer to the key gradient, (B, HK, S, E), K's dtype
    DV,  # pointer to the value gradient, (B, HK, S, EV), V's dtype
    stride_qb, stride_qh, stride_qm,  # Q strides: batch, head, row
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_dob, stride_doh, stride_dom,  # DO strides
    stride_dkb, stride_dkh, stride_dkn,  # DK strides
    stride_dvb, stride_dvh, stride_dvn,  # DV strides
    H,  # query heads
    GROUP,  # query heads per kv head (H // HK)
    L,  # query rows
    S,  # key rows
    scale,  # softmax scale of q k^T
    L_BUCKET,  # autotune key only (not read): L rounded up to a power of 2
    S_BUCKET,  # autotune key only (not read): S rounded up to a power of 2
    E: tl.constexpr,  # head dim of q, k
    EV: tl.constexpr,  # head dim of v
    CAUSAL: tl.constexpr,  # top-left causal mask
    IN_UNIT: tl.constexpr,  # input strides count units of this many elements (16 bytes)
    OUT_UNIT: tl.constexpr,  # output strides count units of this many elements (1 to 16 bytes)
    BLOCK_E: tl.constexpr,  # E padded to a power of 2 (>= 16)
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows per program
):
    """Grid (cdiv(S, BLOCK_N), HK, B): one program per key block of one (batch, kv head). It
    walks the GROUP query heads of the kv head and, in each, the query rows that see the key
    block, and writes the block's rows of DK and DV once."""
    stride_qb, stride_qh, stride_qm = _in_elements(stride_qb, stride_qh, stride_qm, IN_UNIT)
    stride_kb, stride_kh, stride_kn = _in_elements(stride_kb, stride_kh, stride_kn, IN_UNIT)
    stride_vb, stride_vh, stride_vn = _in_elements(stride_vb, stride_vh, stride_vn, IN_UNIT)
    stride_dob, stride_doh, stride_dom = _in_elements(
        stride_dob, stride_doh, stride_dom, IN_UNIT)
    stride_dkb, stride_dkh, stride_dkn = _in_elements(
        stride_dkb, stride_dkh, stride_dkn, OUT_UNIT)
    stride_dvb, stride_dvh, stride_dvn = _in_elements(
        stride_dvb, stride_dvh, stride_dvn, OUT_UNIT)
    # Input rows are whole 16-byte units, zero past E and EV (the launchers pad them): loads of
    # whole units keep the column masks in step with the vectors.
    E_IN: tl.constexpr = (E + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    EV_IN: tl.constexpr = (EV + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_start, L_b, k_start, S_b = _seq_rows(b, L, S)
    n0 = pid_n * BLOCK_N
    rows_n = tl.arange(0, BLOCK_N)
    offs_n = n0 + rows_n
    k_row = (k_start + n0).to(tl.int64)
    k = _load_tile(K + b * stride_kb + hk * stride_kh + k_row * stride_kn, stride_kn, rows_n,
                   S_b - n0, E_IN, BLOCK_E, True)
    v = _load_tile(V + b * stride_vb + hk * stride_vh + k_row * stride_vn, stride_vn, rows_n,
                   S_b - n0, EV_IN, BLOCK_EV, True)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)

    lo, mid, hi = _query_range(n0, L_b, BLOCK_N, BLOCK_M, CAUSAL)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh + _row_offset(q_start, stride_qm)
        DOh = DO + b * stride_dob + h * stride_doh + _row_offset(q_start, stride_dom)
        Lse_h = Lse + (b * H + h) * L + q_start
        Delta_h = Delta + (b * H + h) * L + q_start
        if CAUSAL:
            dk, dv = _dkdv_query_loop(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, stride_qm,
                                      stride_dom, offs_n, lo, mid, L_b, qk_scale, E_IN, EV_IN, True,
                                      BLOCK_M, BLOCK_E, BLOCK_EV)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, Qh, DOh, Lse_h, Delta_h, stride_qm, stride_dom,
                                  offs_n, mid, hi, L_b, qk_scale, E_IN, EV_IN, False, BLOCK_M,
                                  BLOCK_E, BLOCK_EV)

    _store_tile(DK + b * stride_dkb + hk * stride_dkh + k_row * stride_dkn, stride_dkn,
                dk * scale, rows_n, S_b - n0, E, BLOCK_E)
    _store_tile(DV + b * stride_dvb + hk * stride_dvh + k_row * stride_dvn, stride_dvn,
                dv, rows_n, S_b - n0, EV, BLOCK_EV)


@triton.jit
def _dq_key_loop(
    dq,  # (BLOCK_M, BLOCK_E) fp32, running dq of the query block (without the scale)
    q,  # (BLOCK_M, BLOCK_E) query tile
    do,  # (BLOCK_M, BLOCK_EV) output-gradient tile
    lse2,  # (BLOCK_M,) the rows' lse, log2 domain
    delta,  # (BLOCK_M,) the rows' rowsum(dout * out)
    K,  # pointer to key row 0 of this sequence and kv head
    V,  # pointer to value row 0 of this sequence and kv head
    stride_kn,  # key row stride
    stride_vn,  # value row stride
    offs_m,  # (BLOCK_M,) query rows of the block, in the sequence
    start,  # first key of the loop
    end,  # end of the loop's keys
    S_b,  # keys in the sequence
    qk_scale,  # scale * log2(e)
    E: tl.constexpr,  # columns of k to load
    EV: tl.constexpr,  # columns of v to load
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,  # the blocks may hold keys past S_b or, causal, after some query row
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
):
    """Add ds k over the key blocks [start, end) to dq."""
    rows_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k = _load_tile(K + _row_offset(start_n, stride_kn), stride_kn, rows_n, S_b - start_n,
                       E, BLOCK_E, MASK)
        v = _load_tile(V + _row_offset(start_n, stride_vn), stride_vn, rows_n, S_b - start_n,
                       EV, BLOCK_EV, MASK)
        p = tl.exp2(_scores(q, k, qk_scale) - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            offs_n = start_n + rows_n
            visible = offs_n[None, :] < S_b
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit(do_not_specialize=["L_BUCKET", "S_BUCKET"])
def _attn_bwd_dq_kernel(
    Q,  # pointer to queries, (B, H, L, E), unit last-dim stride
    K,  # pointer to keys, (B, HK, S, E), unit last-dim stride
    V,  # pointer to values, (B, HK, S, EV), unit last-dim stride
    DO,  # pointer to the output gradient, (B, H, L, EV), unit last-dim stride
    Lse,  # pointer to the forward's lse, (B, H, L) fp32 contiguous
    Delta,  # pointer to rowsum(dout * out), (B, H, L) fp32 contiguous
    DQ,  # pointer to the query gradient, (B, H, L, E), Q's dtype
    stride_qb, stride_qh, stride_qm,  # Q strides: batch, head, row
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    stride_dob, stride_doh, stride_dom,  # DO strides
    stride_dqb, stride_dqh, stride_dqm,  # DQ strides
    H,  # query heads
    GROUP,  # query heads per kv head (H // HK)
    L,  # query rows
    S,  # key rows
    scale,  # softmax scale of q k^T
    L_BUCKET,  # autotune key only (not read): L rounded up to a power of 2
    S_BUCKET,  # autotune key only (not read): S rounded up to a power of 2
    E: tl.constexpr,  # head dim of q, k
    EV: tl.constexpr,  # head dim of v
    CAUSAL: tl.constexpr,  # top-left causal mask
    IN_UNIT: tl.constexpr,  # input strides count units of this many elements (16 bytes)
    OUT_UNIT: tl.constexpr,  # output strides count units of this many elements (1 to 16 bytes)
    BLOCK_E: tl.constexpr,  # E padded to a power of 2 (>= 16)
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
):
    """Grid (cdiv(L, BLOCK_M), H, B): one program per query block of one (batch, head), walking
    the keys the block sees (as the forward does); writes the block's rows of DQ."""
    stride_qb, stride_qh, stride_qm = _in_elements(stride_qb, stride_qh, stride_qm, IN_UNIT)
    stride_kb, stride_kh, stride_kn = _in_elements(stride_kb, stride_kh, stride_kn, IN_UNIT)
    stride_vb, stride_vh, stride_vn = _in_elements(stride_vb, stride_vh, stride_vn, IN_UNIT)
    stride_dob, stride_doh, stride_dom = _in_elements(
        stride_dob, stride_doh, stride_dom, IN_UNIT)
    stride_dqb, stride_dqh, stride_dqm = _in_elements(
        stride_dqb, stride_dqh, stride_dqm, OUT_UNIT)
    # Input rows are whole 16-byte units, zero past E and EV (the launchers pad them): loads of
    # whole units keep the column masks in step with the vectors.
    E_IN: tl.constexpr = (E + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    EV_IN: tl.constexpr = (EV + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    q_start, L_b, k_start, S_b = _seq_rows(b, L, S)
    m0 = pid_m * BLOCK_M
    q_row = (q_start + m0).to(tl.int64)
    rows_m = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows_m
    q = _load_tile(Q + b * stride_qb + h * stride_qh + q_row * stride_qm, stride_qm, rows_m,
                   L_b - m0, E_IN, BLOCK_E, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + q_row * stride_dom, stride_dom, rows_m,
                    L_b - m0, EV_IN, BLOCK_EV, True)
    row_stats = (b * H + h) * L + q_start
    lse2 = _load_lse2(Lse + row_stats, offs_m, L_b)
    delta = tl.load(Delta + row_stats + offs_m, mask=offs_m < L_b, other=0.0)
    K += b * stride_kb + hk * stride_kh + _row_offset(k_start, stride_kn)
    V += b * stride_vb + hk * stride_vh + _row_offset(k_start, stride_vn)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)

    lo, hi, seen_by_all = _key_range(m0, S_b, BLOCK_M, CAUSAL)
    mid = _unmasked_end(lo, seen_by_all, BLOCK_N)
    dq = _dq_key_loop(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, lo, mid, S_b,
                      qk_scale, E_IN, EV_IN, CAUSAL, False, BLOCK_N, BLOCK_E, BLOCK_EV)
    dq = _dq_key_loop(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, mid, hi, S_b,
                      qk_scale, E_IN, EV_IN, CAUSAL, True, BLOCK_N, BLOCK_E, BLOCK_EV)

    _store_tile(DQ + b * stride_dqb + h * stride_dqh + q_row * stride_dqm, stride_dqm,
                dq * scale, rows_m, L_b - m0, E, BLOCK_E)


# ----------------------------------------------------------------------------------------------
# Decoding over a KV cache (split-KV, flash-decoding)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _split_key_range(split, num_splits, kv_len, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of split `split` of a row with kv_len keys: the row's own length in
    num_splits equal shares of whole BLOCK_N blocks (the last shares may be short or empty)."""
    share = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * share, kv_len)
    hi = tl.minimum(lo + share, kv_len)
    return lo, hi


@triton.jit
def _decode_last_key(i, kv_len, Tq):
    """The last key query i of Tq new queries sees (bottom-right causal: the new tokens are the
    last Tq of the row's kv_len keys); below 0 for a query that sees none."""
    return kv_len - Tq + i


@triton.jit
def _decode_seen_by_all(lo, hi, kv_len, Tq):
    """The end of the keys of [lo, hi) that every one of the Tq queries sees (query 0 sees keys
    <= kv_len - Tq): the whole blocks before it need no mask."""
    return tl.minimum(tl.maximum(_decode_last_key(0, kv_len, Tq) + 1, lo), hi)


@triton.jit(do_not_specialize=["T_BUCKET"])
def _attn_kvcache_split_kernel(
    Q,  # pointer to queries, (B, HQ, TQ, E), unit last-dim stride
    K,  # pointer to the key cache, (B, HK, TMAX, E), unit last-dim stride
    V,  # pointer to the value cache, (B, HK, TMAX, EV), unit last-dim stride
    KvLens,  # pointer to the keys per batch row, (B,) int32
    Dest,  # pointer to the results, (B * HQ * TQ, NUM_SPLITS, EV) contiguous (Out when 1 split)
    DestLse,  # pointer to the partial lse, (B * HQ * TQ, NUM_SPLITS) fp32, log2 domain
    stride_qb, stride_qh, stride_qm,  # Q strides: batch, head, row
    stride_kb, stride_kh, stride_kn,  # K strides
    stride_vb, stride_vh, stride_vn,  # V strides
    GROUP,  # query heads per kv head (HQ // HK)
    TQ,  # new queries per batch row
    TMAX,  # cache rows
    NUM_SPLITS,  # splits of each row's keys
    M_BLOCKS,  # programs per split along the GROUP * TQ rows, cdiv(GROUP * TQ, BLOCK_M)
    scale,  # softmax scale of q k^T
    T_BUCKET,  # autotune key only (not read): TMAX rounded up to a power of 2
    E: tl.constexpr,  # head dim of q, k
    EV: tl.constexpr,  # head dim of v
    IN_UNIT: tl.constexpr,  # input strides count units of this many elements (16 bytes)
    WRITE_LSE: tl.constexpr,  # several splits: write lse beside the normalised partial output
    BLOCK_E: tl.constexpr,  # E padded to a power of 2 (>= 16)
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
    BLOCK_M: tl.constexpr,  # rows (query head, new query) of the group per program, >= 16
    BLOCK_N: tl.constexpr,  # key rows per loop step
):
    """Grid (NUM_SPLITS * M_BLOCKS, HK, B): one program per split of the keys of one (batch, kv
    head), holding BLOCK_M rows r = g * TQ + i of the group (query head hk * GROUP + g, new query
    i) as the M dim of its tiles, so each key and value row is read once per group. Writes the
    rows' softmax-normalised output over the split's keys and (WRITE_LSE) their lse."""
    stride_qb, stride_qh, stride_qm = _in_elements(stride_qb, stride_qh, stride_qm, IN_UNIT)
    stride_kb, stride_kh, stride_kn = _in_elements(stride_kb, stride_kh, stride_kn, IN_UNIT)
    stride_vb, stride_vh, stride_vn = _in_elements(stride_vb, stride_vh, stride_vn, IN_UNIT)
    E_IN: tl.constexpr = (E + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    EV_IN: tl.constexpr = (EV + IN_UNIT - 1) // IN_UNIT * IN_UNIT
    split = tl.program_id(0) // M_BLOCKS
    m0 = tl.program_id(0) % M_BLOCKS * BLOCK_M
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    # Clamped so that a bad length can never read outside the cache (the launcher documents the
    # range and does not read the lengths on the host).
    kv_len = tl.minimum(tl.maximum(tl.load(KvLens + b), 0), TMAX)

    rows = m0 + tl.arange(0, BLOCK_M)  # r = g * TQ + i
    n_rows = GROUP * TQ
    g = tl.where(rows < n_rows, rows // TQ, 0)
    i = tl.where(rows < n_rows, rows % TQ, 0)
    cols = tl.arange(0, BLOCK_E)
    q_offs = (hk * GROUP + g) * stride_qh + i.to(tl.int64) * stride_qm  # int64: any head stride
    q = tl.load(Q + b * stride_qb + q_offs[:, None] + cols[None, :],
                mask=(rows[:, None] < n_rows) & (cols[None, :] < E_IN), other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # In key coordinates each row r sees keys <= its last key: the forward's causal key loop
    # with that as the "query row" and kv_len as the sequence's keys masks exactly the contract.
    last_key = _decode_last_key(i, kv_len, TQ)
    lo, hi = _split_key_range(split, NUM_SPLITS, kv_len, BLOCK_N)
    mid = _unmasked_end(lo, _decode_seen_by_all(lo, hi, kv_len, TQ), BLOCK_N)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, last_key, lo, mid,
                                  kv_len, qk_scale, E_IN, EV_IN, True, False,
                                  BLOCK_N, BLOCK_E, BLOCK_EV)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, last_key, mid, hi,
                                  kv_len, qk_scale, E_IN, EV_IN, True, True,
                                  BLOCK_N, BLOCK_E, BLOCK_EV)

    # A row that saw no key of the split: output 0, lse -inf (the combine gives it weight 0).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    # Result row of (b, query head hk * GROUP + g, query i): ((b * HQ + h) * TQ + i) =
    # (b * HK + hk) * GROUP * TQ + r, each NUM_SPLITS results of EV.
    dest_rows = ((b * tl.num_programs(1) + hk) * n_rows + m0) * NUM_SPLITS + split
    _store_tile(Dest + dest_rows * EV, NUM_SPLITS * EV, acc / l_safe[:, None],
                tl.arange(0, BLOCK_M), n_rows - m0, EV, BLOCK_EV)
    if WRITE_LSE:
        r = tl.arange(0, BLOCK_M)
        tl.store(DestLse + dest_rows + r * NUM_SPLITS, m_i + tl.log2(l_safe),
                 mask=r < n_rows - m0)


@triton.jit
def _attn_kvcache_combine_kernel(
    Part,  # pointer to the splits' normalised outputs, (ROWS, NUM_SPLITS, EV) fp32 contiguous
    PartLse,  # pointer to their lse, (ROWS, NUM_SPLITS) fp32, log2 domain (-inf: no key)
    Out,  # pointer to the output, (ROWS, EV) contiguous
    NUM_SPLITS,  # splits per row
    EV: tl.constexpr,  # head dim of v
    BLOCK_S: tl.constexpr,  # splits per step, a power of 2
    BLOCK_EV: tl.constexpr,  # EV padded to a power of 2 (>= 16)
):
    """Grid (ROWS,): merges one output row's splits by log-sum-exp: out = sum_s w_s o_s / sum_s
    w_s with w_s = exp2(lse_s - max lse). A row no split saw a key of gets 0."""
    row = tl.program_id(0).to(tl.int64)
    PartLse += row * NUM_SPLITS
    Part += row * NUM_SPLITS * EV
    s = tl.arange(0, BLOCK_S)
    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        lse = tl.load(PartLse + s0 + s, mask=s0 + s < NUM_SPLITS, other=float("-inf"))
        m = tl.maximum(m, lse)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key anywhere: every w_s = 0
    acc = tl.zeros([BLOCK_EV], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        lse = tl.load(PartLse + s0 + s, mask=s0 + s < NUM_SPLITS, other=float("-inf"))
        w = tl.exp2(lse - m_max)
        o = _load_tile(Part + s0 * EV, EV, s, NUM_SPLITS - s0, EV, BLOCK_EV, True)
        acc += tl.sum(w[:, None] * o, axis=0)
        w_sum += w
    total = tl.sum(w_sum, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    cols = tl.arange(0, BLOCK_EV)
    tl.store(Out + row * EV + cols, (acc / total).to(Out.dtype.element_ty), mask=cols < EV)


_attn_fwd_tuned = _autotune("fwd")(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = _autotune("dkdv")(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = _autotune("dq")(_attn_bwd_dq_kernel)


def _autotune_kvcache(kernel):
    """Autotuning of the KV-cache split kernel over the configs `_kvcache_configs_for` gives its
    launch. Keyed on the cache rows rounded up to a power of 2, the padded head dims, the rows
    per program, whether the splits are combined, and (added by Triton) the dtypes."""

    def configs_for_launch(configs, named_args, **kwargs):
        return _kvcache_configs_for(kwargs["BLOCK_E"], kwargs["BLOCK_EV"],
                                    named_args["Q"].element_size())

    return triton.autotune(
        configs=_kvcache_configs(),
        key=["T_BUCKET", "BLOCK_E", "BLOCK_EV", "BLOCK_M", "WRITE_LSE"],
        prune_configs_by={"early_config_prune": configs_for_launch},
    )(kernel)


_attn_kvcache_split_tuned = _autotune_kvcache(_attn_kvcache_split_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_heads(name, t, shape, dtype):
    """Assert the layout the kernels rely on: (B, heads, rows, dim) of `shape` and `dtype`, unit
    stride in the last dim (any other strides, 0 included), and a row stride that keeps offsets
    inside a tile within int32."""
    assert t.dim() == 4 and tuple(t.shape) == tuple(shape), (
        f"{name}: shape {tuple(t.shape)}, want {tuple(shape)}")
    assert t.dtype == dtype, f"{name}: dtype {t.dtype}, want {dtype}"
    assert t.stride(3) == 1 or t.shape[3] == 1, (
        f"{name} must have unit stride in its last dim, strides {t.stride()}")
    assert abs(t.stride(2)) * _MAX_TILE_ROWS < 2**31, (
        f"{name}: row stride {t.stride(2)} too large for 32-bit offsets inside a tile")


def _check_qkv(q, k, v):
    """Check q, k, v of `attention_fwd`; returns (B, H, L, E, HK, S, EV)."""
    assert q.dtype in DTYPES, f"q: dtype {q.dtype}, want one of {DTYPES}"
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, (
        f"q, k, v must be 4-D (B, heads, rows, dim), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    assert k.device == q.device and v.device == q.device, (
        f"q, k, v on {q.device}, {k.device}, {v.device}")
    B, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[3]
    assert 1 <= E <= MAX_HEAD_DIM and 1 <= EV <= MAX_HEAD_DIM, (
        f"head dims E={E} (q, k), Ev={EV} (v) must be in 1..{MAX_HEAD_DIM}")
    assert HK >= 1 and H % HK == 0, f"q heads {H} must be a multiple of k/v heads {HK}"
    assert B <= _MAX_GRID_YZ and H <= _MAX_GRID_YZ, f"batch {B} and heads {H} must be <= 65535"
    _check_heads("q", q, (B, H, L, E), q.dtype)
    _check_heads("k", k, (B, HK, S, E), q.dtype)
    _check_heads("v", v, (B, HK, S, EV), q.dtype)
    return B, H, L, E, HK, S, EV


def _strides(t, unit):
    """(batch, head, row) strides of a (B, heads, rows, dim) tensor in units of `unit` elements,
    0 for a dim of size 1 (its stride is never used)."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) // unit for d in range(3))


def _stride_unit(*tensors):
    """The largest power of 2, at most 16 bytes of elements, that divides the batch, head and row
    strides of every tensor."""
    unit = 16 // tensors[0].element_size()
    while unit > 1 and any(s % unit for t in tensors for s in _strides(t, 1)):
        unit //= 2
    return unit


def _aligned_rows(t):
    """`t` if its rows are whole 16-byte units starting 16-byte aligned (batch, head and row
    strides and the last dim multiples of 16 bytes), else a copy that is, zero past the last dim.
    The kernels stream their inputs' rows through shared memory with 16-byte asynchronous
    copies; rows they cannot prove aligned, or masked at a column inside a 16-byte vector, are
    loaded element by element through registers: on sm_90a that spilled 0.5-4 KB per kernel at
    head dim 72 or 111. Only unusual layouts pay the copy (head dims or strides that are not a
    multiple of 8 elements for 16-bit inputs, of 4 for fp32), one pass over the tensor."""
    unit = 16 // t.element_size()
    dim = t.shape[3]
    if dim % unit == 0 and _stride_unit(t) == unit:
        return t
    # Broadcast (stride-0) dims stay broadcast: one copy of what they repeat.
    stored = t[tuple(slice(0, 1) if t.stride(d) == 0 else slice(None) for d in range(3))]
    padded = torch.zeros((*stored.shape[:3], triton.cdiv(dim, unit) * unit), dtype=t.dtype,
                         device=t.device)
    return padded[..., :dim].copy_(stored).expand(t.shape)


def _shape_meta(L, S, E, EV, causal, in_unit, out_unit):
    """Keyword arguments every attention kernel but the delta pre-pass takes alike."""
    return dict(L_BUCKET=triton.next_power_of_2(L), S_BUCKET=triton.next_power_of_2(S),
                E=E, EV=EV, CAUSAL=causal, IN_UNIT=in_unit, OUT_UNIT=out_unit,
                BLOCK_E=_block(E), BLOCK_EV=_block(EV))


def attention_fwd(q, k, v, causal: bool, scale: float):
    """Attention forward: out = softmax(scale * q k^T (+ causal mask)) v, and its lse.

    q: (B, Hq, L, E); k: (B, Hk, S, E); v: (B, Hk, S, Ev); one dtype of DTYPES, one device.
    Hq must be a multiple of Hk (GQA/MQA): query head h reads kv head h // (Hq // Hk). E, Ev in
    1..MAX_HEAD_DIM (they may differ); L, S any sizes. Any batch/head/row strides (0 for
    expanded tensors); the last dim must have unit stride. No copies are made, except of
    inputs whose rows are not 16-byte aligned (see `_aligned_rows`).
    causal: top-left aligned as torch's `torch.ones(L, S).tril()`: query i sees keys j <= i, so
    with L > S rows i >= S see every key.
    scale: multiplies q k^T (1/sqrt(E) for standard attention).

    Returns (out, lse): out (B, Hq, L, Ev) contiguous in q's dtype; lse (B, Hq, L) float32
    contiguous, the natural-log logsumexp of each row's scaled scores. A row that sees no key
    gets out = 0 and lse = -inf.
    """
    B, H, L, E, HK, S, EV = _check_qkv(q, k, v)
    out = torch.empty((B, H, L, EV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v)
    unit, out_unit = 16 // q.element_size(), _stride_unit(out)
    with on_device(q):
        _launch(
            _attn_fwd_tuned, lambda cfg: (triton.cdiv(L, cfg["BLOCK_M"]), H, B),
            q, k, v, out, lse,
            *_strides(q, unit), *_strides(k, unit), *_strides(v, unit),
            *_strides(out, out_unit),
            H, H // HK, L, S, scale,
            **_shape_meta(L, S, E, EV, causal, unit, out_unit),
        )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients of `attention_fwd` with respect to q, k and v.

    dout: (B, Hq, L, Ev), gradient of out; q, k, v, causal, scale: as given to `attention_fwd`;
    out, lse: what it returned. dout and out may have any strides with a unit last-dim stride;
    lse must be contiguous float32.

    Returns (dq, dk, dv): dq (B, Hq, L, E), dk (B, Hk, S, E), dv (B, Hk, S, Ev), contiguous, in
    q's dtype. dk and dv of a kv head are summed over the query heads that read it.
    """
    B, H, L, E, HK, S, EV = _check_qkv(q, k, v)
    _check_heads("dout", dout, (B, H, L, EV), q.dtype)
    _check_heads("out", out, (B, H, L, EV), q.dtype)
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32 and lse.is_contiguous(), (
        f"lse: {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}, "
        f"want contiguous float32 {(B, H, L)}")
    assert dout.device == q.device and out.device == q.device and lse.device == q.device, (
        f"dout, out, lse on {dout.device}, {out.device}, {lse.device}; q on {q.device}")
    dq = torch.empty((B, H, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, HK, S, E), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, HK, S, EV), dtype=q.dtype, device=q.device)
    q, k, v, dout = _aligned_rows(q), _aligned_rows(k), _aligned_rows(v), _aligned_rows(dout)
    unit, out_unit = 16 // q.element_size(), _stride_unit(dq, dk, dv)
    meta = _shape_meta(L, S, E, EV, causal, unit, out_unit)
    with on_device(q):
        delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
        if delta.numel():
            delta_rows = _DELTA_BLOCK_ELEMS // meta["BLOCK_EV"]
            delta_unit = _stride_unit(out, dout)
            _attn_bwd_delta_kernel[(triton.cdiv(L, delta_rows), H, B)](
                out, dout, delta,
                *_strides(out, delta_unit), *_strides(dout, delta_unit),
                H, L,
                EV=EV, UNIT=delta_unit, BLOCK_EV=meta["BLOCK_EV"], BLOCK_M=delta_rows,
                num_warps=_DELTA_WARPS,
            )
        if dk.numel():  # with L = 0 too: dk = dv = 0 then
            _launch(
                _attn_bwd_dkdv_tuned, lambda cfg: (triton.cdiv(S, cfg["BLOCK_N"]), HK, B),
                q, k, v, dout, lse, delta, dk, dv,
                *_strides(q, unit), *_strides(k, unit), *_strides(v, unit),
                *_strides(dout, unit), *_strides(dk, out_unit), *_strides(dv, out_unit),
                H, H // HK, L, S, scale,
                **meta,
            )
        if dq.numel():  # with S = 0 too: dq = 0 then
            _launch(
                _attn_bwd_dq_tuned, lambda cfg: (triton.cdiv(L, cfg["BLOCK_M"]), H, B),
                q, k, v, dout, lse, delta, dq,
                *_strides(q, unit), *_strides(k, unit), *_strides(v, unit),
                *_strides(dout, unit), *_strides(dq, out_unit),
                H, H // HK, L, S, scale,
                **meta,
            )
    return dq, dk, dv


def attention_with_kvcache(q, k_cache, v_cache, kv_lens, scale: float, _splits=None):
    """Decoding attention: a few new queries per batch row over that row's prefix of a KV cache
    (after their keys and values were written into it). No autograd.

    q: (B, Hq, Tq, E); k_cache: (B, Hk, Tmax, E); v_cache: (B, Hk, Tmax, Ev); one dtype of
    DTYPES, one device. Hq must be a multiple of Hk (GQA/MQA): query head h reads kv head
    h // (Hq // Hk), nothing repeated. E, Ev in 1..MAX_HEAD_DIM (they may differ). Any
    batch/head/row strides (e.g. a slice of a larger cache); the last dim must have unit stride.
    No copies are made, except of inputs whose rows are not 16-byte aligned (see
    `_aligned_rows`; for a cache that is a copy of the whole cache per call).
    kv_lens: int32 (B,) contiguous, on q's device: row b's keys are cache rows [0, kv_lens[b]),
    0 <= kv_lens[b] <= Tmax. The lengths are only read on the device (a CUDA graph of the call
    stays valid as they change); a length outside that range is clamped into it.
    Causal, bottom-right aligned: query i of row b sees keys j <= kv_lens[b] - Tq + i (the new
    tokens are the last Tq of the row's keys); a query that sees no key gets out = 0.
    scale: multiplies q k^T (1/sqrt(E) for standard attention).

    Returns out (B, Hq, Tq, Ev) contiguous in q's dtype.

    Split-KV (flash-decoding): one program per (batch, kv head, split) holds all Hq / Hk query
    heads of the group and all Tq queries as the rows of its tiles, so every cache byte is read
    once per group; each split walks an equal share of its row's own length, and a second
    kernel merges the splits' outputs by their log-sum-exp. `_splits` (tests only) forces the
    split count the launcher otherwise picks from the shapes and the SM count.
    """
    assert q.dtype in DTYPES, f"q: dtype {q.dtype}, want one of {DTYPES}"
    assert q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4, (
        f"q, k_cache, v_cache must be 4-D (B, heads, rows, dim), got {q.dim()}-D, "
        f"{k_cache.dim()}-D, {v_cache.dim()}-D")
    assert k_cache.device == q.device and v_cache.device == q.device, (
        f"q, k_cache, v_cache on {q.device}, {k_cache.device}, {v_cache.device}")
    B, H, TQ, E = q.shape
    HK, TMAX, EV = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    assert 1 <= E <= MAX_HEAD_DIM and 1 <= EV <= MAX_HEAD_DIM, (
        f"head dims E={E} (q, k_cache), Ev={EV} (v_cache) must be in 1..{MAX_HEAD_DIM}")
    assert HK >= 1 and H % HK == 0, f"q heads {H} must be a multiple of cache heads {HK}"
    assert B <= _MAX_GRID_YZ and HK <= _MAX_GRID_YZ, (
        f"batch {B} and cache heads {HK} must be <= 65535")
    _check_heads("q", q, (B, H, TQ, E), q.dtype)
    _check_heads("k_cache", k_cache, (B, HK, TMAX, E), q.dtype)
    _check_heads("v_cache", v_cache, (B, HK, TMAX, EV), q.dtype)
    assert (kv_lens.dtype == torch.int32 and tuple(kv_lens.shape) == (B,)
            and kv_lens.is_contiguous() and kv_lens.device == q.device), (
        f"kv_lens: {kv_lens.dtype} {tuple(kv_lens.shape)} on {kv_lens.device}, want contiguous "
        f"int32 ({B},) on {q.device}")
    out = torch.empty((B, H, TQ, EV), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if TMAX == 0:
        return out.zero_()
    q, k_cache, v_cache = _aligned_rows(q), _aligned_rows(k_cache), _aligned_rows(v_cache)
    unit = 16 // q.element_size()
    rows = H // HK * TQ  # rows of one (batch, kv head): its query heads x new queries
    block_m = min(_block(rows), _KVCACHE_MAX_BLOCK_M[q.element_size()])
    m_blocks = triton.cdiv(rows, block_m)
    splits = _splits or _kvcache_splits(B * HK * m_blocks, TMAX, q.device)
    with on_device(q):
        if splits > 1:
            part = torch.empty((B * H * TQ, splits, EV), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((B * H * TQ, splits), dtype=torch.float32, device=q.device)
        else:
            part, part_lse = out, out  # the split kernel writes out itself (and no lse)
        _launch(
            _attn_kvcache_split_tuned, (splits * m_blocks, HK, B),
            q, k_cache, v_cache, kv_lens, part, part_lse,
            *_strides(q, unit), *_strides(k_cache, unit), *_strides(v_cache, unit),
            H // HK, TQ, TMAX, splits, m_blocks, scale,
            T_BUCKET=triton.next_power_of_2(TMAX), E=E, EV=EV, IN_UNIT=unit,
            WRITE_LSE=splits > 1, BLOCK_E=_block(E), BLOCK_EV=_block(EV), BLOCK_M=block_m,
            interpreter_config=_KVCACHE_INTERPRETER_CONFIG,
        )
        if splits > 1:
            block_ev = _block(EV)
            _attn_kvcache_combine_kernel[(B * H * TQ,)](
                part, part_lse, out,
                splits,
                EV=EV, BLOCK_EV=block_ev,
                BLOCK_S=min(triton.next_power_of_2(splits), _COMBINE_BLOCK_ELEMS // block_ev),
                num_warps=_COMBINE_WARPS,
            )
    return out
