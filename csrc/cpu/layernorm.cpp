// CPU LayerNorm / RMSNorm, forward and backward (see layernorm.h for the contract).
//
// Shape of the work: rows are independent, so they are split across threads with
// at::parallel_for. A row is read from memory once; its remaining passes run while it is
// still in L1/L2 (a 64K-element fp32 row is 256 KiB) and prefetch the next row meanwhile
// (see Ahead). DRAM traffic is thus the minimum: forward reads x (+ residual) and writes
// y (+ h); backward reads src and dy (+ dh) and writes dx; large outputs are written with
// streaming stores, which spare the read that a plain store to an uncached line costs (see
// "Output stores").
//
// SIMD without -march=native: the hot row loops are plain C++ loops under `#pragma omp simd`
// (-fopenmp-simd, implied by -fopenmp, lets the compiler vectorise the reductions without
// -ffast-math), compiled three times by GCC/Clang function multiversioning (`target_clones`):
// x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2 + FMA) and the baseline. The loader's
// ifunc resolver picks a clone once per process from CPUID, so one binary runs on any x86-64
// machine at the best width it has. We chose this over ATen's at::vec + DispatchStub because
// at::vec's per-ISA code is only compiled inside torch's own build (an extension would have
// to replicate its CPU_CAPABILITY machinery), whereas the compiler vectorises these loops
// well, bf16 conversion included, once allowed to. Elsewhere (other architectures, no
// ifunc) the attribute is dropped and the same loops are built for the baseline ISA.
//
// Numerics: statistics are in the stats type S (float for fp32/bf16, double for fp64).
// LayerNorm's variance is the corrected two-pass one over the cache-hot row (see fwd_rows),
// not E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. Row sums are
// blocked (see row_sums) so float rounding error does not grow with N.
#include "cpu/layernorm.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

// ATen's parallel_for is a header template that only runs in parallel when this translation
// unit itself is compiled with the backend's flags (-fopenmp for torch's OpenMP build);
// without them it silently runs every row on one thread.
#if !defined(INTRA_OP_PARALLEL)
#error "layernorm.cpp must be compiled with -fopenmp (ATen/Parallel.h would run serially)"
#endif

namespace fastgpt {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Element types. bf16 is carried as its raw 16 bits (uint16_t) so that conversions are
// integer shifts/adds the vectoriser understands; fp32/fp64 load and store unchanged.
using bf16_bits = uint16_t;

template <class T>
struct Elem {
  using S = T;
  static FASTGPT_INLINE S load(T v) { return v; }
  static FASTGPT_INLINE T store(S v) { return v; }
};

template <>
struct Elem<bf16_bits> {
  using S = float;
  static FASTGPT_INLINE float load(bf16_bits v) {
    const uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // Round to nearest even. A NaN keeps its sign and top payload bits and gets the quiet bit
  // forced on: rounding its low bits up could otherwise carry it into an Inf.
  static FASTGPT_INLINE bf16_bits store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    return bf16_bits((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
};

// ---------------------------------------------------------------------------------------
// Software prefetch of the next row. A row's passes take turns on the memory system: pass 1
// streams the row in from DRAM, then the output pass computes from cache and only writes,
// and the hardware prefetcher runs ahead of demand misses only, so on its own the read side
// of DRAM would idle while a row's output is computed. The output pass therefore touches the
// next row's input lines as it goes (measured here: about 10% faster forward and backward
// at 4096 columns; also touching the output's lines during pass 1, or prefetching groups of
// rows tile by tile, measured slower).
template <class T>
struct Ahead {
  const T* row0 = nullptr;  // rows to prefetch, indexed like the row being processed;
  const T* row1 = nullptr;  // null for none
  // Touches the lines holding elements [begin, end) of each row.
  FASTGPT_INLINE void operator()(int64_t begin, int64_t end) const {
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t j = begin; j < end; j += kLine) {
      if (row0) __builtin_prefetch(row0 + j);
      if (row1) __builtin_prefetch(row1 + j);
    }
  }
};

// Output stores. A plain store to a line that is not in cache first reads the line from DRAM
// (read-for-ownership), so writing y costs a read and a write: an x -> y pass moves three
// bytes per byte written, against two for the copy that sets the bandwidth ceiling.
// Non-temporal (streaming) stores skip that read and go straight to memory through the
// write-combining buffers. They pay off only for outputs too large to be read back from cache
// by whatever runs next, and only on pages already in use (see stream_output).
// SSE2's 16-byte streaming store is in every x86-64 ISA level, so every clone can use it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTGPT_STREAM_STORES 1
#endif

// Writes len elements from buf (64-byte aligned) to dst, streaming when dst is 16-byte
// aligned (a row start whose offset is not a multiple of 16 bytes falls back to plain stores).
template <class T>
FASTGPT_INLINE void stream_out(T* dst, const T* buf, int64_t len) {
  const size_t bytes = size_t(len) * sizeof(T);
  size_t done = 0;
#if FASTGPT_STREAM_STORES
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    char* d = reinterpret_cast<char*>(dst);
    const char* b = reinterpret_cast<const char*>(buf);
    for (; done + 16 <= bytes; done += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + done),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(b + done)));
    }
  }
#endif
  std::memcpy(reinterpret_cast<char*>(dst) + done, reinterpret_cast<const char*>(buf) + done,
              bytes - done);
}

// Orders this thread's streaming stores before whatever it does next (they are weakly
// ordered); called once per task, before the task returns to the thread pool.
FASTGPT_INLINE void stream_fence() {
#if FASTGPT_STREAM_STORES
  _mm_sfence();
#endif
}

#if FASTGPT_STREAM_STORES
// Whether the pages under [p, p + bytes) are already backed by memory, judged from the first,
// middle and last page (an output comes either from a fresh mapping, nothing resident, or
// from reused heap, all resident).
bool resident(const void* p, int64_t bytes) {
#if defined(__linux__)
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  for (const int64_t offset : {int64_t(0), bytes / 2, bytes - 1}) {
    const uintptr_t addr = (reinterpret_cast<uintptr_t>(p) + uintptr_t(offset)) & ~(page - 1);
    unsigned char in_core = 0;
    if (mincore(reinterpret_cast<void*>(addr), page, &in_core) != 0 || !(in_core & 1)) {
      return false;
    }
  }
#else
  (void)p;
  (void)bytes;
#endif
  return true;
}
#endif

// Whether an output of `bytes` at `out` is written with streaming stores.
//  * Size: from 16 MiB, beyond the per-core share of last-level cache on current server parts,
//    so the next op would not find the output in cache anyway. (sysconf's cache sizes are not
//    used: inside VMs they are often wrong, e.g. 320 MiB of L3 reported on a part with 32.)
//  * Residency: an output on fresh pages (glibc mmaps every block over 32 MB) is zero-filled
//    by the OS at first touch, which brings its lines into cache: plain stores then find
//    them there, and streaming stores were measured 2-7% slower. Streaming pays where the pages
//    are reused (a warm heap, jemalloc, tcmalloc): measured 1.2-1.4x there.
bool stream_output(const void* out, int64_t bytes) {
#if FASTGPT_STREAM_STORES
  constexpr int64_t kStreamMinBytes = int64_t(16) << 20;
  return out != nullptr && bytes >= kStreamMinBytes && resident(out, bytes);
#else
  (void)out;
  (void)bytes;
  return false;  // no streaming stores here: the buffered path would only add a copy
#endif
}

// Elementwise row loop: out[j] = body(j) for j < n, vectorised in chunks of 256 bytes of T,
// touching `ahead` for each chunk. When `stream`, a chunk's values go to a buffer in L1 and
// from there out with streaming stores.
template <class T, class Body>
FASTGPT_INLINE void row_for(int64_t n, const Ahead<T>& ahead, T* out, bool stream,
                            const Body& body) {
  constexpr int64_t kChunk = 256 / sizeof(T);
  alignas(64) T buf[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t c_end = std::min(n, c + kChunk);
    ahead(c, c_end);
    if (stream) {
#pragma omp simd
      for (int64_t j = c; j < c_end; ++j) buf[j - c] = body(j);
      stream_out(out + c, buf, c_end - c);
    } else {
      T* __restrict o = out;
#pragma omp simd
      for (int64_t j = c; j < c_end; ++j) o[j] = body(j);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Row reductions.
//  * Speed: a single `omp simd reduction` accumulator is one vector register, so the loop runs
//    at one add per FP-add latency. Instead each sum gets kLanes independent accumulators
//    (256 bytes: 4 AVX-512 / 8 AVX2 registers) that the compiler keeps in registers, enough
//    chains to keep the adders busy while the row is read from cache.
//  * Accuracy: rows are reduced in blocks of at most kSumBlock elements whose results are
//    combined in double, so a float lane partial adds at most kSumBlock / kLanes terms and
//    the error does not grow with N (plain float lane sums over a 64K row would lose about
//    three more digits).
constexpr int64_t kSumBlock = 1024;

// K sums over j in [begin, end) (at most kSumBlock elements) of term(j), a std::array<S, K>.
template <int K, class S, class Term>
FASTGPT_INLINE std::array<S, K> block_sums(int64_t begin, int64_t end, const Term& term) {
  constexpr int64_t kLanes = 256 / sizeof(S);
  static_assert(kSumBlock % kLanes == 0, "blocks hold whole lane groups");
  S acc[K][kLanes] = {};
  const auto add = [&](int64_t j, int64_t lane) {
    const std::array<S, K> t = term(j);
    for (int k = 0; k < K; ++k) acc[k][lane] += t[k];
  };
  int64_t j0 = begin;
  for (; j0 + kLanes <= end; j0 += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) add(j0 + l, l);
  }
#pragma omp simd
  for (int64_t l = 0; l < end - j0; ++l) add(j0 + l, l);
  std::array<S, K> out;
  for (int k = 0; k < K; ++k) {
    S s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t l = 0; l < kLanes; ++l) s += acc[k][l];
    out[k] = s;
  }
  return out;
}

// K sums over the row j < n of term(j), in S.
template <int K, class S, class Term>
FASTGPT_INLINE std::array<S, K> row_sums(int64_t n, const Term& term) {
  std::array<double, K> total{};
  for (int64_t blk = 0; blk < n; blk += kSumBlock) {
    const std::array<S, K> part = block_sums<K, S>(blk, std::min(n, blk + kSumBlock), term);
    for (int k = 0; k < K; ++k) total[k] += part[k];
  }
  std::array<S, K> out;
  for (int k = 0; k < K; ++k) out[k] = S(total[k]);
  return out;
}

// Mean and variance of a row from one read of it: first(j) yields element j (computing and
// storing it if need be), again(j) reads it back. Each block is reduced two-pass while it
// sits in L1: its sum, then the sums of d and d^2 with d = v - block mean, which give the
// block's M2 = sum((v - mean)^2) without cancellation (the sum of d corrects the block mean's
// rounding). Blocks are merged in double with Chan, Golub & LeVeque's pairwise update.
// Naive E[v^2] - E[v]^2 would cancel catastrophically when |mean| >> std.
template <class S, class First, class Again>
FASTGPT_INLINE std::array<S, 2> row_mean_var(int64_t n, const First& first, const Again& again) {
  double mean = 0, m2 = 0;
  for (int64_t blk = 0; blk < n; blk += kSumBlock) {
    const int64_t blk_end = std::min(n, blk + kSumBlock);
    const double nb = double(blk_end - blk);
    const S mean0 = block_sums<1, S>(blk, blk_end, [&](int64_t j) {
      return std::array<S, 1>{first(j)};
    })[0] / S(nb);
    const std::array<S, 2> dev = block_sums<2, S>(blk, blk_end, [&](int64_t j) {
      const S d = again(j) - mean0;
      return std::array<S, 2>{d, d * d};
    });
    const double blk_mean = double(mean0) + double(dev[0]) / nb;
    const double blk_m2 = std::max(double(dev[1]) - double(dev[0]) * dev[0] / nb, 0.0);
    const double seen = double(blk), total = seen + nb;
    const double delta = blk_mean - mean;
    mean += delta * (nb / total);
    m2 += blk_m2 + delta * delta * (seen * nb / total);
  }
  return {S(mean), S(m2 / double(n))};
}

// Calls f(std::true_type) or f(std::false_type): turns a runtime flag (null pointer or not,
// LN or RMS) into a compile-time one, so the row loops carry no per-element branches.
template <class F>
inline void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The glue only passes the types in kNormDTypes.
template <class F>
inline void with_elem_type(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(bf16_bits{});
    case DType::kFloat16: break;
  }
}

// Heap buffers aligned to a cache line, uninitialised.
constexpr size_t kLineBytes = 64;
struct AlignedFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(kLineBytes)); }
};
template <class T>
using AlignedBuffer = std::unique_ptr<T[], AlignedFree>;
template <class T>
AlignedBuffer<T> aligned_buffer(int64_t count) {
  return AlignedBuffer<T>(
      static_cast<T*>(::operator new[](size_t(count) * sizeof(T), std::align_val_t(kLineBytes))));
}

// Rows per parallel task: at least ~32K elements, so a task's work (tens of microseconds)
// dwarfs the cost of waking a thread and small inputs stay on the calling thread.
int64_t row_grain(int64_t N) {
  constexpr int64_t kMinElemsPerTask = int64_t(1) << 15;
  return std::max<int64_t>(1, kMinElemsPerTask / N);
}

// ---------------------------------------------------------------------------------------
// Forward.
template <class T>
struct FwdArgs {
  using S = typename Elem<T>::S;
  const T* x;
  int64_t x_stride;
  const T* res;
  int64_t res_stride;
  const S* w;  // parameters in the stats type (fp32 master weights read as they are)
  const S* b;
  T* y;
  T* h;
  S* mean;
  S* rstd;
  int64_t N;
  S eps;
  bool stream;  // write y and h with streaming stores
};

template <class T, bool kRms, bool kRes, bool kW, bool kB>
FASTGPT_SIMD_CLONES void fwd_rows(const FwdArgs<T>& a, int64_t row_begin, int64_t row_end) {
  using E = Elem<T>;
  using S = typename E::S;
  const int64_t N = a.N;
  const S* __restrict w = a.w;
  const S* __restrict b = a.b;
  // With a residual and streaming stores, h is formed in a row of scratch that stays in
  // cache and is streamed out after pass 2: h itself cannot be read back once streamed.
  AlignedBuffer<T> scratch = kRes && a.stream ? aligned_buffer<T>(N) : nullptr;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* __restrict x = a.x + i * a.x_stride;
    const T* __restrict r = kRes ? a.res + i * a.res_stride : nullptr;
    T* const h_out = kRes ? a.h + i * N : nullptr;
    T* __restrict h = kRes && a.stream ? scratch.get() : h_out;
    T* const y = a.y + i * N;
    const bool more = i + 1 < row_end;
    // Pass 1 (reads DRAM): form the row to normalise and reduce it to its statistics. With a
    // residual, h is rounded to T before it is reduced, so the statistics and y describe
    // exactly the h we return.
    const auto first = [&](int64_t j) {
      if constexpr (kRes) {
        const T hj = E::store(E::load(x[j]) + E::load(r[j]));
        h[j] = hj;
        return E::load(hj);
      } else {
        return E::load(x[j]);
      }
    };
    const T* __restrict src = kRes ? h : x;
    S mean = 0, var;
    if constexpr (kRms) {
      var = row_sums<1, S>(N, [&](int64_t j) {
              const S v = first(j);
              return std::array<S, 1>{v * v};
            })[0] / S(N);
    } else {
      const std::array<S, 2> mv =
          row_mean_var<S>(N, first, [&](int64_t j) { return E::load(src[j]); });
      mean = mv[0];
      var = mv[1];
      a.mean[i] = mean;
    }
    const S rstd = S(1) / std::sqrt(var + a.eps);
    a.rstd[i] = rstd;
    // Pass 2, from cache while the next row is fetched: y = xhat * w + b; then h's streaming.
    const Ahead<T> next_row{more ? x + a.x_stride : nullptr,
                            kRes && more ? r + a.res_stride : nullptr};
    row_for<T>(N, next_row, y, a.stream, [&](int64_t j) {
      S v = E::load(src[j]);
      if constexpr (!kRms) v -= mean;
      v *= rstd;
      if constexpr (kW) v *= w[j];
      if constexpr (kB) v += b[j];
      return E::store(v);
    });
    if (kRes && a.stream) stream_out(h_out, h, N);
  }
  if (a.stream) stream_fence();
}

// ---------------------------------------------------------------------------------------
// Backward.
template <class T>
struct BwdArgs {
  using S = typename Elem<T>::S;
  const T* dy;
  const T* dh;
  const T* src;
  int64_t src_stride;
  const S* w;
  const S* mean;
  const S* rstd;
  T* dx;
  int64_t N;
  bool stream;  // write dx with streaming stores
};

// Rows [row_begin, row_end); when kAcc, adds this range's dweight/dbias contributions into
// acc_w/acc_b (N stats values each, private to the calling task).
template <class T, bool kRms, bool kW, bool kDh, bool kAcc>
FASTGPT_SIMD_CLONES void bwd_rows(const BwdArgs<T>& a, int64_t row_begin, int64_t row_end,
                                  typename Elem<T>::S* __restrict acc_w,
                                  typename Elem<T>::S* __restrict acc_b) {
  using E = Elem<T>;
  using S = typename E::S;
  const int64_t N = a.N;
  const S inv_n = S(1) / S(N);
  const S* __restrict w = a.w;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* __restrict src = a.src + i * a.src_stride;
    const T* __restrict dy = a.dy + i * N;
    T* __restrict dx = a.dx + i * N;
    const S mean = kRms ? S(0) : a.mean[i];
    const S rstd = a.rstd[i];
    const auto xhat = [&](int64_t j) {
      S v = E::load(src[j]);
      if constexpr (!kRms) v -= mean;
      return v * rstd;
    };
    const auto g = [&](int64_t j) {
      const S d = E::load(dy[j]);
      return kW ? d * w[j] : d;
    };
    // Pass 1 (reads src and dy from DRAM): mean(g * xhat), and mean(g) for LN.
    constexpr int kSums = kRms ? 1 : 2;
    const std::array<S, kSums> sums = row_sums<kSums, S>(N, [&](int64_t j) {
      const S gj = g(j);
      if constexpr (kRms) {
        return std::array<S, 1>{gj * xhat(j)};
      } else {
        return std::array<S, 2>{gj * xhat(j), gj};
      }
    });
    const S mean_gx = sums[0] * inv_n;
    const S mean_g = kRms ? S(0) : sums[kSums - 1] * inv_n;
    // Pass 2, from cache while the next row is fetched: dx, and the row's dweight/dbias
    // contributions.
    const T* __restrict dh = kDh ? a.dh + i * N : nullptr;
    const bool more = i + 1 < row_end;
    const Ahead<T> next_row{more ? src + a.src_stride : nullptr, more ? dy + N : nullptr};
    row_for<T>(N, next_row, dx, a.stream, [&](int64_t j) {
      const S xh = xhat(j);
      S v = g(j) - xh * mean_gx;
      if constexpr (!kRms) v -= mean_g;
      v *= rstd;
      if constexpr (kDh) v += E::load(dh[j]);
      if constexpr (kAcc) {
        const S d = E::load(dy[j]);
        acc_w[j] += d * xh;
        if constexpr (!kRms) acc_b[j] += d;
      }
      return E::store(v);
    });
  }
  if (a.stream) stream_fence();
}

// Thread-private dweight/dbias partial sums: one 64-byte-aligned slab per task, each slab a
// whole number of cache lines, so tasks never write to a shared line.
template <class S>
struct AccSlabs {
  int64_t stride;  // elements between slabs
  AlignedBuffer<S> data;

  AccSlabs(int64_t n_slabs, int64_t per_slab) {
    const int64_t per_line = int64_t(kLineBytes / sizeof(S));
    stride = (per_slab + per_line - 1) / per_line * per_line;
    data = aligned_buffer<S>(n_slabs * stride);
    std::fill_n(data.get(), n_slabs * stride, S(0));
  }
  S* slab(int64_t k) { return data.get() + k * stride; }
};

template <class T>
void bwd_typed(bool rms, const BwdArgs<T>& a, typename Elem<T>::S* dweight,
               typename Elem<T>::S* dbias, int64_t M) {
  using S = typename Elem<T>::S;
  const int64_t N = a.N;
  const bool acc = dweight != nullptr || (dbias != nullptr && !rms);
  // Fixed partition: task k always owns rows [k * rows_per_task, ...) and slab k, and the
  // slabs are summed in order, so dweight/dbias are bitwise reproducible for a given
  // thread count whatever the scheduler does.
  const int64_t n_tasks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (M + row_grain(N) - 1) / row_grain(N)));
  const int64_t rows_per_task = (M + n_tasks - 1) / n_tasks;
  // Slab layout per task: [acc_w (N) | acc_b (N)], acc_b only for LN.
  const int64_t per_slab = acc ? (rms ? N : 2 * N) : 0;
  AccSlabs<S> slabs(acc ? n_tasks : 0, per_slab);

  with_flag(rms, [&](auto kRms) {
    with_flag(a.w != nullptr, [&](auto kW) {
      with_flag(a.dh != nullptr, [&](auto kDh) {
        with_flag(acc, [&](auto kAcc) {
          at::parallel_for(0, n_tasks, 1, [&](int64_t k_begin, int64_t k_end) {
            for (int64_t k = k_begin; k < k_end; ++k) {
              S* acc_w = kAcc ? slabs.slab(k) : nullptr;
              S* acc_b = kAcc && !kRms ? acc_w + N : nullptr;
              bwd_rows<T, kRms, kW, kDh, kAcc>(a, k * rows_per_task,
                                               std::min(M, (k + 1) * rows_per_task), acc_w,
                                               acc_b);
            }
          });
        });
      });
    });
  });

  if (!acc) return;
  const auto reduce = [&](S* out, int64_t offset) {
    if (out == nullptr) return;
    std::fill_n(out, N, S(0));
    for (int64_t k = 0; k < n_tasks; ++k) {
      const S* part = slabs.slab(k) + offset;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) out[j] += part[j];
    }
  };
  reduce(dweight, 0);
  if (!rms) reduce(dbias, N);
}

}  // namespace

void norm_fwd(DType dtype, bool rms, const void* x, int64_t x_row_stride,
              const void* residual, int64_t res_row_stride, const void* weight,
              const void* bias, void* y, void* h, void* mean, void* rstd, int64_t M, int64_t N,
              double eps) {
  if (M <= 0 || N <= 0) return;
  with_elem_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Elem<T>::S;
    const FwdArgs<T> a{static_cast<const T*>(x), x_row_stride,
                       static_cast<const T*>(residual), res_row_stride,
                       static_cast<const S*>(weight), static_cast<const S*>(bias),
                       static_cast<T*>(y), static_cast<T*>(h),
                       static_cast<S*>(mean), static_cast<S*>(rstd),
                       N, S(eps),
                       stream_output(y, M * N * int64_t(sizeof(T))) &&
                           (residual == nullptr || stream_output(h, M * N * int64_t(sizeof(T))))};
    with_flag(rms, [&](auto kRms) {
      with_flag(residual != nullptr, [&](auto kRes) {
        with_flag(weight != nullptr, [&](auto kW) {
          with_flag(bias != nullptr && !rms, [&](auto kB) {
            // RMSNorm has no bias: never instantiate that combination.
            if constexpr (!(kRms && kB)) {
              at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
                fwd_rows<T, kRms, kRes, kW, kB>(a, begin, end);
              });
            }
          });
        });
      });
    });
  });
}

void norm_bwd(DType dtype, bool rms, const void* dy, const void* dh, const void* src,
              int64_t src_row_stride, const void* weight, const void* mean, const void* rstd,
              void* dx, void* dweight, void* dbias, int64_t M, int64_t N) {
  if (N <= 0) return;
  with_elem_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Elem<T>::S;
    if (M <= 0) {
      // No rows: the weight/bias gradients are sums over nothing.
      if (dweight) std::fill_n(static_cast<S*>(dweight), N, S(0));
      if (dbias && !rms) std::fill_n(static_cast<S*>(dbias), N, S(0));
      return;
    }
    const BwdArgs<T> a{static_cast<const T*>(dy), static_cast<const T*>(dh),
                       static_cast<const T*>(src), src_row_stride,
                       static_cast<const S*>(weight), static_cast<const S*>(mean),
                       static_cast<const S*>(rstd), static_cast<T*>(dx), N,
                       stream_output(dx, M * N * int64_t(sizeof(T)))};
    bwd_typed<T>(rms, a, static_cast<S*>(dweight), static_cast<S*>(dbias), M);
  });
}

}  // namespace cpu
}  // namespace fastgpt
