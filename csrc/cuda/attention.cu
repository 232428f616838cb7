// CUDA scaled dot-product attention, forward and backward, FlashAttention-2 style on the
// tensor cores of sm_80 and newer; the contract is in attention.h, the index arithmetic in
// attention_index.h (checked on the CPU by tests/cpp/attention_index_test.cpp).
//
// Tiles and fragments. Every product is mma.sync.aligned.m16n8k16 (fp16 or bf16 in, fp32
// accumulators), whose operands come from shared memory through ldmatrix.x4 (.trans where the
// tile is stored [k][n]: V in P V; dO and Q in dV += P^T dO, dK += dS^T Q; K in dQ += dS K).
// Each warp owns 16 rows of the tile it accumulates (queries in the forward and dq, keys in
// dk/dv) and computes its 16 x BLOCK scores as C fragments; softmax and the gradient algebra
// run on those registers, and the probabilities (or dS) are rounded to 16 bits and reused in
// place as the A fragments of the next product (the FA2 register trick: C n-blocks 2kk, 2kk+1
// are exactly A k-step kk), so the scores never touch shared memory.
//
// Shared memory. Tiles are rows x D 16-bit elements, D the padded head dim; chunk c (16 bytes)
// of row r is stored at c ^ (r % 8), so the 8 row addresses of every ldmatrix phase fall into
// 8 different bank groups (conflict-free) and cp.async writes stay 16-byte granules. Tiles are
// filled by cp.async.cg 16-byte copies, zero-filled (src-size 0) for rows past L or S and
// columns past E or Ev, so padded rows and columns contribute exact zeros to every product.
// The streamed operand (K and V in the forward and dq; Q, dO, lse and delta in dk/dv) is
// double-buffered: the copy of block i+1 is in flight while block i is computed.
//
// Head dims. E and Ev are padded together to D = 64, 128 or 256 (max of both): one kernel per
// (dtype, D) serves every multiple of 8 up to 256. Products skip the 16-wide k-steps and
// n-blocks past E or Ev at run time (uniform branches in unrolled loops), and tile copies skip
// the chunks that no product reads, so a padded dim costs registers, not tensor-core time.
//
// Kernels (one 1-D grid each; the CTA index is split by block_task: consecutive CTAs take the
// same tile of consecutive (batch, head) slices, most expensive tile first under a causal mask):
//  * attn_fwd_kernel: one CTA per (batch, q head, query block of BM rows). Q in shared memory
//    (and, for D <= 128, copied once into A fragments held in registers); walks the key blocks
//    the block sees from the last (the causal diagonal) to the first, with an online softmax in
//    the log2 domain (scores multiplied by scale * log2 e, so exp is one ex2.approx); only the
//    blocks key_blocks() marks as straddling the mask (diagonal, S tail) evaluate the element
//    mask. Row sums stay per-thread partials until the end. Out is normalised, staged in the
//    Q tile and written with 16-byte stores; lse in natural log (-inf and out = 0 for a row
//    that sees no key: S = 0).
//  * attn_bwd_prep_kernel: delta = rowsum(dO * O) in fp32 and lse2 = lse * log2 e (+inf where
//    lse = -inf, so that the recomputed p = exp2(s - lse2) is 0, not NaN) into the workspace,
//    rows padded per (batch, head) to a multiple of 64 (delta 0, lse2 +inf) so that the
//    backward kernels copy them with cp.async without bounds checks.
//  * attn_bwd_dkdv_kernel: one CTA per (batch, kv head, key block of BN keys); K and V stay in
//    shared memory, dK and dV in registers, while it walks every query head of its GQA group
//    and every query block that sees the key block: S^T = K Q^T, P^T = exp2(S^T - lse2),
//    dP^T = V dO^T, dS^T = P^T (dP^T - delta), dV += P^T dO, dK += dS^T Q (scaled at the end).
//    Every dK/dV element has one writer: no atomics, deterministic.
//  * attn_bwd_dq_kernel: one CTA per (batch, q head, query block), the forward's key walk:
//    S = Q K^T, P, dP = dO V^T, dS, dQ += dS K. Both backward kernels recompute S and dP (7
//    block products per tile pair against 5 with atomics), the price of determinism and of no
//    fp32 dQ buffer.
//
// Tile sizes (BM queries x BN keys, warps) keep every accumulator in registers without spills
// at 255 registers per thread (ptxas -v, CUDA 13.0, sm_80 and sm_90a; numbers in the configs
// below): a warp holds 16 x D fp32 accumulators (D / 2 registers per thread, two per 16 x D
// output in dk/dv) plus two 16 x BLOCK score tiles in the backward. At D = 256, dk/dv splits
// the columns of dK and dV over two warps per 16 keys (both compute the same scores: 1.5x the
// tensor-core work of that kernel, which a single 16 x 256 x 2 accumulator set cannot avoid in
// 255 registers).
//
// Instantiations: 3 head dims x 2 dtypes x 3 kernels + 2 prep kernels. The causal mask is a
// run-time flag: it only changes loop bounds and the element test of the blocks that take the
// masked path, both uniform per CTA. As a template parameter it cost 43 -> 53 s of nvcc time
// per SASS target (sm_80, this 2-core machine, other jobs running), about a minute over the
// test suite's 6 targets + PTX, for a few registers (ptxas: 2-11 fewer per kernel).
#include "cuda/attention.h"
#include "cuda/attention_index.h"
#include "cuda/device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastgpt {
namespace cuda {
namespace {

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// Rows of the workspace's delta / lse2 per (batch, head) are padded to a multiple of this: the
// query block of the dQ kernel (that of dK/dV divides it), so no query block of the backward
// reads past its own slice.
constexpr int64_t kLsePad = 64;

// ---------------------------------------------------------------------------------------
// Configurations. kWarps warps of 16 rows each (times kColSplit in dk/dv); smem in bytes.
// Registers per thread from ptxas -v (CUDA 13.0, sm_80 / sm_86 / sm_90 / sm_90a / sm_100 /
// sm_120, fp16 and bf16 alike), none spilling, are given with each config; sm_100 and sm_120
// take the most (their scheduler hoists more ldmatrix loads).

// Forward: D = 64 and 128 take 128 queries (8 warps) per CTA, so K/V traffic per query halves
// against 64; D = 256 takes 64 queries (4 warps) and 32-key blocks: its 16 x 256 output
// accumulator alone is 128 registers, and Q is read from shared memory per k-step instead of
// being held (another 64 registers).
template <int D>
struct FwdCfg {
  static constexpr int kWarps = D <= 128 ? 8 : 4;
  static constexpr int kBM = 16 * kWarps;
  static constexpr int kBN = D <= 128 ? 64 : 32;
  static constexpr bool kQInRegs = D <= 128;
  // Q, 2 x K, 2 x V: 48 KiB at D = 64, 96 KiB at 128 and 256. Registers: D = 64 138-207,
  // 128 196-255, 256 219-250.
  static constexpr int kSmem = 2 * D * (kBM + 4 * kBN);
};

// dK/dV: 64 keys per CTA (4 warps of 16 keys) and query blocks of 32: a warp holds two 16 x 32
// fp32 score tiles (S^T, dP^T) beside its 16 x D dK and dV accumulators. Query blocks of 64
// at D = 64 took 216-250 registers on sm_80-sm_100 but spilled 8 bytes on sm_120 (255). D = 256
// splits dK/dV columns over two warps per 16 keys and takes 32 keys per CTA, so that K, V and
// the double-buffered Q and dO fit the 99 KiB an sm_86/89/120 block may use.
template <int D>
struct DkdvCfg {
  static constexpr int kRowWarps = D == 256 ? 2 : 4;
  static constexpr int kColSplit = D == 256 ? 2 : 1;
  static constexpr int kWarps = kRowWarps * kColSplit;
  static constexpr int kBN = 16 * kRowWarps;
  static constexpr int kBM = 32;
  static constexpr int kSlice = D / kColSplit;  // dK / dV columns per warp
  // K, V, 2 x Q, 2 x dO, 2 x (lse2, delta): 32.5 KiB at D = 64, 64.5 at 128, 96.5 at 256.
  // Registers: D = 64 162-250, 128 236-246, 256 236-250.
  static constexpr int kSmem = 2 * D * (2 * kBN + 4 * kBM) + 2 * 2 * kBM * 4;
};

// dQ: 64 queries (4 warps); 64-key blocks, 16 at D = 256 (its dQ accumulator is 128 registers,
// and Q, dO and the double-buffered K and V must fit 99 KiB: 96 KiB with 16 keys).
template <int D>
struct DqCfg {
  static constexpr int kWarps = 4;
  static constexpr int kBM = 16 * kWarps;
  static constexpr int kBN = D <= 128 ? 64 : 16;
  // Q, dO, 2 x K, 2 x V: 48 KiB at D = 64, 96 KiB at 128 and 256. Registers: D = 64 178-206,
  // 128 226-254, 256 206-240.
  static constexpr int kSmem = 2 * D * (2 * kBM + 4 * kBN);
};

// ---------------------------------------------------------------------------------------
// Math.

// 2^x; ex2.approx gives 0 for -inf (masked scores) and has 2 ulp error, well below the 16-bit
// rounding of p that follows.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------
// Tiles.

// Byte address of element (row, col) of a swizzled tile of D columns; col a multiple of 8.
template <int D>
__device__ __forceinline__ uint32_t tile_addr(uint32_t base, int row, int col) {
  return base + 2u * static_cast<uint32_t>(tile_offset(row, col >> 3, D / 8));
}

// Copies rows [0, kRows) x chunks [0, fill) of a tile from global rows at `src` (row stride
// in elements); rows >= rows and chunks >= chunks are zero-filled, chunks >= fill (never read
// by a product) are skipped. All kThreads threads of the CTA take part.
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int64_t stride, int rows,
                                          int chunks, int fill) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "tile copy must split evenly");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    if (c < fill) {
      const bool ok = r < rows && c < chunks;
      cp_async16(dst + 2u * static_cast<uint32_t>(tile_offset(r, c, kChunks)),
                 ok ? src + r * stride + c * 8 : src, ok ? 16 : 0);
    }
  }
}

// Stores rows [0, rows) x chunks [0, chunks) of a swizzled shared tile to contiguous global
// rows of `ld` elements, 16 bytes per access.
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T* dst, int64_t ld, const T* tile, int rows,
                                           int chunks) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < (kRows * kChunks + kThreads - 1) / kThreads; ++it) {
    const int idx = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = idx % kChunks;
    if (idx < kRows * kChunks && r < rows && c < chunks) {
      *reinterpret_cast<uint4*>(dst + r * ld + c * 8) =
          *reinterpret_cast<const uint4*>(tile + tile_offset(r, c, kChunks));
    }
  }
}

// Writes a warp's 16 x (8 * kNb) fp32 accumulator block (C fragments, columns from col0),
// times `mul`, into rows row0.. of a swizzled tile.
template <int D, int kNb, typename T>
__device__ __forceinline__ void stage_acc(T* tile, const float (&acc)[kNb][4], int row0,
                                          int col0, float mul) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const RowCol rc = mma_c_coord(lane, 2 * half);
      *reinterpret_cast<uint32_t*>(
          tile + tile_elem_offset(row0 + rc.row, col0 + 8 * nb + rc.col, D / 8)) =
          pack2<T>(acc[nb][2 * half] * mul, acc[nb][2 * half + 1] * mul);
    }
  }
}

// acc (16 x 8 kNb, C fragments) += A (16 x 16 k-steps from rows row0.. of tile `a`) times
// B^T, B the [n][k] tile `b` (rows 0 .. 8 kNb - 1): the Q K^T shape. k-steps at or past
// `k_valid` columns are skipped (zero padding).
template <typename T, int D, int kNb, bool kARegs>
__device__ __forceinline__ void mma_abt(float (&acc)[kNb][4], uint32_t a, int row0,
                                        const uint32_t (*a_regs)[4], uint32_t b, int k_valid) {
  static_assert(kNb % 2 == 0, "n-blocks come in pairs (one ldmatrix.x4)");
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const RowCol la = ldsm_a_lane(lane), lb = ldsm_b_lane(lane);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    if (kk * 16 < k_valid) {
      uint32_t af[4];
      if constexpr (kARegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) af[r] = a_regs[kk][r];
      } else {
        ldmatrix_x4<false>(af, tile_addr<D>(a, row0 + la.row, kk * 16 + la.col));
      }
#pragma unroll
      for (int nb2 = 0; nb2 < kNb / 2; ++nb2) {
        uint32_t bf[4];
        ldmatrix_x4<false>(bf, tile_addr<D>(b, nb2 * 16 + lb.row, kk * 16 + lb.col));
        mma_16816<T>(acc[2 * nb2], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * nb2 + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// acc (16 x 8 kNb, columns col0..) += P (16 x 16 kKs, C fragments rounded to T, as A) times the
// [k][n] tile `b` (rows 0.. 16 kKs, read with .trans): the P V shape. n-blocks at or past
// `n_valid` columns are skipped.
template <typename T, int D, int kNb, int kKs>
__device__ __forceinline__ void mma_pb(float (&acc)[kNb][4], const float (&p)[2 * kKs][4],
                                       uint32_t b, int col0, int n_valid) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const RowCol la = ldsm_a_lane(lane);
#pragma unroll
  for (int kk = 0; kk < kKs; ++kk) {
    uint32_t pa[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float* c = p[2 * kk + c_to_a_nblock(r)] + 2 * c_to_a_pair(r);
      pa[r] = pack2<T>(c[0], c[1]);
    }
#pragma unroll
    for (int nb2 = 0; nb2 < kNb / 2; ++nb2) {
      if (col0 + nb2 * 16 < n_valid) {
        uint32_t bf[4];
        ldmatrix_x4<true>(bf, tile_addr<D>(b, kk * 16 + la.row, col0 + nb2 * 16 + la.col));
        mma_16816<T>(acc[2 * nb2], pa, bf[0], bf[1]);
        mma_16816<T>(acc[2 * nb2 + 1], pa, bf[2], bf[3]);
      }
    }
  }
}

// The rows/columns each launch works on.
struct Problem {
  int64_t batch, q_heads, kv_heads, L, S, group;
  int E, Ev;
  bool causal;
  float scale, scale_log2;
};

// ---------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct FwdArgs {
  const T *q, *k, *v;
  RowStrides qs, ks, vs;
  T* out;
  float* lse;
  int64_t q_blocks;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdCfg<D>::kWarps* kWarp, 1)
    attn_fwd_kernel(const Problem pb, const FwdArgs<T> a) {
  using C = FwdCfg<D>;
  constexpr int kThreads = C::kWarps * kWarp, kBM = C::kBM, kBN = C::kBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const sq = reinterpret_cast<T*>(smem);
  const uint32_t q_base = smem_addr(sq);
  const uint32_t k_base = q_base + 2u * kBM * D;
  const uint32_t v_base = k_base + 2u * 2 * kBN * D;
  constexpr uint32_t kKvStage = 2u * kBN * D;

  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const BlockTask task = block_task(blockIdx.x, pb.batch * pb.q_heads, a.q_blocks, true);
  const int64_t b = task.slice / pb.q_heads, h = task.slice % pb.q_heads, g = h / pb.group;
  const int64_t m0 = task.block * kBM;
  const int rows = static_cast<int>(min64(kBM, pb.L - m0));
  const T* const k = a.k + b * a.ks.batch + g * a.ks.head;
  const T* const v = a.v + b * a.vs.batch + g * a.vs.head;
  const int ek = pb.E / 8, evk = pb.Ev / 8;                 // valid chunks
  const int ef = static_cast<int>(ceil_div(pb.E, 16)) * 2;  // chunks the products read
  const int evf = static_cast<int>(ceil_div(pb.Ev, 16)) * 2;

  load_tile<kBM, D, kThreads>(q_base, a.q + b * a.qs.batch + h * a.qs.head + m0 * a.qs.row,
                              a.qs.row, rows, ek, ef);
  const KeyBlocks kbs = key_blocks(m0, rows, kBN, pb.S, pb.causal);
  const auto load_kv = [&](int64_t kb, int stage) {
    const int64_t n0 = kb * kBN;
    const int keys = static_cast<int>(min64(kBN, pb.S - n0));
    load_tile<kBN, D, kThreads>(k_base + stage * kKvStage, k + n0 * a.ks.row, a.ks.row, keys, ek,
                                ef);
    load_tile<kBN, D, kThreads>(v_base + stage * kKvStage, v + n0 * a.vs.row, a.vs.row, keys,
                                evk, evf);
  };
  if (kbs.end > 0) load_kv(kbs.end - 1, 0);
  cp_async_commit();

  float o[D / 8][4] = {};
  float m_run[2] = {-kInf, -kInf};  // running row max (log2 units): rows group, group + 8
  float l_run[2] = {0.f, 0.f};      // this thread's share of the running row sum
  uint32_t qf[C::kQInRegs ? D / 16 : 1][4];
  const int row0 = warp * 16;

  for (int64_t it = 0; it < kbs.end; ++it) {
    const int64_t kb = kbs.end - 1 - it;  // diagonal (masked) blocks first
    const int stage = static_cast<int>(it & 1);
    if (it + 1 < kbs.end) {
      load_kv(kb - 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (C::kQInRegs) {
      if (it == 0) {
        const RowCol la = ldsm_a_lane(lane);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          if (kk * 16 < pb.E) {
            ldmatrix_x4<false>(qf[kk], tile_addr<D>(q_base, row0 + la.row, kk * 16 + la.col));
          }
        }
      }
    }
    float s[kBN / 8][4] = {};
    mma_abt<T, D, kBN / 8, C::kQInRegs>(s, q_base, row0, qf, k_base + stage * kKvStage, pb.E);

    const bool masked = kb >= kbs.unmasked;
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nb][i] *= pb.scale_log2;
        if (masked) {
          const RowCol rc = mma_c_coord(lane, i);
          if (!visible(m0 + row0 + rc.row, kb * kBN + nb * 8 + rc.col, pb.S, pb.causal)) {
            s[nb][i] = -kInf;
          }
        }
      }
    }
    // Online softmax; a row's 16 x kBN scores are spread over the 4 lanes of its quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with no visible key yet keeps max -inf; it subtracts 0 so that its p and its
      // correction are exp2(-inf) = 0, not exp2(-inf + inf) = NaN.
      const float ref = mx == -kInf ? 0.f : mx;
      const float corr = exp2_approx(m_run[r] - ref);
      m_run[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
        s[nb][2 * r] = exp2_approx(s[nb][2 * r] - ref);
        s[nb][2 * r + 1] = exp2_approx(s[nb][2 * r + 1] - ref);
        sum += s[nb][2 * r] + s[nb][2 * r + 1];
      }
      l_run[r] = l_run[r] * corr + sum;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        o[nb][2 * r] *= corr;
        o[nb][2 * r + 1] *= corr;
      }
    }
    mma_pb<T, D, D / 8, kBN / 16>(o, s, v_base + stage * kKvStage, 0, pb.Ev);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  cp_async_wait<0>();  // S = 0: the Q copy may still be in flight
  __syncthreads();
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int64_t i = m0 + row0 + (lane >> 2) + 8 * r;
    if (lane % 4 == 0 && i < pb.L) {
      a.lse[task.slice * pb.L + i] = l > 0.f ? (m_run[r] + __log2f(l)) * kLn2 : -kInf;
    }
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[nb][i] *= inv[i >> 1];
  }
  stage_acc<D>(sq, o, row0, 0, 1.f);
  __syncthreads();
  store_tile<kBM, D, kThreads>(a.out + (task.slice * pb.L + m0) * pb.Ev, pb.Ev, sq, rows, evk);
}

// ---------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdArgs {
  const T *q, *k, *v, *out, *dout;
  RowStrides qs, ks, vs, os, dos;
  const float* lse;
  T *dq, *dk, *dv;
  float* delta;  // workspace: (B, Hq, Lpad) delta, then the same for lse2
  float* lse2;
  int64_t l_pad, blocks;
};

// Workspace rows (b, h, i), i < Lpad: delta = sum(dO * O) and lse2 = lse * log2 e. A row of
// Ev / 8 16-byte chunks (at most 32: Ev <= 256) takes the smallest power-of-2 group of lanes
// that gives each lane at most one chunk, so a warp handles 32 / group rows at once (4 at
// Ev = 64, where a warp per row would leave 24 lanes idle).
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_prep_kernel(const Problem pb, const BwdArgs<T> a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int chunks = pb.Ev / 8;
  const int group = lanes_per_row(chunks);
  const int sub = lane / group, c = lane % group;
  const int64_t rows_per_warp = kWarp / group;
  const int64_t total = pb.batch * pb.q_heads * a.l_pad;
  const int64_t warp =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp) * rows_per_warp;
  for (int64_t base = warp * rows_per_warp; base < total; base += stride) {  // warp-uniform
    const int64_t row = base + sub;
    const int64_t bh = row / a.l_pad, i = row % a.l_pad;
    const bool live = row < total && i < pb.L;
    float sum = 0.f;
    if (live && c < chunks) {
      const int64_t b = bh / pb.q_heads, h = bh % pb.q_heads;
      const uint4 dv = *reinterpret_cast<const uint4*>(
          a.dout + b * a.dos.batch + h * a.dos.head + i * a.dos.row + 8 * c);
      const uint4 ov = *reinterpret_cast<const uint4*>(
          a.out + b * a.os.batch + h * a.os.head + i * a.os.row + 8 * c);
      const uint32_t dw[4] = {dv.x, dv.y, dv.z, dv.w}, ow[4] = {ov.x, ov.y, ov.z, ov.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 df = unpack2<T>(dw[j]), of = unpack2<T>(ow[j]);
        sum = fmaf(df.x, of.x, sum);
        sum = fmaf(df.y, of.y, sum);
      }
    }
    for (int off = group / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (c == 0 && row < total) {
      const float lse = live ? a.lse[bh * pb.L + i] : -kInf;
      a.delta[row] = sum;
      a.lse2[row] = lse == -kInf ? kInf : lse * kLog2e;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DkdvCfg<D>::kWarps* kWarp, 1)
    attn_bwd_dkdv_kernel(const Problem pb, const BwdArgs<T> a) {
  using C = DkdvCfg<D>;
  constexpr int kThreads = C::kWarps * kWarp, kBM = C::kBM, kBN = C::kBN, kSlice = C::kSlice;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const sk = reinterpret_cast<T*>(smem);
  T* const sv = sk + kBN * D;
  const uint32_t k_base = smem_addr(sk), v_base = smem_addr(sv);
  const uint32_t q_base = v_base + 2u * kBN * D;
  const uint32_t do_base = q_base + 2u * 2 * kBM * D;
  constexpr uint32_t kQStage = 2u * kBM * D;
  float* const s_stats = reinterpret_cast<float*>(smem + 2 * D * (2 * kBN + 4 * kBM));
  // s_stats: stage s holds lse2 at [2 s kBM, ..) and delta at [(2 s + 1) kBM, ..).

  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int row0 = (warp % C::kRowWarps) * 16;    // this warp's keys
  const int col0 = (warp / C::kRowWarps) * kSlice;  // and dK / dV columns
  const BlockTask task = block_task(blockIdx.x, pb.batch * pb.kv_heads, a.blocks, false);
  const int64_t b = task.slice / pb.kv_heads, g = task.slice % pb.kv_heads;
  const int64_t n0 = task.block * kBN;
  const int keys = static_cast<int>(min64(kBN, pb.S - n0));
  const int ek = pb.E / 8, evk = pb.Ev / 8;
  const int ef = static_cast<int>(ceil_div(pb.E, 16)) * 2;
  const int evf = static_cast<int>(ceil_div(pb.Ev, 16)) * 2;

  load_tile<kBN, D, kThreads>(k_base, a.k + b * a.ks.batch + g * a.ks.head + n0 * a.ks.row,
                              a.ks.row, keys, ek, ef);
  load_tile<kBN, D, kThreads>(v_base, a.v + b * a.vs.batch + g * a.vs.head + n0 * a.vs.row,
                              a.vs.row, keys, evk, evf);
  const QueryBlocks qbs = query_blocks(n0, keys, kBM, pb.L, pb.causal);
  const int64_t per_head = qbs.end - qbs.begin;
  const int64_t steps = per_head * pb.group;
  // Step t: query head g * group + t / per_head, query block begin + t % per_head.
  const auto load_q = [&](int64_t t, int stage) {
    const int64_t h = g * pb.group + t / per_head;
    const int64_t m0 = (qbs.begin + t % per_head) * kBM;
    const int rows = static_cast<int>(min64(kBM, pb.L - m0));
    load_tile<kBM, D, kThreads>(q_base + stage * kQStage,
                                a.q + b * a.qs.batch + h * a.qs.head + m0 * a.qs.row, a.qs.row,
                                rows, ek, ef);
    load_tile<kBM, D, kThreads>(do_base + stage * kQStage,
                                a.dout + b * a.dos.batch + h * a.dos.head + m0 * a.dos.row,
                                a.dos.row, rows, evk, evf);
    const int64_t ws = (b * pb.q_heads + h) * a.l_pad + m0;  // padded: always whole chunks
    const int tid = static_cast<int>(threadIdx.x);
    if (tid < 2 * (kBM / 4)) {
      const int which = tid / (kBM / 4), c = tid % (kBM / 4);
      const float* src = (which == 0 ? a.lse2 : a.delta) + ws + 4 * c;
      cp_async16(smem_addr(s_stats + (2 * stage + which) * kBM + 4 * c), src, 16);
    }
  };
  if (steps > 0) load_q(0, 0);
  cp_async_commit();

  float dk[kSlice / 8][4] = {}, dv[kSlice / 8][4] = {};
  for (int64_t t = 0; t < steps; ++t) {
    const int stage = static_cast<int>(t & 1);
    if (t + 1 < steps) {
      load_q(t + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t qb = qbs.begin + t % per_head;
    const int64_t m0 = qb * kBM;
    const uint32_t qs = q_base + stage * kQStage, dos = do_base + stage * kQStage;
    const float* lse2 = s_stats + 2 * stage * kBM;
    const float* delta = lse2 + kBM;

    float st[kBM / 8][4] = {};  // S^T: this warp's 16 keys x kBM queries
    mma_abt<T, D, kBM / 8, false>(st, k_base, row0, nullptr, qs, pb.E);
    float dpt[kBM / 8][4] = {};  // dP^T = V dO^T
    mma_abt<T, D, kBM / 8, false>(dpt, v_base, row0, nullptr, dos, pb.Ev);
    const bool masked = qb < qbs.masked_end;
#pragma unroll
    for (int nb = 0; nb < kBM / 8; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        const int qi = nb * 8 + rc.col;
        float p = exp2_approx(fmaf(st[nb][i], pb.scale_log2, -lse2[qi]));
        if (masked && !visible(m0 + qi, n0 + row0 + rc.row, pb.S, pb.causal)) p = 0.f;
        st[nb][i] = p;
        dpt[nb][i] = p * (dpt[nb][i] - delta[qi]);  // dS^T
      }
    }
    mma_pb<T, D, kSlice / 8, kBM / 16>(dv, st, dos, col0, pb.Ev);
    mma_pb<T, D, kSlice / 8, kBM / 16>(dk, dpt, qs, col0, pb.E);
    __syncthreads();
  }

  cp_async_wait<0>();
  __syncthreads();  // K and V tiles are free for staging
  stage_acc<D>(sk, dk, row0, col0, pb.scale);
  stage_acc<D>(sv, dv, row0, col0, 1.f);
  __syncthreads();
  const int64_t out_row = task.slice * pb.S + n0;
  store_tile<kBN, D, kThreads>(a.dk + out_row * pb.E, pb.E, sk, keys, ek);
  store_tile<kBN, D, kThreads>(a.dv + out_row * pb.Ev, pb.Ev, sv, keys, evk);
}

template <typename T, int D>
__global__ void __launch_bounds__(DqCfg<D>::kWarps* kWarp, 1)
    attn_bwd_dq_kernel(const Problem pb, const BwdArgs<T> a) {
  using C = DqCfg<D>;
  constexpr int kThreads = C::kWarps * kWarp, kBM = C::kBM, kBN = C::kBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const sq = reinterpret_cast<T*>(smem);
  const uint32_t q_base = smem_addr(sq);
  const uint32_t do_base = q_base + 2u * kBM * D;
  const uint32_t k_base = do_base + 2u * kBM * D;
  const uint32_t v_base = k_base + 2u * 2 * kBN * D;
  constexpr uint32_t kKvStage = 2u * kBN * D;

  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const BlockTask task = block_task(blockIdx.x, pb.batch * pb.q_heads, a.blocks, true);
  const int64_t b = task.slice / pb.q_heads, h = task.slice % pb.q_heads, g = h / pb.group;
  const int64_t m0 = task.block * kBM;
  const int rows = static_cast<int>(min64(kBM, pb.L - m0));
  const T* const k = a.k + b * a.ks.batch + g * a.ks.head;
  const T* const v = a.v + b * a.vs.batch + g * a.vs.head;
  const int ek = pb.E / 8, evk = pb.Ev / 8;
  const int ef = static_cast<int>(ceil_div(pb.E, 16)) * 2;
  const int evf = static_cast<int>(ceil_div(pb.Ev, 16)) * 2;
  const int row0 = warp * 16;

  load_tile<kBM, D, kThreads>(q_base, a.q + b * a.qs.batch + h * a.qs.head + m0 * a.qs.row,
                              a.qs.row, rows, ek, ef);
  load_tile<kBM, D, kThreads>(do_base,
                              a.dout + b * a.dos.batch + h * a.dos.head + m0 * a.dos.row,
                              a.dos.row, rows, evk, evf);
  const KeyBlocks kbs = key_blocks(m0, rows, kBN, pb.S, pb.causal);
  const auto load_kv = [&](int64_t kb, int stage) {
    const int64_t n0 = kb * kBN;
    const int keys = static_cast<int>(min64(kBN, pb.S - n0));
    load_tile<kBN, D, kThreads>(k_base + stage * kKvStage, k + n0 * a.ks.row, a.ks.row, keys, ek,
                                ef);
    load_tile<kBN, D, kThreads>(v_base + stage * kKvStage, v + n0 * a.vs.row, a.vs.row, keys,
                                evk, evf);
  };
  if (kbs.end > 0) load_kv(kbs.end - 1, 0);
  cp_async_commit();

  // This thread's two rows: lse2 and delta from the padded workspace (always in range).
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t ws = task.slice * a.l_pad + m0 + row0 + (lane >> 2) + 8 * r;
    lse2[r] = a.lse2[ws];
    delta[r] = a.delta[ws];
  }

  float dq[D / 8][4] = {};
  for (int64_t it = 0; it < kbs.end; ++it) {
    const int64_t kb = kbs.end - 1 - it;
    const int stage = static_cast<int>(it & 1);
    if (it + 1 < kbs.end) {
      load_kv(kb - 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint32_t ks = k_base + stage * kKvStage, vs = v_base + stage * kKvStage;
    float s[kBN / 8][4] = {};
    mma_abt<T, D, kBN / 8, false>(s, q_base, row0, nullptr, ks, pb.E);
    float dp[kBN / 8][4] = {};
    mma_abt<T, D, kBN / 8, false>(dp, do_base, row0, nullptr, vs, pb.Ev);
    const bool masked = kb >= kbs.unmasked;
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        float p = exp2_approx(fmaf(s[nb][i], pb.scale_log2, -lse2[i >> 1]));
        if (masked && !visible(m0 + row0 + rc.row, kb * kBN + nb * 8 + rc.col, pb.S, pb.causal)) {
          p = 0.f;
        }
        dp[nb][i] = p * (dp[nb][i] - delta[i >> 1]);  // dS
      }
    }
    mma_pb<T, D, D / 8, kBN / 16>(dq, dp, ks, 0, pb.E);
    __syncthreads();
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_acc<D>(sq, dq, row0, 0, pb.scale);
  __syncthreads();
  store_tile<kBM, D, kThreads>(a.dq + (task.slice * pb.L + m0) * pb.E, pb.E, sq, rows, ek);
}

// ---------------------------------------------------------------------------------------
// Host side.

bool rows_aligned(const RowStrides& s) {
  return s.batch % kAttentionDimMultiple == 0 && s.head % kAttentionDimMultiple == 0 &&
         s.row % kAttentionDimMultiple == 0;
}

// Shape checks shared by forward and backward; fills the Problem.
cudaError_t make_problem(const AttentionShape& sh, const AttentionMask& mask, float scale,
                         Problem* pb) {
  if (sh.batch < 0 || sh.q_heads < 0 || sh.kv_heads < 0 || sh.q_len < 0 || sh.kv_len < 0 ||
      sh.qk_dim < 1 || sh.v_dim < 1 || sh.qk_dim > kAttentionMaxHeadDim ||
      sh.v_dim > kAttentionMaxHeadDim || sh.qk_dim % kAttentionDimMultiple != 0 ||
      sh.v_dim % kAttentionDimMultiple != 0 || (sh.q_heads > 0 && sh.kv_heads == 0) ||
      (sh.kv_heads > 0 && sh.q_heads % sh.kv_heads != 0)) {
    return cudaErrorInvalidValue;
  }
  *pb = Problem{sh.batch, sh.q_heads, sh.kv_heads, sh.q_len, sh.kv_len,
                sh.kv_heads > 0 ? sh.q_heads / sh.kv_heads : 0,
                static_cast<int>(sh.qk_dim), static_cast<int>(sh.v_dim), mask.causal,
                scale, scale * kLog2e};
  return cudaSuccess;
}

// A 1-D grid of `ctas` CTAs (gridDim.x holds up to 2^31 - 1).
cudaError_t grid_of(int64_t ctas, unsigned* grid) {
  if (ctas > 0x7fffffff) return cudaErrorInvalidValue;
  *grid = static_cast<unsigned>(ctas);
  return cudaSuccess;
}

// Dynamic shared memory above 48 KiB must be opted into per kernel; a block may use up to
// 163 KiB on sm_80, 99 KiB on sm_86/89/120 and 227 KiB on sm_90/100. Every config stays within
// 99 KiB (kMaxSmemBytes, checked at compile time), so each runs on every target; the configs
// above 48 KiB (D = 128 and 256 of all three tile kernels) set the attribute on every launch:
// a host-side call, which spares a per-device cache of what was set.
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, int bytes) {
  if (bytes <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D>
cudaError_t launch_fwd(const Problem& pb, FwdArgs<T> a, cudaStream_t stream) {
  using C = FwdCfg<D>;
  static_assert(C::kSmem <= kMaxSmemBytes, "forward tiles exceed the smem budget");
  a.q_blocks = ceil_div(pb.L, C::kBM);
  unsigned grid = 0;
  if (cudaError_t err = grid_of(a.q_blocks * pb.batch * pb.q_heads, &grid)) return err;
  if (cudaError_t err = prepare_smem(attn_fwd_kernel<T, D>, C::kSmem)) return err;
  attn_fwd_kernel<T, D><<<grid, C::kWarps * kWarp, C::kSmem, stream>>>(pb, a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const Problem& pb, BwdArgs<T> a, cudaStream_t stream) {
  using K = DkdvCfg<D>;
  using Q = DqCfg<D>;
  static_assert(K::kSmem <= kMaxSmemBytes && Q::kSmem <= kMaxSmemBytes,
                "backward tiles exceed the smem budget");
  static_assert(K::kBM <= kLsePad && Q::kBM <= kLsePad && kLsePad % K::kBM == 0 &&
                    kLsePad % Q::kBM == 0,
                "query blocks must tile the padded workspace rows");
  const int64_t rows = pb.batch * pb.q_heads * pb.L;
  if (rows > 0) {
    constexpr int kPrepThreads = 256;
    const int64_t ws_rows = pb.batch * pb.q_heads * a.l_pad;
    const int64_t rows_per_cta = kPrepThreads / kWarp * (kWarp / lanes_per_row(pb.Ev / 8));
    const int64_t ctas = min64(ceil_div(ws_rows, rows_per_cta), int64_t(1) << 20);
    attn_bwd_prep_kernel<T><<<static_cast<unsigned>(ctas), kPrepThreads, 0, stream>>>(pb, a);
    if (cudaError_t err = cudaGetLastError()) return err;
    a.blocks = ceil_div(pb.L, Q::kBM);
    unsigned grid = 0;
    if (cudaError_t err = grid_of(a.blocks * pb.batch * pb.q_heads, &grid)) return err;
    if (cudaError_t err = prepare_smem(attn_bwd_dq_kernel<T, D>, Q::kSmem)) return err;
    attn_bwd_dq_kernel<T, D><<<grid, Q::kWarps * kWarp, Q::kSmem, stream>>>(pb, a);
    if (cudaError_t err = cudaGetLastError()) return err;
  }
  if (pb.batch * pb.kv_heads * pb.S > 0) {
    a.blocks = ceil_div(pb.S, K::kBN);
    unsigned grid = 0;
    if (cudaError_t err = grid_of(a.blocks * pb.batch * pb.kv_heads, &grid)) return err;
    if (cudaError_t err = prepare_smem(attn_bwd_dkdv_kernel<T, D>, K::kSmem)) return err;
    attn_bwd_dkdv_kernel<T, D><<<grid, K::kWarps * kWarp, K::kSmem, stream>>>(pb, a);
  }
  return cudaGetLastError();
}

// Calls f(T{}, Dim<D>{}) for the element type T and the padded head dim D.
template <int D>
struct Dim {
  static constexpr int value = D;
};
template <typename F>
cudaError_t dispatch(DType dtype, int64_t E, int64_t Ev, F&& f) {
  const int d = padded_head_dim(E > Ev ? E : Ev);
  const auto with_dim = [&](auto t) -> cudaError_t {
    switch (d) {
      case 64: return f(t, Dim<64>{});
      case 128: return f(t, Dim<128>{});
      case 256: return f(t, Dim<256>{});
      default: return cudaErrorInvalidValue;
    }
  };
  switch (dtype) {
    case DType::kFloat16: return with_dim(__half{});
    case DType::kBFloat16: return with_dim(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_fwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                          float scale,
                          const void* q, const RowStrides& q_strides,
                          const void* k, const RowStrides& k_strides,
                          const void* v, const RowStrides& v_strides,
                          void* out, float* lse, cudaStream_t stream) {
  Problem pb;
  if (cudaError_t err = make_problem(shape, mask, scale, &pb)) return err;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) ||
      !rows_aligned(q_strides) || !rows_aligned(k_strides) || !rows_aligned(v_strides)) {
    return cudaErrorInvalidValue;
  }
  return dispatch(dtype, pb.E, pb.Ev, [&](auto t, auto dim) -> cudaError_t {
    using T = decltype(t);
    if (pb.batch == 0 || pb.q_heads == 0 || pb.L == 0) return cudaSuccess;
    const FwdArgs<T> a{static_cast<const T*>(q), static_cast<const T*>(k),
                       static_cast<const T*>(v), q_strides, k_strides, v_strides,
                       static_cast<T*>(out), lse, 0};
    return launch_fwd<T, decltype(dim)::value>(pb, a, stream);
  });
}

size_t attention_bwd_workspace_bytes(const AttentionShape& shape) {
  if (shape.batch <= 0 || shape.q_heads <= 0 || shape.q_len <= 0) return 0;
  const int64_t l_pad = ceil_div(shape.q_len, kLsePad) * kLsePad;
  return static_cast<size_t>(2 * shape.batch * shape.q_heads * l_pad) * sizeof(float);
}

cudaError_t attention_bwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                          float scale,
                          const void* dout, const RowStrides& dout_strides,
                          const void* q, const RowStrides& q_strides,
                          const void* k, const RowStrides& k_strides,
                          const void* v, const RowStrides& v_strides,
                          const void* out, const RowStrides& out_strides,
                          const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream) {
  Problem pb;
  if (cudaError_t err = make_problem(shape, mask, scale, &pb)) return err;
  if (!aligned16(dout) || !aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) ||
      !aligned16(dq) || !aligned16(dk) || !aligned16(dv) || !aligned16(workspace) ||
      !rows_aligned(dout_strides) || !rows_aligned(q_strides) || !rows_aligned(k_strides) ||
      !rows_aligned(v_strides) || !rows_aligned(out_strides) ||
      (attention_bwd_workspace_bytes(shape) > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch(dtype, pb.E, pb.Ev, [&](auto t, auto dim) -> cudaError_t {
    using T = decltype(t);
    if (pb.batch == 0) return cudaSuccess;
    const int64_t l_pad = ceil_div(pb.L, kLsePad) * kLsePad;
    float* const ws = static_cast<float*>(workspace);
    const BwdArgs<T> a{static_cast<const T*>(q), static_cast<const T*>(k),
                       static_cast<const T*>(v), static_cast<const T*>(out),
                       static_cast<const T*>(dout), q_strides, k_strides, v_strides,
                       out_strides, dout_strides, lse, static_cast<T*>(dq),
                       static_cast<T*>(dk), static_cast<T*>(dv), ws,
                       ws == nullptr ? nullptr : ws + pb.batch * pb.q_heads * l_pad, l_pad, 0};
    return launch_bwd<T, decltype(dim)::value>(pb, a, stream);
  });
}

}  // namespace cuda
}  // namespace fastgpt
