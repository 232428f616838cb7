// Split-KV ("flash-decoding") attention over a KV cache; the contract is
// attention_with_kvcache in attention.h, the index arithmetic is in
// attention_with_kvcache_index.h (unit-tested on the CPU).
//
// Why this shape. Decoding reads the whole cache once per token and does 2 * (E + Ev) flops per
// key and query row: at batch 1, Hk = 8, 32k keys, E = Ev = 128 that is 8 * 32768 * 256 * 2 B =
// 128 MiB of K/V, 28 us at an H200's 4.8 TB/s (40 us at an H100's 3.35 TB/s), against ~0.1
// GFLOP. So the kernel is built around the loads and only has to keep the arithmetic off the
// critical path; CUDA cores do the dot products (no tensor cores).
//
// Work layout. One CTA of 4 warps per (batch, kv head, split, row chunk). A CTA serves all
// G * Tq query rows of its kv head (G = Hq / Hk query heads x Tq new positions, head-major:
// row r is head hk * G + r / Tq at position r % Tq), up to kKvcacheMaxRows = 8 rows, so each
// K/V byte is read once per group rather than once per query head. Groups of more rows are
// cut into row chunks, each its own CTA, with the chunks of one split numbered next to each
// other: they stream the same tiles at the same time, so DRAM sees the tiles about once and
// the other chunks hit L2. The limit of 8 comes from registers: each lane keeps rows x 8 fp32
// output accumulators (64 at 8 rows) under the 128 registers that 4 CTAs of 128 threads per SM
// allow. Two variants, sized (registers, shared memory) for 4 and for 8 rows; rows a CTA does
// not have are skipped by CTA-uniform branches. Up to 4 rows (G <= 4 at Tq = 1) take the
// 4-row one, whose ~110 registers leave headroom; 1- and 2-row variants would save only those
// branches on a decode that is bandwidth-bound anyway, and each variant costs compile time on
// every target.
//
// Splits. The host picks the split count from the units (B * Hk * row chunks), Tmax and the
// SM count (kvcache_num_splits): enough for 3 CTAs per SM (132 SMs, batch 1, 32k keys: Hk = 8
// gets 50 splits of ~650 keys, Hk = 32 gets 13 of ~2.5k), each at least 256 of Tmax's keys
// (under that the fixed cost per CTA, ~1 us of pipeline fill plus the partial-output write, is
// no longer small against its ~128 KiB of loads), at most 128 (bounds the workspace and the
// combine loop). 3 per SM because that is what fits at D = 128 on an H100/H200 (~60 KB of
// shared memory each, 228 KB per SM), so every CTA is resident from the start (no tail wave)
// and each SM has 12 warps to hide shared-memory and shuffle latency; 2 would leave 2 warps
// per scheduler for a loop of dependent FMA chains. The 32-key tiles of each row's OWN length
// are dealt out evenly over its splits (within one tile; kvcache_split_range), on the device
// from kv_lens[b], so a captured CUDA graph stays right as the lengths grow; a row with fewer
// tiles than splits leaves some splits empty (they write lse = -inf).
//
// Loads. A tile is 32 keys of K and of V, copied with 16-byte cp.async.cg (L1 bypassed: every
// byte is used once) in a stages-deep ring (3 stages where the device's shared memory allows,
// else 2): while tile t is computed, tiles t + 1 and t + 2 are in flight, 2 x 16 KiB at D = 128.
// Little's law: 4.8 TB/s over 132 SMs is ~36 B/ns per SM, and at ~1 us of loaded DRAM latency
// an SM needs ~36 KiB in flight; 3 CTAs per SM keep ~96 KiB. Consecutive threads copy
// consecutive 16-byte chunks of a row, so every warp-wide copy is whole 128-byte lines. Keys at
// or past the CTA's last visible key are zero-filled rather than read (cache rows past
// kv_lens[b] may hold anything, NaN included, and 0 * NaN would leak into the output).
//
// Arithmetic per tile. Scores: warp w owns keys 8w .. 8w + 7 of the tile, 4 lanes per key,
// each lane summing every 4th 16-byte chunk of the key against the pre-scaled fp32 queries in
// shared memory (read as broadcasts), then 2 shuffles make the sum. The K tile's rows are
// padded to a pitch = 4 (mod 8) chunks so those reads are free of bank conflicts
// (kvcache_smem_row_chunks). Online softmax per warp: each warp keeps its own running max,
// sum and output for its keys (in the log2 domain, scale * log2(e) folded into q), so no
// barrier is needed between score and P*V; the 4 warps are merged once at the end. P*V: lane
// (chunk c, key subset) of the warp accumulates output chunk c over its subset of the warp's
// 8 keys (kvcache_pv_lane), reading the probabilities through a per-warp shared buffer.
// Issue cost, counted from the code (not measured) at 4 rows, D = 128: ~400 warp instructions
// per warp-tile of 8 keys (4 KiB), ~100 cycles of an SM's 4 schedulers, against the ~200
// cycles DRAM takes to deliver 4 KiB to one SM (36 B/ns at ~1.8 GHz): bandwidth-bound up to
// ~4 rows, about even at 8, and arithmetic-bound beyond 8 rows (Tq >= 3 at G = 4), where each
// further row chunk repeats the arithmetic on tiles that L2 serves. mma.sync for the two
// products would lift that limit; it is not written.
//
// Output. With one split the CTA writes the normalised output in q's dtype. Otherwise it writes
// its normalised fp32 partial output and its log2-sum-exp (-inf, output 0, when the split saw no
// key) to the workspace, and a combine kernel (one warp per output row) merges the splits:
// out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M the largest lse; an all -inf row gives
// 0. Workspace: rows_out * splits * (Ev + 1) floats (rows_out = B * Hq * Tq), every byte
// written before it is read; at the example above 32 * 50 * 129 * 4 B = 826 KB written and read
// back (1.2% of the K/V traffic, and most of it stays in L2).
#include "cuda/attention.h"
#include "cuda/attention_with_kvcache_index.h"
#include "cuda/device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kThreads = kKvcacheWarps * kWarp;
constexpr int kChunk = kKvcacheChunkElems;
constexpr int kTile = kKvcacheTileKeys;
constexpr int kLanesPerKey = kKvcacheLanesPerKey;
constexpr int kKeysPerWarp = kKvcacheKeysPerWarp;
// At least 4 CTAs of 128 threads per SM: caps a thread at 128 registers (65536 / 512), so the
// register file never limits residency below the 3 CTAs per SM the split count aims at (and
// allows a 4th where shared memory does); the 8-row variant needs 64 of them for its output
// accumulators and fits (ptxas, CUDA 13.0, sm_80 to sm_120: 124-128, no spills).
constexpr int kMinCtasPerSm = 4;
// Combine kernel: one warp per output row, 4 rows per CTA.
constexpr int kCombineWarps = 4;
// Shared memory stages when the device allows them; 2 otherwise (see the top of the file).
constexpr int kMaxStages = 3;

static_assert(kKeysPerWarp * kLanesPerKey == kWarp, "a warp is 8 keys x 4 lanes");
static_assert(kThreads % kWarp == 0 && kTile == kKvcacheWarps * kKeysPerWarp, "tile layout");

// ---------------------------------------------------------------------------------------
// Element access: 16-byte chunks of 8 fp16/bf16 elements.

template <typename T>
__device__ __forceinline__ void chunk_to_float(const uint4& u, float (&f)[kChunk]);
template <>
__device__ __forceinline__ void chunk_to_float<__nv_bfloat16>(const uint4& u,
                                                              float (&f)[kChunk]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = __uint_as_float(w[k] << 16);
    f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void chunk_to_float<__half>(const uint4& u, float (&f)[kChunk]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
    f[2 * k] = v.x;
    f[2 * k + 1] = v.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 float_to_chunk(const float (&f)[kChunk]) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]),
                    pack2<T>(f[6], f[7]));
}

// ---------------------------------------------------------------------------------------
// Split kernel.

struct KvParams {
  const void* q;
  RowStrides qs;
  const void* k;
  RowStrides ks;
  const void* v;
  RowStrides vs;
  const int32_t* kv_lens;
  void* out;        // written directly when splits == 1
  float* part_o;    // (rows_out, splits, Ev) normalised partial outputs; null when splits == 1
  float* part_lse;  // (rows_out, splits) log2-sum-exp of the scaled scores
  int64_t kv_len;   // Tmax: kv_lens values are clamped to [0, Tmax] so no read leaves the cache
  int q_len;        // Tq
  int group;        // Hq / Hk
  int kv_heads;
  int rows;         // group * q_len
  int chunks;       // row chunks per (batch, kv head)
  int splits;
  int stages;
  int e_chunks;     // E / 8
  int v_chunks;     // Ev / 8
  int k_pitch;      // K tile row pitch in 16-byte chunks
  float scale_log2; // scale * log2(e)
};

// Shared memory of one CTA, in bytes; offsets in this order, each a multiple of 16 bytes:
// queries (fp32, kRows x E), probabilities (per warp, 8 keys x kRows), per-row key ends (8
// ints), then the tile ring, which the end-of-split merge reuses (per-warp max and sum, then
// every lane's partial output).
struct SmemLayout {
  int q_bytes, p_bytes, end_bytes, tile_bytes, merge_bytes;
  __host__ __device__ SmemLayout(int rows, int e_chunks, int k_pitch, int v_chunks)
      : q_bytes(rows * e_chunks * kChunk * 4),
        p_bytes(kKvcacheWarps * kKeysPerWarp * rows * 4),
        end_bytes(kKvcacheMaxRows * 4),
        tile_bytes(kTile * (k_pitch + v_chunks) * 16),
        merge_bytes(2 * kKvcacheWarps * rows * 4 + kThreads * rows * kChunk * 4) {}
  __host__ __device__ int ring_offset() const { return q_bytes + p_bytes + end_bytes; }
  __host__ __device__ int total(int stages) const {
    const int ring = stages * tile_bytes;
    return ring_offset() + (ring > merge_bytes ? ring : merge_bytes);
  }
};

template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    kvcache_split_kernel(const KvParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int warp = tid / kWarp;
  const int lane = tid % kWarp;
  const int E = p.e_chunks * kChunk;
  const int Ev = p.v_chunks * kChunk;
  const SmemLayout layout(kRows, p.e_chunks, p.k_pitch, p.v_chunks);
  float* const q_s = reinterpret_cast<float*>(smem);
  float* const p_s = reinterpret_cast<float*>(smem + layout.q_bytes);
  int* const end_s = reinterpret_cast<int*>(smem + layout.q_bytes + layout.p_bytes);
  unsigned char* const ring = smem + layout.ring_offset();

  const KvcacheCta cta = kvcache_cta_coords(blockIdx.x, p.splits, p.chunks);
  const int64_t b = cta.bh / p.kv_heads;
  const int64_t hk = cta.bh - b * p.kv_heads;
  const int row0 = cta.chunk * kKvcacheMaxRows;
  const int rows = min(kRows, p.rows - row0);
  const int64_t n = kvcache_min(kvcache_max(p.kv_lens[b], 0), p.kv_len);
  const KvcacheKeyRange range = kvcache_split_range(n, p.splits, cta.split, kTile);

  // Per row: the end of the keys it sees in this split; the CTA streams up to the largest.
  int64_t cta_end = range.begin;
  for (int r = 0; r < rows; ++r) {
    const int i = (row0 + r) % p.q_len;
    const int64_t e = kvcache_min(range.end, kvcache_visible_end(n, p.q_len, i));
    cta_end = kvcache_max(cta_end, e);
    if (tid == r) end_s[r] = static_cast<int>(e);
  }
  const int tiles = static_cast<int>(kvcache_ceil_div(cta_end - range.begin, kTile));

  // Queries, scaled into the log2 domain, as fp32 (the score loop reads them as broadcasts).
  const T* const qb = static_cast<const T*>(p.q) + b * p.qs.batch + hk * p.group * p.qs.head;
  for (int idx = tid; idx < rows * p.e_chunks; idx += kThreads) {
    const int r = idx / p.e_chunks;
    const int c = idx - r * p.e_chunks;
    const int g = (row0 + r) / p.q_len;
    const int i = (row0 + r) - g * p.q_len;
    const uint4 u = *reinterpret_cast<const uint4*>(qb + g * p.qs.head + i * p.qs.row + c * kChunk);
    float f[kChunk];
    chunk_to_float<T>(u, f);
    float4* dst = reinterpret_cast<float4*>(q_s + r * E + c * kChunk);
    dst[0] = make_float4(f[0] * p.scale_log2, f[1] * p.scale_log2, f[2] * p.scale_log2,
                         f[3] * p.scale_log2);
    dst[1] = make_float4(f[4] * p.scale_log2, f[5] * p.scale_log2, f[6] * p.scale_log2,
                         f[7] * p.scale_log2);
  }

  // Tile copies: thread tid copies chunks tid, tid + 128, ... of the tile's K (then V) rows,
  // walked incrementally (no division per chunk).
  const T* const kb = static_cast<const T*>(p.k) + b * p.ks.batch + hk * p.ks.head;
  const T* const vb = static_cast<const T*>(p.v) + b * p.vs.batch + hk * p.vs.head;
  const int k_key0 = tid / p.e_chunks, k_c0 = tid % p.e_chunks;
  const int k_dkey = kThreads / p.e_chunks, k_dc = kThreads % p.e_chunks;
  const int v_key0 = tid / p.v_chunks, v_c0 = tid % p.v_chunks;
  const int v_dkey = kThreads / p.v_chunks, v_dc = kThreads % p.v_chunks;
  auto load_tile = [&](int t, int buf) {
    const int64_t first = range.begin + int64_t(t) * kTile;
    uint4* const kt = reinterpret_cast<uint4*>(ring + buf * layout.tile_bytes);
    uint4* const vt = kt + kTile * p.k_pitch;
    int key = k_key0, c = k_c0;
#pragma unroll 1
    for (int idx = tid; idx < kTile * p.e_chunks; idx += kThreads) {
      const int64_t j = first + key;
      const bool ok = j < cta_end;
      cp_async16(smem_addr(kt + key * p.k_pitch + c), kb + (ok ? j : 0) * p.ks.row + c * kChunk,
                 ok ? 16 : 0);
      key += k_dkey;
      c += k_dc;
      if (c >= p.e_chunks) {
        c -= p.e_chunks;
        ++key;
      }
    }
    key = v_key0;
    c = v_c0;
#pragma unroll 1
    for (int idx = tid; idx < kTile * p.v_chunks; idx += kThreads) {
      const int64_t j = first + key;
      const bool ok = j < cta_end;
      cp_async16(smem_addr(vt + key * p.v_chunks + c), vb + (ok ? j : 0) * p.vs.row + c * kChunk,
                 ok ? 16 : 0);
      key += v_dkey;
      c += v_dc;
      if (c >= p.v_chunks) {
        c -= p.v_chunks;
        ++key;
      }
    }
  };

  // Prologue: stages - 1 tiles in flight; a group is committed even when empty so that the
  // wait below always counts the same number of groups.
  for (int t = 0; t < p.stages - 1; ++t) {
    if (t < tiles) load_tile(t, t);
    cp_async_commit();
  }

  const int score_key = warp * kKeysPerWarp + lane / kLanesPerKey;  // key within the tile
  const int part = lane % kLanesPerKey;
  const KvcachePvLane pv = kvcache_pv_lane(p.v_chunks, lane);

  float m[kRows], l[kRows], o[kRows][kChunk];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) o[r][e] = 0.f;
  }

  int buf = 0;                     // ring slot of tile t
  int next_buf = p.stages - 1;     // ring slot of tile t + stages - 1
  for (int t = 0; t < tiles; ++t) {
    // Tile t has landed once at most stages - 2 newer groups are pending; the barrier makes
    // every thread's copies visible and frees the slot computed in the previous iteration.
    if (p.stages == 3) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t + p.stages - 1 < tiles) load_tile(t + p.stages - 1, next_buf);
    cp_async_commit();
    next_buf = next_buf + 1 == p.stages ? 0 : next_buf + 1;

    const uint4* const kt = reinterpret_cast<const uint4*>(ring + buf * layout.tile_bytes);
    const uint4* const vt = kt + kTile * p.k_pitch;
    buf = buf + 1 == p.stages ? 0 : buf + 1;

    // Scores of this lane's key against every row: a quarter of the chunks, then the sum of
    // the 4 lanes of the key (all 4 get the same bits: fp addition is commutative).
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.f;
    const uint4* const krow = kt + score_key * p.k_pitch;
    for (int c = part; c < p.e_chunks; c += kLanesPerKey) {
      float kf[kChunk];
      chunk_to_float<T>(krow[c], kf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          const float4* qv = reinterpret_cast<const float4*>(q_s + r * E + c * kChunk);
          const float4 a = qv[0], z = qv[1];
          float acc = s[r];
          acc = fmaf(a.x, kf[0], acc);
          acc = fmaf(a.y, kf[1], acc);
          acc = fmaf(a.z, kf[2], acc);
          acc = fmaf(a.w, kf[3], acc);
          acc = fmaf(z.x, kf[4], acc);
          acc = fmaf(z.y, kf[5], acc);
          acc = fmaf(z.z, kf[6], acc);
          acc = fmaf(z.w, kf[7], acc);
          s[r] = acc;
        }
      }
    }

    // Online softmax over the warp's 8 keys. The max is exact, so every lane holds the same
    // m; an all-masked history keeps m = -inf and computes with 0 in its place (no -inf - -inf).
    const int64_t j = range.begin + int64_t(t) * kTile + score_key;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        float sr = s[r] + __shfl_xor_sync(0xffffffffu, s[r], 1);
        sr += __shfl_xor_sync(0xffffffffu, sr, 2);
        sr = j < end_s[r] ? sr : -INFINITY;
        float mt = fmaxf(sr, __shfl_xor_sync(0xffffffffu, sr, 4));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 8));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 16));
        const float m_new = fmaxf(m[r], mt);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m[r] - m_use);
        const float pr = exp2f(sr - m_use);
        m[r] = m_new;
        l[r] = fmaf(l[r], alpha, pr);
#pragma unroll
        for (int e = 0; e < kChunk; ++e) o[r][e] *= alpha;
        if (part == 0) p_s[score_key * kRows + r] = pr;
      }
    }
    __syncwarp();

    // P*V over the warp's keys: this lane's output chunk, its subset of the 8 keys. Masked keys
    // have p = 0 and finite (real or zero-filled) values.
    if (pv.active) {
      for (int k = pv.first_key; k < kKeysPerWarp; k += pv.key_step) {
        const int tk = warp * kKeysPerWarp + k;
        float vf[kChunk];
        chunk_to_float<T>(vt[tk * p.v_chunks + pv.chunk], vf);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r < rows) {
            const float pk = p_s[tk * kRows + r];
#pragma unroll
            for (int e = 0; e < kChunk; ++e) o[r][e] = fmaf(pk, vf[e], o[r][e]);
          }
        }
      }
    }
  }

  // Merge the 4 warps (and a warp's key subsets) through shared memory, reusing the ring.
  cp_async_wait<0>();
  __syncthreads();
  float* const m_m = reinterpret_cast<float*>(ring);
  float* const l_m = m_m + kKvcacheWarps * kRows;
  float* const o_m = l_m + kKvcacheWarps * kRows;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // Lanes of one key hold the same l; sum over the 8 keys.
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 4);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 8);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 16);
    if (r < rows) {
      if (lane == 0) {
        m_m[warp * kRows + r] = m[r];
        l_m[warp * kRows + r] = l[r];
      }
      if (pv.active) {
        float4* dst = reinterpret_cast<float4*>(o_m + (tid * kRows + r) * kChunk);
        dst[0] = make_float4(o[r][0], o[r][1], o[r][2], o[r][3]);
        dst[1] = make_float4(o[r][4], o[r][5], o[r][6], o[r][7]);
      }
    }
  }
  __syncthreads();

  for (int idx = tid; idx < rows * p.v_chunks; idx += kThreads) {
    const int r = idx / p.v_chunks;
    const int c = idx - r * p.v_chunks;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kKvcacheWarps; ++w) M = fmaxf(M, m_m[w * kRows + r]);
    float L = 0.f;
    float acc[kChunk] = {};
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kKvcacheWarps; ++w) {
        const float wt = exp2f(m_m[w * kRows + r] - M);
        L = fmaf(wt, l_m[w * kRows + r], L);
        for (int kq = 0; kq < pv.key_step; ++kq) {
          const float4* src = reinterpret_cast<const float4*>(
              o_m + ((w * kWarp + kq * p.v_chunks + c) * kRows + r) * kChunk);
          const float4 a = src[0], z = src[1];
          acc[0] = fmaf(wt, a.x, acc[0]);
          acc[1] = fmaf(wt, a.y, acc[1]);
          acc[2] = fmaf(wt, a.z, acc[2]);
          acc[3] = fmaf(wt, a.w, acc[3]);
          acc[4] = fmaf(wt, z.x, acc[4]);
          acc[5] = fmaf(wt, z.y, acc[5]);
          acc[6] = fmaf(wt, z.z, acc[6]);
          acc[7] = fmaf(wt, z.w, acc[7]);
        }
      }
    }
    // L >= 1 whenever M is finite (the key at the max contributes 2^0); L == 0: no key seen.
    const float inv = L > 0.f ? 1.f / L : 0.f;
#pragma unroll
    for (int e = 0; e < kChunk; ++e) acc[e] *= inv;
    const int64_t orow = kvcache_out_row(cta.bh, p.group, p.q_len, row0 + r);
    if (p.part_o == nullptr) {
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + orow * Ev + c * kChunk) =
          float_to_chunk<T>(acc);
    } else {
      const int64_t slot = orow * p.splits + cta.split;
      float4* dst = reinterpret_cast<float4*>(p.part_o + slot * Ev + c * kChunk);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (c == 0) p.part_lse[slot] = L > 0.f ? M + log2f(L) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Combine kernel: one warp per output row; lane c (< Ev / 8 <= 32) owns output chunk c.

template <typename T>
__global__ void __launch_bounds__(kCombineWarps * kWarp)
    kvcache_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                           T* __restrict__ out, int64_t rows_out, int splits, int v_chunks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = int64_t(blockIdx.x) * kCombineWarps + threadIdx.x / kWarp;
  if (row >= rows_out) return;
  const float* const lse = part_lse + row * splits;
  float M = -INFINITY;
  for (int s = lane; s < splits; s += kWarp) M = fmaxf(M, lse[s]);
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, mask));
  if (lane >= v_chunks) return;
  const int Ev = v_chunks * kChunk;
  float acc[kChunk] = {};
  float W = 0.f;
  if (M != -INFINITY) {
    // Unrolled by 2, not ptxas's default 4: at 4 the sm_80 build spilled 20 bytes (40
    // registers); 2 still keeps two splits' loads in flight per lane.
#pragma unroll 2
    for (int s = 0; s < splits; ++s) {
      // An empty split has lse = -inf (weight 0) and a zero partial output.
      const float w = exp2f(lse[s] - M);
      const float4* src =
          reinterpret_cast<const float4*>(part_o + (row * splits + s) * Ev + lane * kChunk);
      const float4 a = src[0], z = src[1];
      W += w;
      acc[0] = fmaf(w, a.x, acc[0]);
      acc[1] = fmaf(w, a.y, acc[1]);
      acc[2] = fmaf(w, a.z, acc[2]);
      acc[3] = fmaf(w, a.w, acc[3]);
      acc[4] = fmaf(w, z.x, acc[4]);
      acc[5] = fmaf(w, z.y, acc[5]);
      acc[6] = fmaf(w, z.z, acc[6]);
      acc[7] = fmaf(w, z.w, acc[7]);
    }
  }
  const float inv = W > 0.f ? 1.f / W : 0.f;
#pragma unroll
  for (int e = 0; e < kChunk; ++e) acc[e] *= inv;
  *reinterpret_cast<uint4*>(out + row * Ev + lane * kChunk) = float_to_chunk<T>(acc);
}

// ---------------------------------------------------------------------------------------
// Host side.

// The opt-in shared memory limit, cached per device like multiprocessor_count (device.cuh).
cudaError_t max_smem_optin(int device, int* bytes) {
  static std::atomic<int> cache[kCachedDevices] = {};
  return cached_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache, device, bytes);
}

// The grid of one call; depends on the shape and the SM count only, so that the workspace
// size and the launch agree.
struct Plan {
  int64_t rows_out;  // B * Hq * Tq
  int rows;          // G * Tq
  int chunks;        // row chunks per (batch, kv head)
  int splits;
  int64_t ctas;
};
Plan make_plan(const AttentionShape& s, int sms) {
  Plan plan;
  plan.rows_out = s.batch * s.q_heads * s.q_len;
  plan.rows = static_cast<int>(s.q_heads / s.kv_heads * s.q_len);
  plan.chunks = static_cast<int>(kvcache_row_chunks(plan.rows));
  const int64_t units = s.batch * s.kv_heads * plan.chunks;
  plan.splits = kvcache_num_splits(units, s.kv_len, sms);
  plan.ctas = units * plan.splits;
  return plan;
}

bool strides_ok(const RowStrides& st) {
  return st.batch % kAttentionDimMultiple == 0 && st.head % kAttentionDimMultiple == 0 &&
         st.row % kAttentionDimMultiple == 0;
}

// The sizes the kernels handle: heads and dims in range, every count in int32 where the
// kernels index with it, the grid within gridDim.x.
bool shape_ok(const AttentionShape& s) {
  constexpr int64_t kInt32Max = 2147483647;
  if (s.batch < 0 || s.q_heads < 0 || s.kv_heads < 1 || s.q_len < 0 || s.kv_len < 0) return false;
  if (s.q_heads % s.kv_heads != 0) return false;
  for (const int64_t d : {s.qk_dim, s.v_dim}) {
    if (d < kAttentionDimMultiple || d > kAttentionMaxHeadDim || d % kAttentionDimMultiple != 0)
      return false;
  }
  if (s.q_heads / s.kv_heads * s.q_len > kInt32Max || s.kv_len > kInt32Max) return false;
  const int64_t units = s.batch * s.kv_heads * kvcache_row_chunks(s.q_heads / s.kv_heads * s.q_len);
  return units * kKvcacheMaxSplits <= kInt32Max &&
         s.batch * s.q_heads * s.q_len <= kInt32Max * int64_t(kCombineWarps);
}

template <typename T, int kRows>
cudaError_t launch_split(const KvParams& p, const Plan& plan, int device, cudaStream_t stream) {
  int optin = 0;
  if (const cudaError_t err = max_smem_optin(device, &optin)) return err;
  const SmemLayout layout(kRows, p.e_chunks, p.k_pitch, p.v_chunks);
  KvParams args = p;
  args.stages = layout.total(kMaxStages) <= optin ? kMaxStages : 2;
  const int smem = layout.total(args.stages);
  if (smem > optin) return cudaErrorInvalidConfiguration;
  if (smem > kDefaultSmemBytes) {
    // Opt in to the device's maximum once per device and instantiation (the setting is
    // per function and device, and stays).
    static std::atomic<int> opted[kCachedDevices] = {};
    const bool cacheable = device >= 0 && device < kCachedDevices;
    if (!cacheable || opted[device].load(std::memory_order_relaxed) == 0) {
      if (const cudaError_t err = cudaFuncSetAttribute(
              kvcache_split_kernel<T, kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin))
        return err;
      if (cacheable) opted[device].store(1, std::memory_order_relaxed);
    }
  }
  kvcache_split_kernel<T, kRows>
      <<<static_cast<unsigned>(plan.ctas), kThreads, static_cast<size_t>(smem), stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const KvParams& p, const Plan& plan, int device, cudaStream_t stream) {
  // Groups of more than 8 rows run as 8-row chunks of the 8-row variant.
  const cudaError_t err = plan.rows <= 4 ? launch_split<T, 4>(p, plan, device, stream)
                                          : launch_split<T, 8>(p, plan, device, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t grid = kvcache_ceil_div(plan.rows_out, kCombineWarps);
  kvcache_combine_kernel<T><<<static_cast<unsigned>(grid), kCombineWarps * kWarp, 0, stream>>>(
      p.part_o, p.part_lse, static_cast<T*>(p.out), plan.rows_out, plan.splits, p.v_chunks);
  return cudaGetLastError();
}

}  // namespace

size_t attention_with_kvcache_workspace_bytes(const AttentionShape& shape, int device) {
  if (!shape_ok(shape) || shape.batch * shape.q_heads * shape.q_len == 0) return 0;
  int sms = 0;
  // On failure attention_with_kvcache fails the same query and launches nothing, so 0 is safe.
  if (multiprocessor_count(device, &sms) != cudaSuccess) return 0;
  const Plan plan = make_plan(shape, sms);
  if (plan.splits == 1) return 0;
  return static_cast<size_t>(plan.rows_out) * static_cast<size_t>(plan.splits) *
         static_cast<size_t>(shape.v_dim + 1) * sizeof(float);
}

cudaError_t attention_with_kvcache(DType dtype, const AttentionShape& shape, float scale,
                                   const void* q, const RowStrides& q_strides,
                                   const void* k_cache, const RowStrides& k_strides,
                                   const void* v_cache, const RowStrides& v_strides,
                                   const int32_t* kv_lens, void* out, void* workspace,
                                   int device, cudaStream_t stream) {
  if ((dtype != DType::kFloat16 && dtype != DType::kBFloat16) || !shape_ok(shape) ||
      !strides_ok(q_strides) || !strides_ok(k_strides) || !strides_ok(v_strides) ||
      !aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache) || !aligned16(out) ||
      !aligned16(workspace) || reinterpret_cast<uintptr_t>(kv_lens) % alignof(int32_t) != 0) {
    return cudaErrorInvalidValue;
  }
  if (shape.batch * shape.q_heads * shape.q_len == 0) return cudaSuccess;
  if (q == nullptr || out == nullptr || kv_lens == nullptr ||
      (shape.kv_len > 0 && (k_cache == nullptr || v_cache == nullptr))) {
    return cudaErrorInvalidValue;
  }
  int sms = 0;
  if (const cudaError_t err = multiprocessor_count(device, &sms)) return err;
  const Plan plan = make_plan(shape, sms);
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;

  KvParams p;
  p.q = q;
  p.qs = q_strides;
  p.k = k_cache;
  p.ks = k_strides;
  p.v = v_cache;
  p.vs = v_strides;
  p.kv_lens = kv_lens;
  p.out = out;
  // Workspace layout: partial outputs (rows_out, splits, Ev), then their lse (rows_out, splits);
  // the lse block starts 16-byte aligned since Ev is a multiple of 8.
  float* const ws = static_cast<float*>(workspace);
  p.part_o = plan.splits > 1 ? ws : nullptr;
  p.part_lse = plan.splits > 1 ? ws + plan.rows_out * plan.splits * shape.v_dim : nullptr;
  p.kv_len = shape.kv_len;
  p.q_len = static_cast<int>(shape.q_len);
  p.group = static_cast<int>(shape.q_heads / shape.kv_heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.rows = plan.rows;
  p.chunks = plan.chunks;
  p.splits = plan.splits;
  p.stages = kMaxStages;
  p.e_chunks = static_cast<int>(shape.qk_dim / kChunk);
  p.v_chunks = static_cast<int>(shape.v_dim / kChunk);
  p.k_pitch = kvcache_smem_row_chunks(p.e_chunks, kLanesPerKey);
  p.scale_log2 = scale * kLog2e;
  return dtype == DType::kFloat16 ? launch_typed<__half>(p, plan, device, stream)
                                  : launch_typed<__nv_bfloat16>(p, plan, device, stream);
}

}  // namespace cuda
}  // namespace fastgpt
