// CUDA LayerNorm / RMSNorm, forward and backward; the contract is in layernorm.h.
//
// Work layout (forward and backward alike). A *row group* of blockDim.x threads (whole
// warps) owns one row at a time; a CTA holds blockDim.y row groups and walks the rows with
// a grid-stride loop. A row is cut into vectors of kVec elements (16 bytes when the launcher
// proved every row start aligned, else one element) and each thread keeps kItems of them in
// registers: in chunk c, item i, thread tx holds vector
//     v = c * (blockDim.x * kItems) + i * blockDim.x + tx,
// so a warp reads 32 consecutive vectors per item (fully coalesced 16-byte accesses). Rows
// longer than one chunk (see the *_items functions for where that starts) are walked chunk
// by chunk: the statistics pass streams every chunk, the output pass walks the chunks
// backwards so the last one is still in registers and only the others are re-read (from
// L2, most likely: the row was read a moment ago).
//
// Statistics are fp32. LayerNorm: each thread computes the exact mean and M2 (sum of
// squared deviations) of its own values by two passes over its registers, then threads are
// merged pairwise with Chan's update. The merge order is a fixed tree, and in each
// butterfly step the lower lane is always the left operand, so every thread of the row
// ends up with bit-identical mean and rstd, and results do not depend on scheduling.
// RMSNorm keeps only the sum of squares (no cancellation, so a plain sum is exact enough).
//
// Backward fuses dx with dweight/dbias: a CTA keeps per-column partial sums for its rows in
// registers, writes one partial row per CTA into the workspace, and a second kernel sums
// the partial rows per column in a fixed order (deterministic, no atomics). Rows too long
// for that get a dx-only pass plus a column-partials kernel that re-reads src and dy.
#include "cuda/device.cuh"
#include "cuda/layernorm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastgpt {
namespace cuda {
namespace {

constexpr int kVecBytes = 16;

// Forward: a row group of up to 512 threads, so each may use 128 registers (ptxas, sm_80 to
// sm_120: 66-128 with fwd_items below, no spills; 1024 threads would cap them at 64 and
// serialise the loads); a CTA aims at 128 threads, so that several CTAs (rows) are resident
// per SM and their load, reduce and store phases overlap.
constexpr int kFwdMaxCtaThreads = 512;
constexpr int kFwdCtaThreads = 128;
// Backward: the same 128-register budget (512 threads). A row group also carries the
// dweight/dbias partial sums and the next row's prefetch, so only one CTA fits per SM;
// it is filled to 512 threads with several row groups for rows shorter than that.
constexpr int kBwdMaxCtaThreads = 512;
constexpr int kBwdCtaThreads = 512;
// Persistent backward CTAs per SM (= partial rows per SM): every norm_bwd_kernel variant
// uses 111-128 registers (sm_80 to sm_120) x 512 threads, the whole register file, so one
// is resident per SM; more would only add partial-sum traffic (each CTA writes, and the
// reducer reads, 4 * N bytes per accumulator: 132 rows on an H100, ~2% of the traffic of a
// bf16 LayerNorm backward with dweight and dbias over 16K rows).
constexpr int kBwdCtasPerSm = 1;
// Cap on forward / dx-only grids; the grid-stride loop covers anything beyond (gridDim.x
// allows 2^31 - 1, and 16M CTAs is far past any number that keeps a GPU busy).
constexpr int64_t kMaxGridCtas = int64_t(1) << 24;

// Row groups of more than one warp synchronise on their own named barrier (1 + group index;
// 0 is __syncthreads), so the groups of a CTA never wait for each other.
static_assert(kFwdCtaThreads / (2 * kWarp) <= 15 && kBwdCtaThreads / (2 * kWarp) <= 15,
              "named barriers 1..15 must cover every multi-warp row group of a CTA");

// Vectors each thread holds per chunk (T: x's type, P: weight's), chosen so that every
// variant compiles without spills for every default architecture (ptxas -v, CUDA 13.0,
// sm_80 to sm_120). Forward: 8 vectors (32 registers of row data) or 16 scalar elements;
// 16-bit x with fp32 weight and bias takes 6: their 32-byte Pack<float, 8> loads, which
// ptxas hoists for all items, made the bf16 LayerNorm variant spill with 8 (sm_80: 128
// registers, 16 bytes spill stores; sm_86: 8 bytes; with 6: 128 registers, no spills).
// Backward: weight, src and dy of this row and the next, and two fp32 partial sums per
// element; fp32 weights beside 16-bit x fit the same 2 items (127-128 registers, no spills
// on any default architecture). A row fits one chunk up to 512 threads x items x kVec
// elements: forward 32768 (16-bit; 24576 with fp32 weights), 16384 (fp32), 8192 (scalar);
// backward 8192, 6144 and 3072. Longer rows are walked in chunks (see launch_bwd).
template <typename T, typename P, int kVec>
__host__ __device__ constexpr int fwd_items() {
  return kVec == 1 ? 16 : (sizeof(T) == 2 && sizeof(P) == 4 ? 6 : 8);
}
template <typename T, typename P, int kVec>
__host__ __device__ constexpr int bwd_items() {
  return kVec == 1 ? 6 : (sizeof(T) == 4 ? 3 : 2);
}

// ---------------------------------------------------------------------------------------
// Element access (to_float, from_float, pack2: device.cuh).

// Element 2k (lo) or 2k + 1 (hi) of a word that pack2 filled, one at a time: get(j) converts
// only the element it reads.
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  __device__ static float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ static float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
};
template <>
struct Pair<__nv_bfloat16> {
  __device__ static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};

// kVec consecutive elements moved with one access. get(j) reads element j as float; of()
// rounds kVec floats into a pack. Pairs of 16-bit elements are kept packed in 32-bit
// words: as separate elements the compiler gives each its own register, doubling the
// register cost of a row held in registers.
template <typename T, int kVec, bool kPaired = sizeof(T) == 2 && kVec % 2 == 0>
struct alignas(std::min<size_t>(sizeof(T) * kVec, kVecBytes)) Pack {
  T v[kVec];
  __device__ float get(int j) const { return to_float(v[j]); }
  __device__ static Pack of(const float (&f)[kVec]) {
    Pack p;
#pragma unroll
    for (int j = 0; j < kVec; ++j) p.v[j] = from_float<T>(f[j]);
    return p;
  }
};
template <typename T, int kVec>
struct alignas(std::min<size_t>(sizeof(T) * kVec, kVecBytes)) Pack<T, kVec, true> {
  uint32_t w[kVec / 2];
  __device__ float get(int j) const { return j % 2 ? Pair<T>::hi(w[j / 2]) : Pair<T>::lo(w[j / 2]); }
  __device__ static Pack of(const float (&f)[kVec]) {
    Pack p;
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) p.w[k] = pack2<T>(f[2 * k], f[2 * k + 1]);
    return p;
  }
};

template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* row, int v) {
  return reinterpret_cast<const Pack<T, kVec>*>(row)[v];
}
template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* row, int v, const Pack<T, kVec>& p) {
  reinterpret_cast<Pack<T, kVec>*>(row)[v] = p;
}

// Weight (or bias) of one vector as floats; `fill` stands in when the tensor is absent.
template <int kVec, typename T>
__device__ __forceinline__ void load_affine(const T* t, int v, float fill, float (&out)[kVec]) {
  if (t == nullptr) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = fill;
    return;
  }
  const Pack<T, kVec> p = load_pack<kVec>(t, v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = p.get(j);
}

// ---------------------------------------------------------------------------------------
// Row-group reductions. A payload P provides identity(), combine(lower, upper),
// shfl_xor(p, lane_mask) and pick(cond, a, b) (a field-wise select: selecting whole structs
// makes the compiler take their addresses and put them in local memory).

// Mean and M2 of a set of values (LayerNorm); RMSNorm keeps only m2 = sum of squares.
template <bool kRms>
struct Moments {
  float n, mean, m2;
  __device__ static Moments identity() { return {0.f, 0.f, 0.f}; }
  // Chan, Golub & LeVeque pairwise update. An empty a never meets a non-empty b (valid
  // elements are a prefix of the lanes and warps). An empty b returns a as it is: the update
  // formula would add delta * delta * a.n * 0, which is NaN once delta * delta overflows
  // (|mean| > 1.8e19).
  __device__ static Moments combine(const Moments& a, const Moments& b) {
    if constexpr (kRms) {
      return {0.f, 0.f, a.m2 + b.m2};
    } else {
      if (b.n == 0.f) return a;
      const float n = a.n + b.n;
      const float wb = __fdividef(b.n, n);
      const float delta = b.mean - a.mean;
      return {n, fmaf(delta, wb, a.mean), a.m2 + b.m2 + delta * delta * a.n * wb};
    }
  }
  __device__ static Moments shfl_xor(const Moments& p, int mask) {
    if constexpr (kRms) {
      return {0.f, 0.f, __shfl_xor_sync(0xffffffffu, p.m2, mask)};
    } else {
      return {__shfl_xor_sync(0xffffffffu, p.n, mask), __shfl_xor_sync(0xffffffffu, p.mean, mask),
              __shfl_xor_sync(0xffffffffu, p.m2, mask)};
    }
  }
  __device__ static Moments pick(bool cond, const Moments& a, const Moments& b) {
    return {cond ? a.n : b.n, cond ? a.mean : b.mean, cond ? a.m2 : b.m2};
  }
};

// Row sums of g = dy * w and g * xhat (backward); RMSNorm needs only the second.
template <bool kRms>
struct GradSums {
  float g, gx;
  __device__ static GradSums identity() { return {0.f, 0.f}; }
  __device__ static GradSums combine(const GradSums& a, const GradSums& b) {
    return {a.g + b.g, a.gx + b.gx};
  }
  __device__ static GradSums shfl_xor(const GradSums& p, int mask) {
    if constexpr (kRms) {
      return {0.f, __shfl_xor_sync(0xffffffffu, p.gx, mask)};
    } else {
      return {__shfl_xor_sync(0xffffffffu, p.g, mask), __shfl_xor_sync(0xffffffffu, p.gx, mask)};
    }
  }
  __device__ static GradSums pick(bool cond, const GradSums& a, const GradSums& b) {
    return {cond ? a.g : b.g, cond ? a.gx : b.gx};
  }
};

// Butterfly over the warp; every lane gets the same bits (the lower lane is always `a`).
template <typename P>
__device__ __forceinline__ P warp_allreduce(P p) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int mask = 1; mask < kWarp; mask <<= 1) {
    const P other = P::shfl_xor(p, mask);
    const bool upper = lane & mask;
    p = P::combine(P::pick(upper, other, p), P::pick(upper, p, other));
  }
  return p;
}

// Every thread of the calling row group gets the combination over the whole group.
// scratch holds one slot per warp of the CTA, double-buffered: a group alternates buffers
// between consecutive calls, and its barrier in call k+1 orders call k's reads before
// call k+2's writes, so one barrier per call suffices.
template <typename P>
__device__ __forceinline__ P row_group_allreduce(P p, P (&scratch)[2][kWarp], int& parity) {
  p = warp_allreduce(p);
  if (blockDim.x == kWarp) return p;
  const int warps = blockDim.x / kWarp;
  const int first_warp = threadIdx.y * warps;
  const int lane = threadIdx.x % kWarp;
  P* slot = scratch[parity];
  parity ^= 1;
  if (lane == 0) slot[first_warp + threadIdx.x / kWarp] = p;
  asm volatile("bar.sync %0, %1;" ::"r"(1 + threadIdx.y), "r"(blockDim.x) : "memory");
  return warp_allreduce(P::pick(lane < warps, slot[first_warp + (lane < warps ? lane : 0)],
                                P::identity()));
}

// Which vectors of a chunk this thread holds: item i is vector `first + i * stride`. Items
// past the end of the row are clamped onto the last vector (a re-read of a cached line)
// so that every load is unconditional and can be issued back to back; they are masked
// out of the row sums and never stored.
template <int kItems>
struct Slice {
  int idx[kItems];
  bool valid[kItems];
  __device__ __forceinline__ Slice(int first, int stride, int vecs) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = first + i * stride;
      valid[i] = v < vecs;
      idx[i] = valid[i] ? v : vecs - 1;
    }
  }
};

template <int kItems, int kVec, typename T>
__device__ __forceinline__ void load_slice(const T* row, const Slice<kItems>& s,
                                           Pack<T, kVec> (&buf)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) buf[i] = load_pack<kVec>(row, s.idx[i]);
}

// Moments of this thread's values in one chunk: exact mean, then squared deviations from
// it (two passes over registers). RMSNorm: sum of squares.
template <bool kRms, int kItems, int kVec, typename T>
__device__ __forceinline__ Moments<kRms> thread_moments(const Pack<T, kVec> (&buf)[kItems],
                                                        const Slice<kItems>& s) {
  float n = 0.f, sum = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = buf[i].get(j);
      part = kRms ? fmaf(f, f, part) : part + f;
    }
    sum += s.valid[i] ? part : 0.f;
    n += s.valid[i] ? float(kVec) : 0.f;
  }
  if constexpr (kRms) {
    return {0.f, 0.f, sum};
  } else {
    const float mean = n > 0.f ? __fdividef(sum, n) : 0.f;
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float d = buf[i].get(j) - mean;
        part = fmaf(d, d, part);
      }
      m2 += s.valid[i] ? part : 0.f;
    }
    return {n, mean, m2};
  }
}

// ---------------------------------------------------------------------------------------
// Forward.

// The forward input of this thread's slice: x, or round(x + residual) when rr is given. All
// loads are issued before the first add.
template <int kItems, int kVec, typename T>
__device__ __forceinline__ void load_normalised_input(const T* xr, const T* rr,
                                                      const Slice<kItems>& s,
                                                      Pack<T, kVec> (&buf)[kItems]) {
  load_slice(xr, s, buf);
  if (rr == nullptr) return;
  Pack<T, kVec> r[kItems];
  load_slice(rr, s, r);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    float sum[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum[j] = buf[i].get(j) + r[i].get(j);
    buf[i] = Pack<T, kVec>::of(sum);
  }
}

// Arguments: as in norm_fwd (layernorm.h); outputs must not overlap inputs. h is written
// iff residual is given; mean is null for RMSNorm.
template <typename T, typename P, bool kRms, int kVec>
__global__ void __launch_bounds__(kFwdMaxCtaThreads)
    norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                    int64_t res_stride, const P* __restrict__ weight, const P* __restrict__ bias,
                    T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean,
                    float* __restrict__ rstd, int64_t M, int N, float eps) {
  using V = Pack<T, kVec>;
  constexpr int kItems = fwd_items<T, P, kVec>();
  const int tx = threadIdx.x;
  const int stride = blockDim.x;
  const int vecs = N / kVec;
  const int chunk = stride * kItems;
  const int chunks = (vecs + chunk - 1) / chunk;
  const float inv_n = 1.f / static_cast<float>(N);

  __shared__ Moments<kRms> scratch[2][kWarp];
  int parity = 0;

  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < M;
       row += int64_t(gridDim.x) * blockDim.y) {
    const T* xr = x + row * x_stride;
    const T* rr = residual != nullptr ? residual + row * res_stride : nullptr;
    T* hr = residual != nullptr ? h + row * N : nullptr;
    T* yr = y + row * N;

    // Pass 1: load, per-thread moments; with a residual, h = round(x + residual) is what is
    // stored and normalised.
    V buf[kItems];
    Moments<kRms> st = Moments<kRms>::identity();
    for (int c = 0; c < chunks; ++c) {
      const Slice<kItems> s(c * chunk + tx, stride, vecs);
      load_normalised_input(xr, rr, s, buf);
      if (hr != nullptr) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          if (s.valid[i]) store_pack<kVec>(hr, s.idx[i], buf[i]);
        }
      }
      const Moments<kRms> m = thread_moments<kRms>(buf, s);
      st = c == 0 ? m : Moments<kRms>::combine(st, m);
    }

    st = row_group_allreduce(st, scratch, parity);
    const float mu = kRms ? 0.f : st.mean;
    const float rs = rsqrtf(st.m2 * inv_n + eps);
    if (tx == 0) {
      if (mean != nullptr) mean[row] = mu;
      if (rstd != nullptr) rstd[row] = rs;
    }

    // Pass 2: normalise, last chunk first (still in registers). Earlier chunks are
    // recomputed from x and residual, not re-read from h: h is written by this kernel, so
    // reading it back through the read-only path these inputs use would not be safe.
    for (int c = chunks - 1; c >= 0; --c) {
      const Slice<kItems> s(c * chunk + tx, stride, vecs);
      if (c != chunks - 1) load_normalised_input(xr, rr, s, buf);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        float w[kVec], b[kVec];
        load_affine<kVec>(weight, s.idx[i], 1.f, w);
        load_affine<kVec>(bias, s.idx[i], 0.f, b);
        float out[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) out[j] = fmaf((buf[i].get(j) - mu) * rs, w[j], b[j]);
        if (s.valid[i]) store_pack<kVec>(yr, s.idx[i], V::of(out));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward.

// dx for every row and, when part_dw / part_db are set, this CTA's partial row of dweight /
// dbias (partial rows are [gridDim.x, N]; the launcher sets them only when a row fits one
// chunk, so the sums of the thread's columns fit in registers, and makes the grid
// persistent). Other arguments as in norm_bwd (layernorm.h); dx must not overlap inputs.
//
// A row group holds src, dy and the partial sums of a whole row, so only one or two row
// groups fit in an SM's registers (bf16 LayerNorm at N = 8192: 3 registers per element).
// To keep memory busy anyway, a row that fits one chunk is *resident*: weight is loaded
// once, and the next row's src, dy and statistics are loaded while this row is computed.
//
// __launch_bounds__ minBlocks 1: without it ptxas for sm_120 gave the fp32 RMSNorm scalar
// variant 64 registers and 28 bytes of spill stores (CUDA 13.0); with it, 128 and no spills.
template <typename T, typename P, bool kRms, int kVec>
__global__ void __launch_bounds__(kBwdMaxCtaThreads, 1)
    norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh,
                    const T* __restrict__ src, int64_t src_stride, const P* __restrict__ weight,
                    const float* __restrict__ mean, const float* __restrict__ rstd,
                    T* __restrict__ dx, float* __restrict__ part_dw, float* __restrict__ part_db,
                    int64_t M, int N) {
  using V = Pack<T, kVec>;
  using W = Pack<P, kVec>;
  constexpr int kItems = bwd_items<T, P, kVec>();
  const int tx = threadIdx.x;
  const int stride = blockDim.x;
  const int vecs = N / kVec;
  const int chunk = stride * kItems;
  const int chunks = (vecs + chunk - 1) / chunk;
  const bool resident = chunks == 1;
  const float inv_n = 1.f / static_cast<float>(N);
  const int64_t step = int64_t(gridDim.x) * blockDim.y;

  // Partial sums of this thread's columns over the CTA's rows. Clamped items accumulate
  // duplicates of the last vector; their columns lie past N and are never written.
  float acc_dw[kItems][kVec] = {};
  float acc_db[kItems][kVec] = {};

  __shared__ GradSums<kRms> scratch[2][kWarp];
  int parity = 0;

  // Row data: src, dy, weight (raw) and the row's statistics; *_next is the prefetch.
  V sbuf[kItems], dbuf[kItems], snext[kItems], dnext[kItems];
  W wbuf[kItems];
  float mu = 0.f, rs = 0.f, mu_next = 0.f, rs_next = 0.f;
  auto load_row = [&](int64_t r, const Slice<kItems>& s, V(&sb)[kItems], V(&db)[kItems],
                      float& m, float& rsd) {
    load_slice(src + r * src_stride, s, sb);
    load_slice(dy + r * N, s, db);
    m = kRms ? 0.f : mean[r];
    rsd = rstd[r];
  };

  int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (resident) {
    const Slice<kItems> s(tx, stride, vecs);
    if (weight != nullptr) load_slice(weight, s, wbuf);
    if (row < M) load_row(row, s, sbuf, dbuf, mu, rs);
  }
  for (; row < M; row += step) {
    if (resident) {
      if (row + step < M) load_row(row + step, Slice<kItems>(tx, stride, vecs), snext, dnext,
                                   mu_next, rs_next);
    } else {
      mu = kRms ? 0.f : mean[row];
      rs = rstd[row];
    }
    const T* sr = src + row * src_stride;
    const T* dyr = dy + row * N;
    const T* dhr = dh != nullptr ? dh + row * N : nullptr;
    T* dxr = dx + row * N;

    // Pass 1: row sums of g = dy * w and g * xhat, and the partial sums.
    GradSums<kRms> sums = GradSums<kRms>::identity();
    for (int c = 0; c < chunks; ++c) {
      const Slice<kItems> s(c * chunk + tx, stride, vecs);
      if (!resident) {
        load_slice(sr, s, sbuf);
        load_slice(dyr, s, dbuf);
        if (weight != nullptr) load_slice(weight, s, wbuf);
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        GradSums<kRms> part = GradSums<kRms>::identity();
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float xhat = (sbuf[i].get(j) - mu) * rs;
          const float d = dbuf[i].get(j);
          const float g = weight != nullptr ? d * wbuf[i].get(j) : d;
          part.g += g;
          part.gx = fmaf(g, xhat, part.gx);
          acc_dw[i][j] = fmaf(d, xhat, acc_dw[i][j]);
          acc_db[i][j] += d;
        }
        sums = GradSums<kRms>::combine(sums, s.valid[i] ? part : GradSums<kRms>::identity());
      }
    }

    sums = row_group_allreduce(sums, scratch, parity);
    const float mean_g = kRms ? 0.f : sums.g * inv_n;
    const float mean_gx = sums.gx * inv_n;

    // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh, last chunk first
    // (still in registers).
    for (int c = chunks - 1; c >= 0; --c) {
      const Slice<kItems> s(c * chunk + tx, stride, vecs);
      if (c != chunks - 1) {
        load_slice(sr, s, sbuf);
        load_slice(dyr, s, dbuf);
        if (weight != nullptr) load_slice(weight, s, wbuf);
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        float res[kVec];
        load_affine<kVec>(dhr, s.idx[i], 0.f, res);
        float out[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float xhat = (sbuf[i].get(j) - mu) * rs;
          const float d = dbuf[i].get(j);
          const float g = weight != nullptr ? d * wbuf[i].get(j) : d;
          out[j] = fmaf(rs, g - mean_g - xhat * mean_gx, res[j]);
        }
        if (s.valid[i]) store_pack<kVec>(dxr, s.idx[i], V::of(out));
      }
    }

    if (resident) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        sbuf[i] = snext[i];
        dbuf[i] = dnext[i];
      }
      mu = mu_next;
      rs = rs_next;
    }
  }

  // Combine the row groups' partial sums into this CTA's partial rows, item by item: stage
  // every group's kVec-wide slice in shared memory, then each thread adds one column over
  // the groups in a fixed order and writes it (coalesced).
  if (part_dw == nullptr && part_db == nullptr) return;
  __shared__ Pack<float, kVec> stage[kBwdMaxCtaThreads];
  const int tid = threadIdx.y * stride + tx;
  const int cta_threads = stride * blockDim.y;
  const int group_floats = stride * kVec;
  const float* staged = reinterpret_cast<const float*>(stage);
  __syncthreads();  // every group is done with its rows
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float* part = which == 0 ? part_dw : part_db;
    if (part == nullptr) continue;
    part += int64_t(blockIdx.x) * N;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      Pack<float, kVec> mine;
#pragma unroll
      for (int j = 0; j < kVec; ++j) mine.v[j] = which == 0 ? acc_dw[i][j] : acc_db[i][j];
      stage[tid] = mine;
      __syncthreads();
      for (int c = tid; c < group_floats; c += cta_threads) {
        const int col = i * group_floats + c;
        if (col >= N) break;
        float sum = 0.f;
        for (int g = 0; g < static_cast<int>(blockDim.y); ++g) sum += staged[g * group_floats + c];
        part[col] = sum;
      }
      __syncthreads();
    }
  }
}

// Partial rows of dweight / dbias for rows too long for norm_bwd_kernel to keep the sums in
// registers: thread (column vector v = blockIdx.x * blockDim.x + threadIdx.x, partial row
// blockIdx.y) sums rows blockIdx.y, blockIdx.y + gridDim.y, ... This re-reads src and dy
// (the fused path does not), which is the price of N beyond the fused capacity.
constexpr int kColPartialThreads = 256;

template <typename T, bool kRms, int kVec>
__global__ void __launch_bounds__(kColPartialThreads)
    norm_bwd_col_partials_kernel(const T* __restrict__ dy, const T* __restrict__ src,
                                 int64_t src_stride, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, float* __restrict__ part_dw,
                                 float* __restrict__ part_db, int64_t M, int N) {
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= N / kVec) return;
  float acc_dw[kVec] = {}, acc_db[kVec] = {};
#pragma unroll 4
  for (int64_t row = blockIdx.y; row < M; row += gridDim.y) {
    const Pack<T, kVec> s = load_pack<kVec>(src + row * src_stride, v);
    const Pack<T, kVec> d = load_pack<kVec>(dy + row * N, v);
    const float mu = kRms ? 0.f : mean[row];
    const float rs = rstd[row];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float dv = d.get(j);
      acc_dw[j] = fmaf(dv, (s.get(j) - mu) * rs, acc_dw[j]);
      acc_db[j] += dv;
    }
  }
  const int64_t base = int64_t(blockIdx.y) * N + int64_t(v) * kVec;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (part_dw != nullptr) part_dw[base + j] = acc_dw[j];
    if (part_db != nullptr) part_db[base + j] = acc_db[j];
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

struct RowShape {
  int threads_per_row;  // blockDim.x, a multiple of 32
  int rows_per_cta;     // blockDim.y
  int chunks;           // passes over the row per thread's registers
};

// The one launch heuristic, shared by forward and backward. A row of `vecs` vectors needs
// ceil(vecs / items) threads to sit in registers.
//  - Up to one warp's worth: a warp per row (reductions are shuffles only, no barrier) and
//    cta_threads / 32 rows per CTA.
//  - Beyond: a block of that many threads per row (rounded to whole warps) so every thread
//    uses all its register slots and as many rows as possible are resident per SM; rows
//    that need more than max_threads threads are walked in chunks. Groups smaller than
//    cta_threads are packed cta_threads / T per CTA (each with its own named barrier).
RowShape pick_row_shape(int vecs, int items, int cta_threads, int max_threads) {
  const int needed = (vecs + items - 1) / items;
  if (needed <= kWarp) return {kWarp, cta_threads / kWarp, 1};
  const int threads = std::min((needed + kWarp - 1) / kWarp * kWarp, max_threads);
  const int per_chunk = threads * items;
  return {threads, std::max(1, cta_threads / threads), (vecs + per_chunk - 1) / per_chunk};
}

static_assert(kVecBytes == 16, "vector accesses are the 16 bytes aligned16 checks");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Partial rows of a backward that produces dweight/dbias (= CTAs of the persistent grid).
// Depends on M and the device only, so norm_bwd_workspace_bytes can size the workspace
// before the dtype and alignment (hence the CTA shape) are known.
int64_t num_partial_rows(int64_t M, int sms) {
  return std::min<int64_t>(M, int64_t(sms) * kBwdCtasPerSm);
}

// The arguments of norm_fwd / norm_bwd as the launchers pass them around (RMSNorm's bias
// and mean already dropped, h dropped without a residual).
struct FwdArgs {
  const void *x, *residual, *weight, *bias;
  void *y, *h;
  float *mean, *rstd;
  int64_t x_stride, res_stride, M;
  int N;
  float eps;
};
struct BwdArgs {
  const void *dy, *dh, *src, *weight;
  const float *mean, *rstd;
  void* dx;
  float *part_dw, *part_db;  // workspace partial rows, null when not requested
  int64_t src_stride, M;
  int N;
};

template <typename T, typename P, bool kRms, int kVec>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const RowShape s =
      pick_row_shape(a.N / kVec, fwd_items<T, P, kVec>(), kFwdCtaThreads, kFwdMaxCtaThreads);
  const int64_t grid = std::min(ceil_div(a.M, s.rows_per_cta), kMaxGridCtas);
  norm_fwd_kernel<T, P, kRms, kVec>
      <<<static_cast<unsigned>(grid), dim3(s.threads_per_row, s.rows_per_cta), 0, stream>>>(
          static_cast<const T*>(a.x), a.x_stride, static_cast<const T*>(a.residual),
          a.res_stride, static_cast<const P*>(a.weight), static_cast<const P*>(a.bias),
          static_cast<T*>(a.y), static_cast<T*>(a.h), a.mean, a.rstd, a.M, a.N, a.eps);
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t norm_fwd_typed(bool rms, const FwdArgs& a, cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  // Every row start must be 16-byte aligned: base pointers aligned and row strides (N for
  // the contiguous outputs) whole vectors. Float weight and bias beside 16-bit x come in
  // Pack<float, 8> of 32 bytes, but that type is aligned to 16 (Pack's alignas caps it), so
  // the compiler emits two 16-byte accesses and a 16-byte aligned base suffices (vector v
  // starts at byte 32 * v).
  const bool vec = a.N % kVec == 0 && a.x_stride % kVec == 0 && a.res_stride % kVec == 0 &&
                   aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) &&
                   aligned16(a.bias) && aligned16(a.y) && aligned16(a.h);
  if (rms) {
    return vec ? launch_fwd<T, P, true, kVec>(a, stream) : launch_fwd<T, P, true, 1>(a, stream);
  }
  return vec ? launch_fwd<T, P, false, kVec>(a, stream) : launch_fwd<T, P, false, 1>(a, stream);
}

// dx, and the partial rows of dweight / dbias (partial_rows of them, 0 when neither is
// requested): fused into the dx pass when a row fits in registers, else computed by
// norm_bwd_col_partials_kernel after a dx-only pass.
template <typename T, typename P, bool kRms, int kVec>
cudaError_t launch_bwd(const BwdArgs& a, int64_t partial_rows, cudaStream_t stream) {
  const int vecs = a.N / kVec;
  const RowShape s =
      pick_row_shape(vecs, bwd_items<T, P, kVec>(), kBwdCtaThreads, kBwdMaxCtaThreads);
  const bool fused = partial_rows > 0 && s.chunks == 1;
  const int64_t grid =
      fused ? partial_rows : std::min(ceil_div(a.M, s.rows_per_cta), kMaxGridCtas);
  norm_bwd_kernel<T, P, kRms, kVec>
      <<<static_cast<unsigned>(grid), dim3(s.threads_per_row, s.rows_per_cta), 0, stream>>>(
          static_cast<const T*>(a.dy), static_cast<const T*>(a.dh), static_cast<const T*>(a.src),
          a.src_stride, static_cast<const P*>(a.weight), a.mean, a.rstd, static_cast<T*>(a.dx),
          fused ? a.part_dw : nullptr, fused ? a.part_db : nullptr, a.M, a.N);
  if (fused || partial_rows == 0) return cudaGetLastError();
  const dim3 cols(static_cast<unsigned>(ceil_div(vecs, kColPartialThreads)),
                  static_cast<unsigned>(partial_rows));
  norm_bwd_col_partials_kernel<T, kRms, kVec><<<cols, kColPartialThreads, 0, stream>>>(
      static_cast<const T*>(a.dy), static_cast<const T*>(a.src), a.src_stride, a.mean, a.rstd,
      a.part_dw, a.part_db, a.M, a.N);
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t norm_bwd_typed(bool rms, const BwdArgs& a, int64_t partial_rows,
                           cudaStream_t stream) {
  constexpr int kVec = kVecBytes / sizeof(T);
  const bool vec = a.N % kVec == 0 && a.src_stride % kVec == 0 && aligned16(a.dy) &&
                   aligned16(a.dh) && aligned16(a.src) && aligned16(a.weight) && aligned16(a.dx);
  if (rms) {
    return vec ? launch_bwd<T, P, true, kVec>(a, partial_rows, stream)
               : launch_bwd<T, P, true, 1>(a, partial_rows, stream);
  }
  return vec ? launch_bwd<T, P, false, kVec>(a, partial_rows, stream)
             : launch_bwd<T, P, false, 1>(a, partial_rows, stream);
}

// The one table from (dtype, param_dtype) to element types: calls
// launch(TypeTag<T>{}, TypeTag<P>{}) with P = T or P = float, and refuses anything else.
// For float x the two coincide, so nothing is instantiated twice.
template <typename Launch>
cudaError_t with_types(DType dtype, DType param_dtype, Launch&& launch) {
  auto with_params = [&](auto t) -> cudaError_t {
    if (param_dtype == dtype) return launch(t, t);
    if (param_dtype == DType::kFloat32) return launch(t, TypeTag<float>{});
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kFloat32: return with_params(TypeTag<float>{});
    case DType::kFloat16: return with_params(TypeTag<__half>{});
    case DType::kBFloat16: return with_params(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t norm_fwd(DType dtype, DType param_dtype, bool rms, const void* x, int64_t x_row_stride,
                     const void* residual, int64_t res_row_stride, const void* weight,
                     const void* bias, void* y, void* h, float* mean, float* rstd, int64_t M,
                     int64_t N, float eps, cudaStream_t stream) {
  if (M < 0 || N < 1 || N > kNormMaxHidden || x == nullptr || y == nullptr ||
      (residual != nullptr && h == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) return cudaSuccess;
  const bool res = residual != nullptr;
  const FwdArgs a{x, residual, weight, rms ? nullptr : bias,
                  y, res ? h : nullptr,
                  rms ? nullptr : mean, rstd,
                  x_row_stride, res ? res_row_stride : 0, M, static_cast<int>(N), eps};
  return with_types(dtype, param_dtype, [&](auto t, auto p) {
    return norm_fwd_typed<typename decltype(t)::type, typename decltype(p)::type>(rms, a, stream);
  });
}

size_t norm_bwd_workspace_bytes(int64_t M, int64_t N, bool need_dweight, bool need_dbias,
                                int device) {
  const int accumulators = int(need_dweight) + int(need_dbias);
  if (accumulators == 0 || M <= 0 || N <= 0) return 0;
  int sms = 0;
  // On failure norm_bwd fails the same query and launches nothing, so 0 is safe.
  if (multiprocessor_count(device, &sms) != cudaSuccess) return 0;
  return static_cast<size_t>(num_partial_rows(M, sms)) * static_cast<size_t>(N) *
         sizeof(float) * accumulators;
}

cudaError_t norm_bwd(DType dtype, DType param_dtype, bool rms, const void* dy, const void* dh,
                     const void* src, int64_t src_row_stride, const void* weight,
                     const float* mean, const float* rstd, void* dx, float* dweight,
                     float* dbias, void* workspace, int64_t M, int64_t N,
                     cudaStream_t stream) {
  const bool partials = dweight != nullptr || dbias != nullptr;
  if (M < 0 || N < 1 || N > kNormMaxHidden || dy == nullptr || src == nullptr ||
      dx == nullptr || rstd == nullptr || (!rms && mean == nullptr) ||
      (partials && M > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (M == 0) {
    // Sums over no rows are zero; there is nothing else to compute.
    const size_t bytes = static_cast<size_t>(N) * sizeof(float);
    if (dweight != nullptr) {
      if (const cudaError_t err = cudaMemsetAsync(dweight, 0, bytes, stream)) return err;
    }
    return dbias != nullptr ? cudaMemsetAsync(dbias, 0, bytes, stream) : cudaSuccess;
  }
  int64_t partial_rows = 0;
  if (partials) {
    // The count norm_bwd_workspace_bytes used, on the device the caller made current.
    int device = 0, sms = 0;
    if (const cudaError_t err = cudaGetDevice(&device)) return err;
    if (const cudaError_t err = multiprocessor_count(device, &sms)) return err;
    partial_rows = num_partial_rows(M, sms);
  }
  // Workspace layout: [partial_rows, N] floats for dweight, then the same for dbias.
  float* const ws = static_cast<float*>(workspace);
  float* const part_dw = dweight != nullptr ? ws : nullptr;
  float* const part_db =
      dbias != nullptr ? ws + (dweight != nullptr ? partial_rows * N : 0) : nullptr;
  const BwdArgs a{dy, dh, src, weight,
                  rms ? nullptr : mean, rstd,
                  dx,
                  part_dw, part_db,
                  src_row_stride, M, static_cast<int>(N)};
  const cudaError_t err = with_types(dtype, param_dtype, [&](auto t, auto p) {
    return norm_bwd_typed<typename decltype(t)::type, typename decltype(p)::type>(
        rms, a, partial_rows, stream);
  });
  if (err != cudaSuccess || !partials) return err;
  // Partial rows -> dweight (slab 0 when requested) and dbias.
  return sum_partial_rows(ws, static_cast<int>(partial_rows), N,
                          int(dweight != nullptr) + int(dbias != nullptr),
                          dweight != nullptr ? dweight : dbias, dbias, stream);
}

}  // namespace cuda
}  // namespace fastgpt
