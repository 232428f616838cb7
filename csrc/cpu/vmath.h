// Float math for the CPU kernels' inner loops: exp2, exp, erf and tanh as plain arithmetic, so
// that loops calling them vectorise under `omp simd` in every target_clones clone (libm's
// expf / erff / tanhf do not vectorise without -ffast-math, which the build does not use). Each
// is within a few float ulps (exp2; exp, see there), 2e-7 (erf) or 1e-7 (tanh) absolute of libm:
// tests/cpp/vmath_test.cpp measures them against libm over their ranges. Double versions call
// libm (double inputs are for gradcheck, where only exactness matters).
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

namespace fastgpt {
namespace cpu {

// 2^x for x <= 127 (callers pass x <= 0, up to rounding), 0 below -126 (so exp2(-inf) = 0
// exactly, as masked scores need), NaN kept. Round x to the nearest integer n, 2^(x-n) by its
// Taylor series to degree 7 (|x-n| <= 1/2: truncation error below 6e-9, so the result is
// within a few float ulps), times 2^n built in the exponent bits.
FASTGPT_INLINE float fast_exp2(float x) {
  const float lo = x > -127.0f ? x : -127.0f;
  const float xc = lo < 127.0f ? lo : 127.0f;
  const float n = (xc + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: round to nearest
  const float f = xc - n;
  float p = 1.5252733804059840e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284770e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const float scale = __builtin_bit_cast(float, uint32_t(int32_t(n) + 127) << 23);
  const float r = p * scale;
  return x < -126.0f ? 0.0f : (x == x ? r : x);
}

FASTGPT_INLINE double fast_exp2(double x) { return std::exp2(x); }

// e^x, saturating at 2^127 above x = 88 and 0 below x = -87.3. x * log2(e) is rounded to float,
// which adds a relative error of up to |x| * 2^-24 (4e-6 at |x| = 70, where e^x is tiny).
FASTGPT_INLINE float fast_exp(float x) { return fast_exp2(x * 1.4426950408889634f); }
FASTGPT_INLINE double fast_exp(double x) { return std::exp(x); }

// erf(x). |x| >= 1: Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ...)) e^(-x^2) with
// t = 1 / (1 + p|x|), odd in x (1.5e-7 absolute in exact arithmetic). Below 1, where that
// form loses digits to the cancellation 1 - (...), the Taylor series 2/sqrt(pi) sum_n
// (-1)^n x^(2n+1) / (n! (2n+1)) to n = 11 (truncation below 1e-10). Both are computed and one is selected, which
// keeps the loop vectorisable. Measured against libm: below 2e-7 absolute.
FASTGPT_INLINE float fast_erf(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float tail = 1.0f - p * t * fast_exp(-ax * ax);
  const float x2 = x * x;
  float s = -1.089222104e-09f;
  s = s * x2 + 1.312253296e-08f;
  s = s * x2 - 1.450385222e-07f;
  s = s * x2 + 1.458916900e-06f;
  s = s * x2 - 1.322751323e-05f;
  s = s * x2 + 1.068376068e-04f;
  s = s * x2 - 7.575757576e-04f;
  s = s * x2 + 4.629629630e-03f;
  s = s * x2 - 2.380952381e-02f;
  s = s * x2 + 1.000000000e-01f;
  s = s * x2 - 3.333333333e-01f;
  s = s * x2 + 1.000000000e+00f;
  const float near0 = 1.1283791670955126f * x * s;  // 2 / sqrt(pi)
  return ax < 1.0f ? near0 : (x < 0.0f ? -tail : tail);
}
FASTGPT_INLINE double fast_erf(double x) { return std::erf(x); }

// tanh(x) = sign(x) (1 - 2 / (e^(2|x|) + 1)); absolute error a few 1e-8 (relative error grows
// below |x| ~ 1e-4, where tanh(x) ~ x is returned instead).
FASTGPT_INLINE float fast_tanh(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f - 2.0f / (fast_exp(2.0f * ax) + 1.0f);
  const float r = ax < 1e-4f ? ax : t;
  return x < 0.0f ? -r : r;
}
FASTGPT_INLINE double fast_tanh(double x) { return std::tanh(x); }

// The math policy of fastgpt::activate (activation.h) in the CPU kernels.
struct VecMath {
  template <class S>
  static FASTGPT_INLINE S exp(S x) { return fast_exp(x); }
  template <class S>
  static FASTGPT_INLINE S erf(S x) { return fast_erf(x); }
  template <class S>
  static FASTGPT_INLINE S tanh(S x) { return fast_tanh(x); }
};

}  // namespace cpu
}  // namespace fastgpt
