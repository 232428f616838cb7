// CPU LayerNorm / RMSNorm, forward and backward (see layernorm.h for the contract).
//
// Shape of the work: every row is independent, so rows are split across threads with
// at::parallel_for. Within a row the kernel streams the row from memory once and then makes
// its remaining passes while the row is still in L1/L2 (a 64K-element fp32 row is 256 KiB),
// so DRAM traffic is the minimum: forward reads x (+ residual) and writes y (+ h); backward
// reads src, dy (+ dh) and writes dx.
//
// SIMD without -march=native: the hot row loops are plain C++ loops under `#pragma omp simd`
// (the build passes -fopenmp-simd, which makes the pragma legal to vectorise reductions
// without -ffast-math), compiled three times by GCC/Clang function multiversioning
// (`target_clones`): x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2 + FMA) and the baseline.
// The loader's ifunc resolver picks the clone once per process from CPUID, so one binary runs
// on any x86-64 machine at the best width it has. We chose this over ATen's at::vec +
// DispatchStub because at::vec's per-ISA code is only compiled inside torch's own build
// (an extension would have to replicate its CPU_CAPABILITY machinery to get it), whereas the
// compiler already vectorises these loops well, bf16 conversion included, once it may.
// On other architectures (or compilers without ifunc support) the attribute is dropped and
// the same loops are compiled for the baseline ISA.
//
// Numerics: statistics are in the stats type S (float for fp32/bf16, double for fp64).
// LayerNorm uses the two-pass variance, sum((x - mean)^2) / N, over the cache-hot row rather
// than E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. Row sums are
// blocked (see row_sums) so float rounding error does not grow with N.
#include "layernorm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

// ATen's parallel_for is a header template that only runs in parallel when this translation
// unit itself is compiled with the backend's flags (-fopenmp for torch's OpenMP build);
// without them it silently runs every row on one thread.
#if !defined(INTRA_OP_PARALLEL)
#error "layernorm.cpp must be compiled with -fopenmp (ATen/Parallel.h would run serially)"
#endif

// Helpers called from the multiversioned row functions must be inlined into them: an
// out-of-line helper is compiled once, for the baseline ISA, whichever clone calls it.
#define FASTGPT_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define FASTGPT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTGPT_SIMD_CLONES
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
// Row groups and tiles. Rows are processed in groups of up to kMaxGroup rows (about
// kGroupBytes of input per group, so a group stays in L2 between its passes):
//  * the statistics passes run row by row;
//  * the output pass runs tile by tile, a tile being kTileBytes of one row: for each column
//    range, every row of the group in turn. The weight (and bias, and dweight/dbias partial
//    sums) of that column range is then reused from L1 by all rows of the group, instead of
//    being streamed through L1 once per row next to the row itself;
//  * each tile of the output pass also prefetches the same tile of the next group's input
//    rows. A row's passes otherwise take turns on the memory system (reading, then
//    computing from cache, then writing), and the hardware prefetcher only runs ahead of
//    demand misses, which the in-cache passes make none of; this way the next group's reads
//    overlap this group's compute and writes, and its statistics passes find it in cache.
constexpr int64_t kGroupBytes = int64_t(64) << 10;
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kTileBytes = 1024;

template <class T>
int64_t group_rows(int64_t N) {
  return std::clamp<int64_t>(kGroupBytes / (N * int64_t(sizeof(T))), 1, kMaxGroup);
}

// Touches the cache lines holding elements [begin, end) of each non-null row.
template <class T, size_t K>
FASTGPT_INLINE void prefetch_rows(const std::array<const T*, K>& rows, int64_t begin,
                                  int64_t end) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (const T* row : rows) {
    if (row == nullptr) continue;
    for (int64_t j = begin; j < end; j += kLine) __builtin_prefetch(row + j);
  }
}

// Output pass over a group, tile by tile (see above): for rows r < rows, row_op(r) returns
// the elementwise operation of row r, run on columns j < n by a vectorised loop. next(r)
// gives row r's inputs in the next group (nulls where there is no such row), prefetched
// tile by tile.
template <class T, class Next, class RowOp>
FASTGPT_INLINE void group_tiles(int64_t rows, int64_t n, const Next& next, const RowOp& row_op) {
  constexpr int64_t kTile = kTileBytes / sizeof(T);
  for (int64_t c = 0; c < n; c += kTile) {
    const int64_t c_end = std::min(n, c + kTile);
    for (int64_t r = 0; r < rows; ++r) {
      prefetch_rows(next(r), c, c_end);
      const auto op = row_op(r);
#pragma omp simd
      for (int64_t j = c; j < c_end; ++j) op(j);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Row reduction: K sums over j < n of term(j) (a std::array<S, K>), in S.
//  * Speed: a single `omp simd reduction` accumulator is one vector register, so the loop runs
//    at one add per FP-add latency. Instead each sum gets kLanes independent accumulators
//    (256 bytes: 4 AVX-512 / 8 AVX2 registers) that the compiler keeps in registers, enough
//    chains to keep the adders busy while the row is read from cache.
//  * Accuracy: the lane partials are folded into a double every kSumBlock elements, so each
//    float partial adds at most kSumBlock / kLanes terms and the error does not grow with N
//    (a plain float lane sum over a 64K row would lose about three more digits).
constexpr int64_t kSumBlock = 1024;

template <int K, class S, class Term>
FASTGPT_INLINE std::array<S, K> row_sums(int64_t n, const Term& term) {
  constexpr int64_t kLanes = 256 / sizeof(S);
  static_assert(kSumBlock % kLanes == 0, "blocks hold whole lane groups");
  std::array<double, K> total{};
  for (int64_t blk = 0; blk < n; blk += kSumBlock) {
    const int64_t blk_end = std::min(n, blk + kSumBlock);
    S acc[K][kLanes] = {};
    const auto add = [&](int64_t j, int64_t lane) {
      const std::array<S, K> t = term(j);
      for (int k = 0; k < K; ++k) acc[k][lane] += t[k];
    };
    int64_t j0 = blk;
    for (; j0 + kLanes <= blk_end; j0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) add(j0 + l, l);
    }
#pragma omp simd
    for (int64_t l = 0; l < blk_end - j0; ++l) add(j0 + l, l);
    for (int k = 0; k < K; ++k) {
      S s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t l = 0; l < kLanes; ++l) s += acc[k][l];
      total[k] += s;
    }
  }
  std::array<S, K> out;
  for (int k = 0; k < K; ++k) out[k] = S(total[k]);
  return out;
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

template <class F>
inline void with_elem_type(NormDType dtype, const F& f) {
  switch (dtype) {
    case NormDType::kFloat32: return f(float{});
    case NormDType::kFloat64: return f(double{});
    case NormDType::kBFloat16: return f(bf16_bits{});
  }
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
  const T* w;
  const T* b;
  T* y;
  T* h;
  S* mean;
  S* rstd;
  int64_t N;
  S eps;
};

template <class T, bool kRms, bool kRes, bool kW, bool kB>
FASTGPT_SIMD_CLONES void fwd_rows(const FwdArgs<T>& a, int64_t row_begin, int64_t row_end) {
  using E = Elem<T>;
  using S = typename E::S;
  const int64_t N = a.N;
  const int64_t group = group_rows<T>(N);
  const T* __restrict w = a.w;
  const T* __restrict b = a.b;
  for (int64_t g0 = row_begin; g0 < row_end; g0 += group) {
    const int64_t rows = std::min(group, row_end - g0);
    S mean[kMaxGroup], rstd[kMaxGroup];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = g0 + r;
      const T* __restrict x = a.x + i * a.x_stride;
      // Pass 1: form the row to normalise and sum it (LN) or its squares (RMS). With a
      // residual, h is rounded to T before it is summed, so the statistics and y describe
      // exactly the h we return.
      const T* __restrict src = x;
      S sum;
      if constexpr (kRes) {
        const T* __restrict res = a.res + i * a.res_stride;
        T* __restrict h = a.h + i * N;
        sum = row_sums<1, S>(N, [&](int64_t j) {
          const T hj = E::store(E::load(x[j]) + E::load(res[j]));
          h[j] = hj;
          const S v = E::load(hj);
          return std::array<S, 1>{kRms ? v * v : v};
        })[0];
        src = h;
      } else {
        sum = row_sums<1, S>(N, [&](int64_t j) {
          const S v = E::load(x[j]);
          return std::array<S, 1>{kRms ? v * v : v};
        })[0];
      }
      // Pass 2 (LN only): corrected two-pass variance. With d = v - mean, var = mean(d^2) -
      // mean(d)^2, and mean + mean(d) is the mean with pass 1's rounding error removed
      // (mean(d) is tiny, so neither step cancels). std::max keeps a NaN variance NaN.
      S var;
      if constexpr (kRms) {
        mean[r] = 0;
        var = sum / S(N);
      } else {
        const S mean0 = sum / S(N);
        const std::array<S, 2> dev = row_sums<2, S>(N, [&](int64_t j) {
          const S d = E::load(src[j]) - mean0;
          return std::array<S, 2>{d, d * d};
        });
        const S shift = dev[0] / S(N);
        mean[r] = mean0 + shift;
        var = std::max(dev[1] / S(N) - shift * shift, S(0));
        a.mean[i] = mean[r];
      }
      rstd[r] = S(1) / std::sqrt(var + a.eps);
      a.rstd[i] = rstd[r];
    }
    // Pass 3: y = xhat * w + b, reading the group's rows back from cache (h when a residual
    // was given, else x).
    const auto next = [&](int64_t r) {
      const int64_t i = g0 + group + r;
      const bool more = i < row_end;
      return std::array<const T*, 2>{more ? a.x + i * a.x_stride : nullptr,
                                     kRes && more ? a.res + i * a.res_stride : nullptr};
    };
    group_tiles<T>(rows, N, next, [&](int64_t r) {
      const int64_t i = g0 + r;
      const T* src = kRes ? a.h + i * N : a.x + i * a.x_stride;
      T* y = a.y + i * N;
      return [=](int64_t j) {
        S v = E::load(src[j]);
        if constexpr (!kRms) v -= mean[r];
        v *= rstd[r];
        if constexpr (kW) v *= E::load(w[j]);
        if constexpr (kB) v += E::load(b[j]);
        y[j] = E::store(v);
      };
    });
  }
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
  const T* w;
  const S* mean;
  const S* rstd;
  T* dx;
  int64_t N;
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
  const int64_t group = group_rows<T>(N);
  const S inv_n = S(1) / S(N);
  const T* __restrict w = a.w;
  // Row i's operands, and its xhat and g = dy * w at column j.
  struct Row {
    const T* src;
    const T* dy;
    S mean, rstd;
  };
  const auto row = [&](int64_t i) {
    return Row{a.src + i * a.src_stride, a.dy + i * N, kRms ? S(0) : a.mean[i], a.rstd[i]};
  };
  const auto xhat = [](const Row& row, int64_t j) {
    S v = E::load(row.src[j]);
    if constexpr (!kRms) v -= row.mean;
    return v * row.rstd;
  };
  const auto g = [w](const Row& row, int64_t j) {
    const S d = E::load(row.dy[j]);
    return kW ? d * E::load(w[j]) : d;
  };
  for (int64_t g0 = row_begin; g0 < row_end; g0 += group) {
    const int64_t rows = std::min(group, row_end - g0);
    // Pass 1: mean(g * xhat), and mean(g) for LN, per row.
    S mean_gx[kMaxGroup], mean_g[kMaxGroup];
    for (int64_t r = 0; r < rows; ++r) {
      const Row ri = row(g0 + r);
      constexpr int kSums = kRms ? 1 : 2;
      const std::array<S, kSums> sums = row_sums<kSums, S>(N, [&](int64_t j) {
        const S gj = g(ri, j);
        if constexpr (kRms) {
          return std::array<S, 1>{gj * xhat(ri, j)};
        } else {
          return std::array<S, 2>{gj * xhat(ri, j), gj};
        }
      });
      mean_gx[r] = sums[0] * inv_n;
      mean_g[r] = kRms ? S(0) : sums[kSums - 1] * inv_n;
    }
    // Pass 2: dx, and the group's dweight/dbias contributions.
    const auto next = [&](int64_t r) {
      const int64_t i = g0 + group + r;
      const bool more = i < row_end;
      return std::array<const T*, 3>{more ? a.src + i * a.src_stride : nullptr,
                                     more ? a.dy + i * N : nullptr,
                                     kDh && more ? a.dh + i * N : nullptr};
    };
    group_tiles<T>(rows, N, next, [&](int64_t r) {
      const int64_t i = g0 + r;
      const Row ri = row(i);
      const S m_gx = mean_gx[r], m_g = mean_g[r];
      const T* dh = kDh ? a.dh + i * N : nullptr;
      T* dx = a.dx + i * N;
      return [=](int64_t j) {
        const S xh = xhat(ri, j);
        S v = g(ri, j) - xh * m_gx;
        if constexpr (!kRms) v -= m_g;
        v *= ri.rstd;
        if constexpr (kDh) v += E::load(dh[j]);
        dx[j] = E::store(v);
        if constexpr (kAcc) {
          const S d = E::load(ri.dy[j]);
          acc_w[j] += d * xh;
          if constexpr (!kRms) acc_b[j] += d;
        }
      };
    });
  }
}

// Thread-private dweight/dbias partial sums: one 64-byte-aligned slab per task, each slab a
// whole number of cache lines, so tasks never write to a shared line.
template <class S>
struct AccSlabs {
  static constexpr size_t kAlign = 64;
  struct Free {
    void operator()(S* p) const { ::operator delete[](p, std::align_val_t(kAlign)); }
  };
  int64_t stride;  // elements between slabs
  std::unique_ptr<S[], Free> data;

  AccSlabs(int64_t n_slabs, int64_t per_slab) {
    const int64_t per_line = int64_t(kAlign / sizeof(S));
    stride = (per_slab + per_line - 1) / per_line * per_line;
    const size_t count = size_t(n_slabs * stride);
    data.reset(static_cast<S*>(::operator new[](count * sizeof(S), std::align_val_t(kAlign))));
    std::fill_n(data.get(), count, S(0));
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

void norm_fwd(NormDType dtype, bool rms, const void* x, int64_t x_row_stride,
              const void* residual, int64_t res_row_stride, const void* weight,
              const void* bias, void* y, void* h, void* mean, void* rstd, int64_t M, int64_t N,
              double eps) {
  if (M <= 0 || N <= 0) return;
  with_elem_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = typename Elem<T>::S;
    const FwdArgs<T> a{static_cast<const T*>(x), x_row_stride,
                       static_cast<const T*>(residual), res_row_stride,
                       static_cast<const T*>(weight), static_cast<const T*>(bias),
                       static_cast<T*>(y), static_cast<T*>(h),
                       static_cast<S*>(mean), static_cast<S*>(rstd),
                       N, S(eps)};
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

void norm_bwd(NormDType dtype, bool rms, const void* dy, const void* dh, const void* src,
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
                       static_cast<const T*>(weight), static_cast<const S*>(mean),
                       static_cast<const S*>(rstd), static_cast<T*>(dx), N};
    bwd_typed<T>(rms, a, static_cast<S*>(dweight), static_cast<S*>(dbias), M);
  });
}

}  // namespace cpu
}  // namespace fastgpt
