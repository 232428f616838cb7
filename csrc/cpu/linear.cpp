// CPU epilogue kernels of fastgpt.linear; the contract is in linear.h.
//
// The GEMM is ATen's (oneDNN / MKL); what fastgpt adds on the CPU is that everything after it
// happens in one pass over the output while each row is in cache: eager PyTorch's
// F.linear + activation + add reads and writes the (M, N) output three times (addmm copies the
// bias in before the product, the activation rewrites it, the add reads it with the residual).
// Rows are independent, so they are split across the intra-op threads; within a row the
// activation's math (cpu/vmath.h) is plain arithmetic, so each column loop vectorises in every
// target_clones clone. The activation kind is a template parameter (with_activation), so the
// per-element code has no branch on it.
#include "cpu/linear.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/element.h"
#include "cpu/simd.h"
#include "cpu/vmath.h"

#if !defined(INTRA_OP_PARALLEL)
#error "linear.cpp must be compiled with -fopenmp (ATen/Parallel.h would run serially)"
#endif

namespace fastgpt {
namespace cpu {
namespace {

// Rows per parallel task: enough elements that a task outweighs its scheduling (~64K).
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(n, 1)); }

// v rounded to T and back: the pre-activation as the backward will read it (identity for float
// and double), so that forward and backward see the same values.
template <class T, class S>
FASTGPT_INLINE S as_stored(S v) {
  if constexpr (std::is_same_v<T, S>) {
    return v;
  } else {
    return static_cast<S>(static_cast<T>(v));
  }
}

// One row of the forward epilogue. The bias and residual tests are hoisted out of the column
// loops (HAS_BIAS, HAS_RES): with them inside, GCC vectorised the loop but the if-converted
// conditional stores ran it 12x slower (gelu_tanh + bias over 4096 x 3072 fp32, one thread,
// AVX2 clone: 272 ms, hoisted 23 ms).
template <Activation A, bool HAS_BIAS, bool HAS_RES, class T, class B>
FASTGPT_SIMD_CLONES void epilogue_row(T* z, const B* bias, const T* res, T* y, int64_t n) {
  using S = typename Compute<T>::type;
  constexpr bool gated = A == Activation::kSwiglu || A == Activation::kGeglu;
  constexpr Activation G = gated ? (A == Activation::kSwiglu ? Activation::kSilu
                                                              : Activation::kGelu)
                                 : A;
  if constexpr (gated) {
    T* up = z + n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      S g = static_cast<S>(z[j]), u = static_cast<S>(up[j]);
      if constexpr (HAS_BIAS) {
        g = as_stored<T>(g + static_cast<S>(bias[j]));
        u = as_stored<T>(u + static_cast<S>(bias[n + j]));
        z[j] = static_cast<T>(g);
        up[j] = static_cast<T>(u);
      }
      S out = activate<G, VecMath>(g) * u;
      if constexpr (HAS_RES) out += static_cast<S>(res[j]);
      y[j] = static_cast<T>(out);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      S v = static_cast<S>(z[j]);
      if constexpr (HAS_BIAS) {
        v += static_cast<S>(bias[j]);
        if constexpr (A != Activation::kNone) {
          v = as_stored<T>(v);
          z[j] = static_cast<T>(v);
        }
      }
      S out = activate<A, VecMath>(v);
      if constexpr (HAS_RES) out += static_cast<S>(res[j]);
      y[j] = static_cast<T>(out);
    }
  }
}

template <Activation A, class T>
FASTGPT_SIMD_CLONES void act_bwd_row(const T* dy, const T* pre, T* dz, int64_t n) {
  using S = typename Compute<T>::type;
  if constexpr (A == Activation::kSwiglu || A == Activation::kGeglu) {
    constexpr Activation G = A == Activation::kSwiglu ? Activation::kSilu : Activation::kGelu;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const S d = static_cast<S>(dy[j]), g = static_cast<S>(pre[j]), u = static_cast<S>(pre[n + j]);
      dz[j] = static_cast<T>(d * u * activate_grad<G, VecMath>(g));
      dz[n + j] = static_cast<T>(d * activate<G, VecMath>(g));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      dz[j] = static_cast<T>(static_cast<S>(dy[j]) *
                             activate_grad<A, VecMath>(static_cast<S>(pre[j])));
    }
  }
}

template <class T, class S>
FASTGPT_SIMD_CLONES void add_row(S* acc, const T* row, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<S>(row[j]);
}

// z[0:M, j0:j1] = x @ w^T for M <= kSkinnyMaxRows rows of x, float32: each weight row is read
// once and dotted with all M rows of x while it is in L1 (M partial sums per lane, one
// accumulator set per row of x, unrolled by the template). Weight rows are contiguous
// (nn.Linear's layout), so the loop streams the weight at the memory's read rate.
template <int M>
FASTGPT_SIMD_CLONES void skinny_rows(const float* x, int64_t x_stride, const float* w,
                                     int64_t w_stride, float* z, int64_t z_stride, int64_t j0,
                                     int64_t j1, int64_t K) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* wj = w + j * w_stride;
    float acc[M] = {};
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * x_stride;
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < K; ++k) a += xm[k] * wj[k];
      acc[m] = a;
    }
    for (int m = 0; m < M; ++m) z[m * z_stride + j] = acc[m];
  }
}

}  // namespace

void skinny_gemm(const float* x, int64_t x_row_stride, const float* w, int64_t w_row_stride,
                 float* z, int64_t M, int64_t N, int64_t K) {
  auto run = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    // ~32K weights (128 KiB) per task: enough to outweigh the scheduling, small enough that
    // both threads get work at GPT-2's 768 x 768.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(K, 1));
    at::parallel_for(0, N, grain, [&](int64_t j0, int64_t j1) {
      skinny_rows<R>(x, x_row_stride, w, w_row_stride, z, N, j0, j1, K);
    });
  };
  switch (M) {
    case 1: run(std::integral_constant<int, 1>{}); return;
    case 2: run(std::integral_constant<int, 2>{}); return;
    case 3: run(std::integral_constant<int, 3>{}); return;
    case 4: run(std::integral_constant<int, 4>{}); return;
  }
  TORCH_INTERNAL_ASSERT(false, "skinny_gemm: M = ", M, " is over kSkinnyMaxRows");
}

void linear_epilogue(DType dtype, DType bias_dtype, Activation act, void* z, const void* bias,
                     const void* residual, int64_t residual_row_stride, void* y, int64_t M,
                     int64_t N) {
  if (M <= 0 || N <= 0) return;
  const int64_t nz = is_gated(act) ? 2 * N : N;
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto run = [&](auto bias_zero) {
      using B = decltype(bias_zero);
      with_activation(act, [&](auto kind) {
        constexpr Activation A = decltype(kind)::value;
        const auto rows = [&](auto has_bias, auto has_res) {
          at::parallel_for(0, M, row_grain(nz), [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const T* res = residual ? static_cast<const T*>(residual) + i * residual_row_stride
                                      : nullptr;
              epilogue_row<A, decltype(has_bias)::value, decltype(has_res)::value, T, B>(
                  static_cast<T*>(z) + i * nz, static_cast<const B*>(bias), res,
                  static_cast<T*>(y) + i * N, N);
            }
          });
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if (bias && residual) rows(Yes{}, Yes{});
        else if (bias) rows(Yes{}, No{});
        else if (residual) rows(No{}, Yes{});
        else rows(No{}, No{});
      });
    };
    if (bias_dtype == DType::kFloat32 && dtype != DType::kFloat32) {
      run(float{});
    } else {
      run(zero);
    }
  });
}

void linear_act_bwd(DType dtype, Activation act, const void* dy, int64_t dy_row_stride,
                    const void* pre, void* dz, void* dbias, int64_t M, int64_t N) {
  if (N <= 0) return;
  const int64_t nz = is_gated(act) ? 2 * N : N;
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    using S = typename Compute<T>::type;
    // dbias from blocks of `block` rows (a fixed size, so the sums do not depend on the
    // thread count), each block's partial row in `partial`, then the blocks in order.
    const int64_t block = std::max<int64_t>(16, row_grain(nz));
    const int64_t n_blocks = (M + block - 1) / block;
    std::vector<S> partial(dbias ? size_t(n_blocks * nz) : 0, S(0));
    with_activation(act, [&](auto kind) {
      constexpr Activation A = decltype(kind)::value;
      at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t i = b * block; i < std::min(M, (b + 1) * block); ++i) {
            const T* dy_row = static_cast<const T*>(dy) + i * dy_row_stride;
            const T* out_row = dy_row;  // kNone: dz is dy
            if constexpr (A != Activation::kNone) {
              T* dz_row = static_cast<T*>(dz) + i * nz;
              act_bwd_row<A, T>(dy_row, static_cast<const T*>(pre) + i * nz, dz_row, N);
              out_row = dz_row;
            }
            if (dbias) add_row(partial.data() + b * nz, out_row, nz);
          }
        }
      });
    });
    if (dbias) {
      S* out = static_cast<S*>(dbias);
      std::fill(out, out + nz, S(0));
      for (int64_t b = 0; b < n_blocks; ++b) add_row(out, partial.data() + b * nz, nz);
    }
  });
}

}  // namespace cpu
}  // namespace fastgpt
