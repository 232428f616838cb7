// CUDA GEMM with fused epilogue (fastgpt.linear / fastgpt.matmul) and the epilogue's backward,
// on the tensor cores of sm_80 and newer; the contract is in linear.h, the index arithmetic in
// linear_index.h (checked on the CPU by tests/cpp/linear_index_test.cpp).
//
// Products. Every product is mma.sync.aligned.m16n8k16.row.col (fp16 or bf16 in, fp32
// accumulators) whose operands come from shared memory through ldmatrix.x4: without .trans for
// a K-major stage (A K-contiguous: activations; B K-contiguous: nn.Linear's weight (N, K)), with
// .trans for an MN-major one (A M-contiguous: dz^T in the weight gradient; B N-contiguous: W in
// dx = dz @ W and torch.matmul's right operand). The stage is copied in the operand's own layout
// (no transposes through registers), so all four (A, B) layout pairs are one kernel template.
//
// Tiles (CTA BM x BN x BK, warps WM x WN, each warp (BM / WM) x (BN / WN) of accumulators):
//  * large 128 x 128 x 32, 8 warps 2 x 4, warp tile 64 x 32 (64 fp32 accumulators per thread),
//    4 stages of 16 KiB; 68 KiB of dynamic shared memory (the staged fp32 C tile, 128 x 136
//    floats, is the larger use), hence the cudaFuncSetAttribute; 2 CTAs per SM (128 registers);
//    a k16 step is 6 ldmatrix.x4 for 16 mma per warp;
//  * small 64 x 64 x 32, 4 warps 2 x 2, warp tile 32 x 32, 4 stages of 8 KiB (32 KiB), 4 CTAs
//    per SM.
// pick_large_tile takes the large tile when its grid fills at least one wave of the device's
// SMs (counted at 1 CTA per SM) and the small one otherwise: decode (M = 1..64) and other thin
// products are bound by streaming B, so what matters there is how many SMs stream it; N = 4096
// gives 32 large CTAs on 132 SMs (a quarter of the SMs) against 64 small ones (split-K would be
// the next step for decode).
// BK = 32 keeps a stage small enough for 4 stages: 3 in flight while one is computed, 96 KiB
// per SM with 2 large CTAs, which covers HBM latency x bandwidth per SM on an H100
// (~1 us x 3.35 TB/s / 132 = 25 KiB) with room.
//
// Pipeline. cp.async.cg 16-byte copies into a ring of 4 stages: the copy of k-tile kt + 3 is
// issued right after the barrier that frees its stage (the one computed at kt - 1), then k-tile
// kt is computed; one commit group per k-tile (empty past the end), wait_group 2. Tails: a chunk
// that crosses M, N or K copies only its in-bounds bytes and cp.async zero-fills the rest; rows
// or k rows wholly outside copy 0 bytes (from the operand's base, never an address out of
// bounds), so padded rows and k columns add exact zeros to every product.
//
// Shared memory. Each stage tile is rows of 16-byte chunks with an XOR swizzle on the chunk
// index (gemm_swizzle_chunk: chunk ^ (row % 8) for 8+ chunks per row, ^ ((row / 2) % 4) for the
// 4-chunk (64-byte) rows of a K-major BK = 32 tile), so the 8 row addresses of every ldmatrix
// phase and the 16-byte stores of 8 consecutive threads fall into 8 different bank groups.
//
// CTA order. blockIdx.x is a tile index mapped to (tile_m, tile_n) in groups of 8 tile rows
// (gemm_grouped_tile): a wave of resident CTAs touches at most 8 A row panels and wave / 8 B
// column panels whatever N is; in row-major order a wave of 264 large CTAs (2 per SM on 132
// SMs) over N = 16384 (128 tile columns) would touch 3 A panels and 128 B panels (a panel is
// 128 x K: 1 MiB at K = 4096 bf16, against a 50 MiB L2). blockIdx.z is the batch (launched in
// chunks of 65535).
//
// Epilogue. After the last k-tile the fp32 accumulators are staged in shared memory over the
// drained stages (rows BN + 8 floats apart, gemm_cstage_offset: conflict-free float2 stores
// and, in the order gemm_cstage_read_half gives, float4 reads), and the CTA walks its output in
// chunks of 8 columns of one row (a rolled loop, a warp on whole rows): z = acc + bias (dtype
// or fp32), pre = z (optional), y = act(z) or act(g) * u, y += residual, C = y rounded to dtype,
// all in registers; C, pre and the residual move as 16-byte accesses when N % 8 == 0 and the
// pointers are 16-byte aligned (else element-wise). Applying the epilogue straight to the
// fragment registers instead made ptxas inline the run-time activation switch (erff, tanhf,
// expf) for each of the 64 accumulators of a thread: 10-17 s of ptxas per kernel and target
// (sm_80, CUDA 13.0, on this 2-core machine) against 0.1-0.3 s now, and 4-byte stores where the
// staged tile gives 16-byte ones.
// Gated kinds use the same tile: a CTA's BN stage columns of B are BN / 2 gate columns and the
// matching BN / 2 up columns (N apart in B; gemm_tile_b_col), so the gate of output column c
// is staged at c and its up value at c + BN / 2: a gated CTA computes BN / 2 output columns
// with the registers and shared memory of a plain one, and the main loop does not know.
//
// Instantiations: 2 dtypes x 4 layout pairs x 2 tiles = 16 GEMM kernels, plus 4 backward
// kernels (2 dtypes x vector width) and one reduction. The activation, gating, bias dtype, pre
// and residual are run-time flags: they only touch the epilogue (uniform branches), and each
// would double the 16 main loops for nothing the tensor cores see. The layouts and tiles are
// template parameters because they fix the copy addressing, the ldmatrix form and the
// register arrays of the main loop.
//
// Backward (linear_act_bwd). act_bwd_kernel: one memory-bound pass. A CTA of 32 x 8 threads
// takes 32 column vectors (8 elements, 16 bytes, when N % 8 == 0 and the pointers are 16-byte
// aligned; else 1 element) and a contiguous range of rows, which its 8 thread rows walk with
// stride 8; each thread keeps its columns' dz sums in registers, the 8 thread rows are summed
// in a fixed order through shared memory, and the CTA writes one partial row into the
// workspace. sum_partial_rows_kernel then sums the partial rows of every column in a fixed
// order: dbias is deterministic, no atomics. The number of row ranges depends only on M, N and
// the SM count, so linear_act_bwd_workspace_bytes knows it before the pointers are seen.
#include "cuda/device.cuh"
#include "cuda/linear.h"
#include "cuda/linear_index.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kMaxGridZ = 65535;
// Tile rows per CTA group of the grouped order (Triton's GROUP_M).
constexpr int kGroupM = 8;

// ---------------------------------------------------------------------------------------
// Tile configurations.

template <int BM, int BN, int BK, int WM, int WN, int kStages_, int kMinBlocks_>
struct TileCfg {
  static constexpr int kBM = BM, kBN = BN, kBK = BK, kWN = WN;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__: caps registers per thread
  static constexpr int kThreads = WM * WN * kWarp;
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  static constexpr int kMI = kWarpM / 16;  // m16 fragments per warp
  static constexpr int kNJ = kWarpN / 8;   // n8 fragments per warp
  static constexpr int kNP = kNJ / 2;      // ldmatrix.x4 of B per k16 step
  static constexpr int kKK = BK / 16;      // k16 steps per stage
  static constexpr int kStageElems = (BM + BN) * BK;
  static constexpr int kPipeBytes = kStages * kStageElems * 2;
  static constexpr int kCTileBytes = BM * (BN + 8) * 4;  // gemm_cstage_stride
  static constexpr int kSmemBytes = kPipeBytes > kCTileBytes ? kPipeBytes : kCTileBytes;
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warps own whole ldmatrix.x4 fragments");
  static_assert(BK % 16 == 0 && (BK / 8 == 4 || BK / 8 >= 8), "swizzle covers 4 or 8+ chunks");
  static_assert(BM % 64 == 0 && BN % 64 == 0, "MN-major stages are rows of 8+ chunks");
  static_assert(kSmemBytes <= kMaxSmemBytes, "stages exceed the shared memory of a block");
};

// Large: 2 CTAs per SM (128 registers per thread: ptxas below), so one CTA's epilogue and
// prologue overlap the other's main loop. Small: 4 CTAs per SM. The large tile takes 68 KiB,
// within kMaxSmemBytes (device.cuh), so it runs everywhere (2 CTAs per SM on sm_80/90/100, 1 on
// sm_86/89/120).
using LargeTile = TileCfg<128, 128, 32, 2, 4, 4, 2>;
using SmallTile = TileCfg<64, 64, 32, 2, 2, 4, 4>;

// ---------------------------------------------------------------------------------------
// GEMM.

// Everything a GEMM launch needs; strides in elements, an operand's element (mn, k) of batch i
// at base + i * batch + mn * mn_stride + k * k_stride.
struct GemmArgs {
  const void* a;
  const void* b;
  void* c;
  int64_t a_mn, a_k, a_batch;
  int64_t b_mn, b_k, b_batch;
  int M, N, K;
  int tiles_m, tiles_n;  // output tiles (gated: BN / 2 output columns per tile)
  int batch0;            // batch index of blockIdx.z = 0 (launches are chunked by kMaxGridZ)
  Activation act;
  bool gated;
  bool vec8;  // C, pre and residual take 16-byte accesses (N % 8 == 0, aligned)
  const void* bias;
  bool bias_fp32;
  const void* residual;
  int64_t res_row, res_batch;
  void* pre;
};

// One operand's share of a stage copy: kLoads 16-byte chunks per thread per stage.
// K-major (kKMajor): the stage is kMN rows (m or n) of BK / 8 chunks; MN-major: BK rows (k) of
// kMN / 8 chunks. Thread tid copies chunk tid % kChunks of rows tid / kChunks + i * kRowStep
// (gemm_copy_chunk): kRowStep is a multiple of 8, so the swizzle is the same for all i and the
// stage offsets differ by constants, which keeps the per-thread state at a 64-bit pointer per
// load plus 6 registers (the large tile is at the 128-register cap of 2 CTAs per SM), and a
// k-tile's copy costs a few integer instructions per chunk.
template <typename T, class Cfg, int kMN, bool kKMajor>
struct StageCopy {
  static constexpr int kRows = kKMajor ? kMN : Cfg::kBK;
  static constexpr int kChunks = (kKMajor ? Cfg::kBK : kMN) / 8;
  static constexpr int kRowStep = Cfg::kThreads / kChunks;
  static constexpr int kLoads = kRows / kRowStep;
  static_assert(Cfg::kThreads % kChunks == 0 && kRowStep % 8 == 0 && kRows % kRowStep == 0,
                "every thread copies whole chunks at one swizzle phase");

  const T* base;           // the operand of this batch (also the source of 0-byte copies)
  const T* src[kLoads];    // chunk i of the next k-tile to copy
  int64_t step;            // elements from one k-tile to the next
  uint32_t smem0;          // byte offset of load 0 in the operand's stage tile
  int k_in;                // k of load 0's first element relative to the k-tile's first
  // K-major: bit i set if load i's row is inside M or N; MN-major: bytes of the chunk inside
  // (the same for every load: one chunk column).
  int inside;

  // mn0: first logical row (A) or column (B) of the tile; extent: M or N; gated B: the columns
  // of the up half are read N further on (gemm_copy_src).
  __device__ StageCopy(const T* base_, int64_t mn_stride, int64_t k_stride, int mn0, int extent,
                       bool gated_b, int tid)
      : base(base_), step(int64_t(Cfg::kBK) * (kKMajor ? 1 : k_stride)) {
    const GemmLaneAddr at = gemm_copy_chunk(tid, 0, Cfg::kThreads, kChunks);
    smem0 = gemm_smem_offset(at.row, at.chunk, kChunks) * 2;
    inside = 0;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const GemmLaneAddr ai = gemm_copy_chunk(tid, i, Cfg::kThreads, kChunks);
      const GemmCopySrc s = gemm_copy_src(kKMajor, ai.row, ai.chunk, kMN, mn0, extent, gated_b);
      if (i == 0) k_in = s.k;
      if constexpr (kKMajor) {
        inside |= int(s.mn_bytes != 0) << i;
        src[i] = base + s.mn * mn_stride + s.k;
      } else {
        inside = s.mn_bytes;
        src[i] = base + s.mn + int64_t(s.k) * k_stride;
      }
    }
  }

  // Copies the k-tile that starts at k0 into `stage`; called for consecutive k-tiles (the
  // pointers advance).
  __device__ void issue(uint32_t stage, int k0, int K) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const GemmCopySrc s{0, k_in + (kKMajor ? 0 : i * kRowStep),
                          kKMajor ? ((inside >> i) & 1) * 16 : inside};
      const int bytes = gemm_copy_bytes(kKMajor, s, k0, K);
      cp_async16(stage + smem0 + i * Cfg::kThreads * 16, bytes ? src[i] : base, bytes);
      src[i] += step;
    }
  }
};

// 8 consecutive elements as floats: one 16-byte load when `vec`, else the first n (< 8 at the
// N tail) one by one, the rest 0.
template <typename T>
__device__ __forceinline__ void load8(const T* src, bool vec, int n, float (&out)[8]) {
  if (vec) {
    const uint4 w = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = unpack2<T>(words[k]);
      out[2 * k] = f.x;
      out[2 * k + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = j < n ? to_float(src[j]) : 0.f;
  }
}
template <typename T>
__device__ __forceinline__ void store8(T* dst, bool vec, int n, const float (&in)[8]) {
  if (vec) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<T>(in[0], in[1]), pack2<T>(in[2], in[3]),
                                                pack2<T>(in[4], in[5]), pack2<T>(in[6], in[7]));
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < n) dst[j] = from_float<T>(in[j]);
    }
  }
}

template <typename T>
__device__ __forceinline__ float load_bias(const GemmArgs& p, int j) {
  return p.bias_fp32 ? static_cast<const float*>(p.bias)[j]
                     : to_float(static_cast<const T*>(p.bias)[j]);
}

// The epilogue of one chunk of n <= 8 output columns (col ..) of one row: z (gate or plain) and
// u (up, gated only) are the accumulators.
template <typename T>
__device__ __forceinline__ void epilogue_chunk(const GemmArgs& p, int batch, int row, int col,
                                               int n, float (&z)[8], float (&u)[8]) {
  const int64_t N = p.N;
  const bool vec = p.vec8;  // then N % 8 == 0: every chunk is whole
  if (p.bias != nullptr) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < n) {
        z[j] += load_bias<T>(p, col + j);
        if (p.gated) u[j] += load_bias<T>(p, p.N + col + j);
      }
    }
  }
  if (p.pre != nullptr) {
    T* pre = static_cast<T*>(p.pre) + (int64_t(batch) * p.M + row) * (p.gated ? 2 * N : N) + col;
    store8<T>(pre, vec, n, z);
    if (p.gated) store8<T>(pre + N, vec, n, u);
  }
  float y[8];
  const Activation act = p.gated ? gate_activation(p.act) : p.act;
#pragma unroll
  for (int j = 0; j < 8; ++j) y[j] = activate(act, z[j]) * (p.gated ? u[j] : 1.f);
  if (p.residual != nullptr) {
    float r[8];
    load8<T>(static_cast<const T*>(p.residual) + int64_t(batch) * p.res_batch +
                 int64_t(row) * p.res_row + col,
             vec, n, r);
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] += r[j];
  }
  store8<T>(static_cast<T*>(p.c) + (int64_t(batch) * p.M + row) * N + col, vec, n, y);
}

template <typename T, class Cfg, bool kAKMajor, bool kBKMajor>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK;
  constexpr int kMI = Cfg::kMI, kNJ = Cfg::kNJ, kNP = Cfg::kNP, kKK = Cfg::kKK;
  constexpr int kStageBytes = Cfg::kStageElems * 2;
  constexpr int kBOffset = kBM * kBK * 2;  // B's tile after A's in a stage
  constexpr int kAChunks = (kAKMajor ? kBK : kBM) / 8;
  constexpr int kBChunks = (kBKMajor ? kBK : kBN) / 8;

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int wm = warp / Cfg::kWN, wn = warp % Cfg::kWN;
  const GemmTile tile = gemm_grouped_tile(blockIdx.x, p.tiles_m, p.tiles_n, kGroupM);
  const int batch = p.batch0 + blockIdx.z;
  const int m0 = tile.m * kBM;
  const int out_bn = p.gated ? kBN / 2 : kBN;  // output columns per tile
  const int n0 = tile.n * out_bn;

  const T* a = static_cast<const T*>(p.a) + int64_t(batch) * p.a_batch;
  const T* b = static_cast<const T*>(p.b) + int64_t(batch) * p.b_batch;
  StageCopy<T, Cfg, kBM, kAKMajor> copy_a(a, p.a_mn, p.a_k, m0, p.M, false, tid);
  StageCopy<T, Cfg, kBN, kBKMajor> copy_b(b, p.b_mn, p.b_k, n0, p.N, p.gated, tid);

  // Byte offsets (in a stage) of this lane's ldmatrix row address per fragment and k16 step.
  uint32_t a_off[kMI][kKK], b_off[kNP][kKK];
#pragma unroll
  for (int kk = 0; kk < kKK; ++kk) {
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {
      a_off[mi][kk] =
          gemm_ldmatrix_offset(lane, false, kAKMajor, wm * Cfg::kWarpM + mi * 16, kk, kAChunks) * 2;
    }
#pragma unroll
    for (int np = 0; np < kNP; ++np) {
      b_off[np][kk] =
          kBOffset +
          gemm_ldmatrix_offset(lane, true, kBKMajor, wn * Cfg::kWarpN + np * 16, kk, kBChunks) * 2;
    }
  }

  float acc[kMI][kNJ][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][nj][i] = 0.f;

  const uint32_t smem0 = smem_addr(smem_raw);
  const int K = p.K;
  const int ktiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ktiles) {
      copy_a.issue(smem0 + s * kStageBytes, s * kBK, K);
      copy_b.issue(smem0 + s * kStageBytes + kBOffset, s * kBK, K);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // k-tile kt is visible to all; the stage of kt - 1 is free
    const int next = kt + Cfg::kStages - 1;
    if (next < ktiles) {
      const uint32_t st = smem0 + (next % Cfg::kStages) * kStageBytes;
      copy_a.issue(st, next * kBK, K);
      copy_b.issue(st + kBOffset, next * kBK, K);
    }
    cp_async_commit();

    const uint32_t st = smem0 + (kt % Cfg::kStages) * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < kKK; ++kk) {
      uint32_t af[kMI][4], bf[kNP][4];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) ldmatrix_x4<!kAKMajor>(af[mi], st + a_off[mi][kk]);
#pragma unroll
      for (int np = 0; np < kNP; ++np) ldmatrix_x4<!kBKMajor>(bf[np], st + b_off[np][kk]);
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int nj = 0; nj < kNJ; ++nj)
          mma_16816<T>(acc[mi][nj], af[mi], bf[nj / 2][(nj % 2) * 2], bf[nj / 2][(nj % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();  // only empty groups are left
  __syncthreads();     // every warp is done with the stages: they become the fp32 C tile

  // Stage the accumulators: float i of acc[mi][nj] is (row g + 8 (i / 2), column 2q + i % 2)
  // of the fragment (gemm_mma_c_coord), the tile column is the B stage column.
  float* const c_tile = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int nj = 0; nj < kNJ; ++nj) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const GemmRowCol rc = gemm_mma_c_coord(lane, 2 * h);
        const int row = wm * Cfg::kWarpM + mi * 16 + rc.row;
        const int col = wn * Cfg::kWarpN + nj * 8 + rc.col;
        *reinterpret_cast<float2*>(c_tile + gemm_cstage_offset(row, col, kBN)) =
            make_float2(acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1]);
      }
    }
  }
  __syncthreads();

  // One 8-column output chunk per thread and step; a warp covers whole rows of the tile.
  const int out_chunks = out_bn / 8;
  const int up = kBN / 2;  // gated: the up value of tile column c is staged at c + BN / 2
#pragma unroll 1
  for (int idx = tid; idx < kBM * out_chunks; idx += Cfg::kThreads) {
    const int r = idx / out_chunks, c = idx % out_chunks * 8;
    const int row = m0 + r, col = n0 + c;
    if (row >= p.M || col >= p.N) continue;
    // The two float4 halves in the order gemm_cstage_read_half gives (conflict-free).
    const float4* src = reinterpret_cast<const float4*>(c_tile + gemm_cstage_offset(r, c, kBN));
    const int first = gemm_cstage_read_half(idx, 0);
    float z[8], u[8];
    {
      const float4 a = src[first], b = src[first ^ 1];
      const float4 lo = first ? b : a, hi = first ? a : b;
      z[0] = lo.x, z[1] = lo.y, z[2] = lo.z, z[3] = lo.w;
      z[4] = hi.x, z[5] = hi.y, z[6] = hi.z, z[7] = hi.w;
    }
    if (p.gated) {
      const float4 a = src[up / 4 + first], b = src[up / 4 + (first ^ 1)];
      const float4 lo = first ? b : a, hi = first ? a : b;
      u[0] = lo.x, u[1] = lo.y, u[2] = lo.z, u[3] = lo.w;
      u[4] = hi.x, u[5] = hi.y, u[6] = hi.z, u[7] = hi.w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) u[j] = 0.f;  // unused
    }
    epilogue_chunk<T>(p, batch, row, col, min(8, p.N - col), z, u);
  }
}

// ---------------------------------------------------------------------------------------
// Epilogue backward.

constexpr int kBwdCols = 32;  // column vectors per CTA (threadIdx.x)
constexpr int kBwdRows = 8;   // thread rows per CTA (threadIdx.y)
// Row ranges (partial rows) target this many CTAs per SM, one wave: the 8-wide kernel takes up
// to 110 registers (ptxas, CUDA 13.0: sm_80 110, sm_100 79), so at least 2 CTAs of 8 warps are
// resident per SM on every target: 16+ warps, each with 2-3 16-byte loads in flight, to hide
// the latency of a pass that does ~10 flops per byte.
constexpr int kBwdCtasPerSm = 2;
// __launch_bounds__ minimum: caps registers at 128. Without it ptxas for sm_100 chose 64 and
// spilled 8 bytes in the 8-wide gated path; asking for 4 (64 registers) spilled 72 bytes.
constexpr int kBwdMinCtasPerSm = 2;
// A row range is at least this many rows (2 per thread row), so tiny M gets few partial rows.
constexpr int kBwdMinRows = 16;

struct BwdArgs {
  const void* dy;
  const void* pre;
  void* dz;
  float* partial;  // [row ranges, width] or null (no dbias)
  Activation act;
  int64_t M;
  int N;
  int64_t rows_per_range;
};

// kVec elements moved as one access (16 bytes for kVec = 8).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* src, float (&out)[kVec]) {
  const Vec<T, kVec> w = *reinterpret_cast<const Vec<T, kVec>*>(src);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(w.v[j]);
}
template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* dst, const float (&in)[kVec]) {
  Vec<T, kVec> w;
#pragma unroll
  for (int j = 0; j < kVec; ++j) w.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Vec<T, kVec>*>(dst) = w;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kBwdCols* kBwdRows, kBwdMinCtasPerSm)
    act_bwd_kernel(const BwdArgs p) {
  const bool gated = is_gated(p.act);
  const bool none = p.act == Activation::kNone;
  const Activation ga = gate_activation(p.act);
  const int64_t N = p.N;
  const int64_t width = gated ? 2 * N : N;  // of pre, dz and the partial rows
  const int col = (blockIdx.x * kBwdCols + threadIdx.x) * kVec;
  const bool active = col < p.N;  // N % kVec == 0 for kVec > 1
  const int64_t r_begin = blockIdx.y * p.rows_per_range;
  const int64_t r_end = min(p.M, r_begin + p.rows_per_range);

  float sum_g[kVec], sum_u[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) sum_g[j] = sum_u[j] = 0.f;
  if (active) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kBwdRows) {
      float dy[kVec];
      load_vec<T, kVec>(static_cast<const T*>(p.dy) + r * N + col, dy);
      if (none) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum_g[j] += dy[j];
        continue;
      }
      const T* pre = static_cast<const T*>(p.pre) + r * width + col;
      T* dz = static_cast<T*>(p.dz) + r * width + col;
      float z[kVec], dg[kVec];
      load_vec<T, kVec>(pre, z);
      if (gated) {
        float u[kVec], du[kVec];
        load_vec<T, kVec>(pre + N, u);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          dg[j] = dy[j] * u[j] * activate_grad(ga, z[j]);
          du[j] = dy[j] * activate(ga, z[j]);
        }
        store_vec<T, kVec>(dz, dg);
        store_vec<T, kVec>(dz + N, du);
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum_u[j] += du[j];
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) dg[j] = dy[j] * activate_grad(p.act, z[j]);
        store_vec<T, kVec>(dz, dg);
      }
      // dbias sums dz in fp32 before it is rounded to dtype (closer to the fp32 reference).
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_g[j] += dg[j];
    }
  }
  if (p.partial == nullptr) return;

  // Fixed-order sum over the 8 thread rows: thread row 0 adds rows 1..7 in order. Element j of
  // the 32 threads of a row is contiguous (conflict-free).
  __shared__ float part[2][kBwdRows - 1][kVec][kBwdCols];
  if (threadIdx.y > 0) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      part[0][threadIdx.y - 1][j][threadIdx.x] = sum_g[j];
      part[1][threadIdx.y - 1][j][threadIdx.x] = sum_u[j];
    }
  }
  __syncthreads();
  if (threadIdx.y > 0 || !active) return;
  float* out = p.partial + blockIdx.y * width + col;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float g = sum_g[j], u = sum_u[j];
#pragma unroll
    for (int k = 0; k < kBwdRows - 1; ++k) {
      g += part[0][k][j][threadIdx.x];
      u += part[1][k][j][threadIdx.x];
    }
    out[j] = g;
    if (gated) out[N + j] = u;
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An operand as (mn, k) strides: K-major when k is the contiguous dimension. `mn_first`: the
// MatrixRef's rows are mn (A) rather than k (B). False when the layout is not one linear.h
// allows (unit stride on one side, the other a multiple of 8 unless that side has one element,
// 16-byte aligned data, batch stride a multiple of 8).
struct Operand {
  int64_t mn, k, batch;
  bool k_major;
};

bool operand_of(const MatrixRef& m, bool mn_first, int64_t mn_extent, int64_t k_extent,
                int64_t batch, Operand* out) {
  if (m.data == nullptr || !aligned16(m.data) || (batch > 1 && m.batch_stride % 8 != 0)) {
    return false;
  }
  // The stride of a dimension of one element is never used: it counts as whatever fits.
  const int64_t mn_stride = mn_extent == 1 ? 0 : mn_first ? m.row_stride : m.col_stride;
  const int64_t k_stride = k_extent == 1 ? 0 : mn_first ? m.col_stride : m.row_stride;
  if ((k_extent == 1 || k_stride == 1) && mn_stride % 8 == 0) {
    *out = {mn_stride, 1, m.batch_stride, true};
    return true;
  }
  if ((mn_extent == 1 || mn_stride == 1) && k_stride % 8 == 0) {
    *out = {1, k_stride, m.batch_stride, false};
    return true;
  }
  return false;
}

template <typename T, class Cfg, bool kAKMajor, bool kBKMajor>
cudaError_t launch_gemm(GemmArgs p, int64_t batch, int device, cudaStream_t stream) {
  const auto kernel = gemm_kernel<T, Cfg, kAKMajor, kBKMajor>;
  // Shared memory above 48 KiB must be asked for (the large tile), and the carveout preference
  // makes the driver give shared memory the room for 2 large (136 KiB) or 4 small (128 KiB)
  // CTAs per SM rather than L1 (the stages bypass L1: cp.async.cg). Function attributes hold
  // per device, so they are set once per device (bit `device` of `prepared`; devices past 63
  // set them on every launch, about a microsecond each).
  static std::atomic<uint64_t> prepared{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit == 0 || (prepared.load(std::memory_order_relaxed) & bit) == 0) {
    if (Cfg::kSmemBytes > kDefaultSmemBytes) {
      if (const cudaError_t err = cudaFuncSetAttribute(
              kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes)) {
        return err;
      }
    }
    if (const cudaError_t err = cudaFuncSetAttribute(kernel,
                                                     cudaFuncAttributePreferredSharedMemoryCarveout,
                                                     cudaSharedmemCarveoutMaxShared)) {
      return err;
    }
    prepared.fetch_or(bit, std::memory_order_relaxed);
  }
  const int out_bn = p.gated ? Cfg::kBN / 2 : Cfg::kBN;
  const int64_t tiles_m = ceil_div(p.M, Cfg::kBM), tiles_n = ceil_div(p.N, out_bn);
  if (tiles_m * tiles_n > INT32_MAX) return cudaErrorInvalidValue;
  p.tiles_m = static_cast<int>(tiles_m);
  p.tiles_n = static_cast<int>(tiles_n);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    p.batch0 = static_cast<int>(b0);
    const dim3 grid(static_cast<unsigned>(tiles_m * tiles_n), 1,
                    static_cast<unsigned>(std::min<int64_t>(batch - b0, kMaxGridZ)));
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  return cudaSuccess;
}

// The large tile when its grid fills a wave of the SMs (at 1 CTA per SM, the conservative
// count), else the small one: see the header comment.
bool pick_large_tile(int64_t batch, int64_t M, int64_t N, bool gated, int sms) {
  const int64_t out_bn = gated ? LargeTile::kBN / 2 : LargeTile::kBN;
  return batch * ceil_div(M, LargeTile::kBM) * ceil_div(N, out_bn) >= sms;
}

template <typename T>
cudaError_t gemm_typed(const GemmArgs& p, int64_t batch, bool a_k, bool b_k, bool large,
                       int device, cudaStream_t stream) {
  const auto with_tile = [&](auto ak, auto bk) {
    constexpr bool kAK = decltype(ak)::value, kBK = decltype(bk)::value;
    return large ? launch_gemm<T, LargeTile, kAK, kBK>(p, batch, device, stream)
                 : launch_gemm<T, SmallTile, kAK, kBK>(p, batch, device, stream);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (a_k) return b_k ? with_tile(Yes{}, Yes{}) : with_tile(Yes{}, No{});
  return b_k ? with_tile(No{}, Yes{}) : with_tile(No{}, No{});
}

// Row ranges of the backward (= partial rows with dbias): about kBwdCtasPerSm CTAs per SM over
// the nominal 8-wide column vectors, each range at least kBwdMinRows rows.
int64_t bwd_row_ranges(int64_t M, int64_t N, int sms) {
  const int64_t col_blocks = ceil_div(N, int64_t(kBwdCols) * 8);
  const int64_t want = std::max<int64_t>(1, int64_t(sms) * kBwdCtasPerSm / col_blocks);
  return std::max<int64_t>(1, std::min(want, ceil_div(M, kBwdMinRows)));
}

}  // namespace

cudaError_t gemm(DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const MatrixRef& a,
                 const MatrixRef& b, const Epilogue& epilogue, void* c, cudaStream_t stream) {
  const bool gated = is_gated(epilogue.act);
  if (batch < 1 || batch > INT32_MAX || M < 1 || N < 1 || K < 1 || M > INT32_MAX ||
      K > INT32_MAX || (gated ? 2 * N : N) > INT32_MAX || c == nullptr ||
      (epilogue.residual != nullptr && epilogue.residual_row_stride % 8 != 0 && M > 1)) {
    return cudaErrorInvalidValue;
  }
  Operand oa, ob;
  if (!operand_of(a, true, M, K, batch, &oa) ||
      !operand_of(b, false, gated ? 2 * N : N, K, batch, &ob)) {
    return cudaErrorInvalidValue;
  }
  // The up half of an N-contiguous gated B starts N elements into each row: 16-byte chunks
  // need N % 8 == 0 there (the forward's weight (2N, K) is K-contiguous and has no such limit).
  if (gated && !ob.k_major && N % 8 != 0) return cudaErrorInvalidValue;
  GemmArgs p{};
  p.a = a.data;
  p.b = b.data;
  p.c = c;
  p.a_mn = oa.mn, p.a_k = oa.k, p.a_batch = batch > 1 ? oa.batch : 0;
  p.b_mn = ob.mn, p.b_k = ob.k, p.b_batch = batch > 1 ? ob.batch : 0;
  p.M = static_cast<int>(M), p.N = static_cast<int>(N), p.K = static_cast<int>(K);
  p.act = epilogue.act;
  p.gated = gated;
  p.bias = epilogue.bias;
  p.bias_fp32 = epilogue.bias_fp32;
  p.residual = epilogue.residual;
  p.res_row = epilogue.residual_row_stride;
  p.res_batch = batch > 1 ? epilogue.residual_batch_stride : 0;
  p.pre = epilogue.pre;
  p.vec8 = N % 8 == 0 && aligned16(c) && (p.pre == nullptr || aligned16(p.pre)) &&
           (p.residual == nullptr ||
            (aligned16(p.residual) && p.res_row % 8 == 0 && p.res_batch % 8 == 0));
  int device = 0, sms = 0;
  if (const cudaError_t err = cudaGetDevice(&device)) return err;
  if (const cudaError_t err = multiprocessor_count(device, &sms)) return err;
  const bool large = pick_large_tile(batch, M, N, gated, sms);
  switch (dtype) {
    case DType::kFloat16:
      return gemm_typed<__half>(p, batch, oa.k_major, ob.k_major, large, device, stream);
    case DType::kBFloat16:
      return gemm_typed<__nv_bfloat16>(p, batch, oa.k_major, ob.k_major, large, device, stream);
    default: return cudaErrorInvalidValue;
  }
}

size_t linear_act_bwd_workspace_bytes(int64_t M, int64_t N, Activation act, bool need_dbias,
                                      int device) {
  if (!need_dbias || M <= 0 || N <= 0) return 0;
  int sms = 0;
  // On failure linear_act_bwd fails the same query and launches nothing, so 0 is safe.
  if (multiprocessor_count(device, &sms) != cudaSuccess) return 0;
  const int64_t width = is_gated(act) ? 2 * N : N;
  return static_cast<size_t>(bwd_row_ranges(M, N, sms)) * static_cast<size_t>(width) *
         sizeof(float);
}

cudaError_t linear_act_bwd(DType dtype, Activation act, const void* dy, const void* pre, void* dz,
                           float* dbias, void* workspace, int64_t M, int64_t N,
                           cudaStream_t stream) {
  const bool none = act == Activation::kNone;
  const int64_t width = is_gated(act) ? 2 * N : N;
  if ((dtype != DType::kFloat16 && dtype != DType::kBFloat16) || M < 0 || N < 1 ||
      width > INT32_MAX || (M > 0 && dy == nullptr) ||
      (!none && M > 0 && (pre == nullptr || dz == nullptr)) ||
      (none && (pre != nullptr || dz != nullptr)) ||
      (dbias != nullptr && M > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) {
    // Sums over no rows are zero; there is nothing else to compute.
    return dbias != nullptr ? cudaMemsetAsync(dbias, 0, width * sizeof(float), stream)
                            : cudaSuccess;
  }
  if (none && dbias == nullptr) return cudaSuccess;
  int device = 0, sms = 0;
  if (const cudaError_t err = cudaGetDevice(&device)) return err;
  if (const cudaError_t err = multiprocessor_count(device, &sms)) return err;
  // The count linear_act_bwd_workspace_bytes used, on the device the caller made current.
  const int64_t ranges = bwd_row_ranges(M, N, sms);
  BwdArgs p{dy, pre, dz, dbias != nullptr ? static_cast<float*>(workspace) : nullptr,
            act, M, static_cast<int>(N), ceil_div(M, ranges)};
  const bool vec8 = N % 8 == 0 && aligned16(dy) && aligned16(pre) && aligned16(dz);
  const dim3 block(kBwdCols, kBwdRows);
  const auto launch = [&](auto t) {
    using T = typename decltype(t)::type;
    if (vec8) {
      const dim3 grid(static_cast<unsigned>(ceil_div(N, kBwdCols * 8)),
                      static_cast<unsigned>(ranges));
      act_bwd_kernel<T, 8><<<grid, block, 0, stream>>>(p);
    } else {
      const dim3 grid(static_cast<unsigned>(ceil_div(N, kBwdCols)), static_cast<unsigned>(ranges));
      act_bwd_kernel<T, 1><<<grid, block, 0, stream>>>(p);
    }
    return cudaGetLastError();
  };
  const cudaError_t err = dtype == DType::kFloat16
                              ? launch(TypeTag<__half>{})
                              : launch(TypeTag<__nv_bfloat16>{});
  if (err != cudaSuccess || dbias == nullptr) return err;
  return sum_partial_rows(static_cast<const float*>(workspace), static_cast<int>(ranges), width,
                          1, dbias, nullptr, stream);
}

}  // namespace cuda
}  // namespace fastgpt
