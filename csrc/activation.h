// The activations fastgpt.linear fuses into its GEMM epilogue, and their derivatives: one
// definition for the CPU kernels, the CUDA kernels (FASTGPT_HOST_DEVICE) and the CPU unit tests
// (tests/cpp/activation_test.cpp checks them against finite differences and closed forms).
// Float in, float out: the epilogues compute in fp32 whatever the storage type.
#pragma once
#include <math.h>

#include <type_traits>

#include "common.h"

namespace fastgpt {

// What the epilogue applies to z = x @ w^T + bias. The gated kinds read two columns per output
// column j: the gate g (weight row j) and the up projection u (weight row N + j), and give
// act(g) * u (SwiGLU: silu, GeGLU: erf gelu), so their weight has 2N rows: [gate; up].
enum class Activation { kNone, kGelu, kGeluTanh, kRelu, kSilu, kSwiglu, kGeglu };

FASTGPT_HOST_DEVICE bool is_gated(Activation a) {
  return a == Activation::kSwiglu || a == Activation::kGeglu;
}

// The activation a gated kind applies to its gate.
FASTGPT_HOST_DEVICE Activation gate_activation(Activation a) {
  return a == Activation::kSwiglu ? Activation::kSilu
         : a == Activation::kGeglu ? Activation::kGelu
                                   : a;
}

// The exact math policy: libm (host) or CUDA's math library (device).
struct LibmMath {
  static FASTGPT_HOST_DEVICE float exp(float x) { return expf(x); }
  static FASTGPT_HOST_DEVICE float erf(float x) { return erff(x); }
  static FASTGPT_HOST_DEVICE float tanh(float x) { return tanhf(x); }
  static FASTGPT_HOST_DEVICE double exp(double x) { return ::exp(x); }
  static FASTGPT_HOST_DEVICE double erf(double x) { return ::erf(x); }
  static FASTGPT_HOST_DEVICE double tanh(double x) { return ::tanh(x); }
};

// act(z) for the non-gated kinds (kNone is the identity), in S (float, or double for
// gradcheck) with the math policy M (LibmMath, or the CPU kernels' vectorisable cpu::VecMath).
template <Activation A, class M = LibmMath, class S>
FASTGPT_HOST_DEVICE S activate(S z) {
  const S half = S(0.5), one = S(1);
  if constexpr (A == Activation::kGelu) {
    return half * z * (one + M::erf(z * S(0.70710678118654752440)));  // z / sqrt(2)
  } else if constexpr (A == Activation::kGeluTanh) {
    const S inner = S(0.79788456080286535588) * (z + S(0.044715) * z * z * z);  // sqrt(2/pi)
    return half * z * (one + M::tanh(inner));
  } else if constexpr (A == Activation::kRelu) {
    return z > S(0) ? z : S(0);
  } else if constexpr (A == Activation::kSilu) {
    return z / (one + M::exp(-z));
  } else {
    return z;
  }
}

// d act(z) / dz for the non-gated kinds. relu'(0) = 0, as torch's threshold_backward gives.
template <Activation A, class M = LibmMath, class S>
FASTGPT_HOST_DEVICE S activate_grad(S z) {
  const S half = S(0.5), one = S(1);
  if constexpr (A == Activation::kGelu) {
    const S cdf = half * (one + M::erf(z * S(0.70710678118654752440)));
    return cdf + z * S(0.39894228040143267794) * M::exp(-half * z * z);  // 1 / sqrt(2 pi)
  } else if constexpr (A == Activation::kGeluTanh) {
    const S c = S(0.79788456080286535588), a = S(0.044715);
    const S t = M::tanh(c * (z + a * z * z * z));
    return half * (one + t) + half * z * (one - t * t) * c * (one + S(3) * a * z * z);
  } else if constexpr (A == Activation::kRelu) {
    return z > S(0) ? one : S(0);
  } else if constexpr (A == Activation::kSilu) {
    const S s = one / (one + M::exp(-z));
    return s * (one + z * (one - s));
  } else {
    return one;
  }
}

// Calls f(std::integral_constant<Activation, a>{}) for the runtime kind `a`, so that kernels
// branch once per call, not once per element.
template <class F>
FASTGPT_HOST_DEVICE auto with_activation(Activation a, F&& f) {
  using K = Activation;
  switch (a) {
    case K::kGelu: return f(std::integral_constant<K, K::kGelu>{});
    case K::kGeluTanh: return f(std::integral_constant<K, K::kGeluTanh>{});
    case K::kRelu: return f(std::integral_constant<K, K::kRelu>{});
    case K::kSilu: return f(std::integral_constant<K, K::kSilu>{});
    case K::kSwiglu: return f(std::integral_constant<K, K::kSwiglu>{});
    case K::kGeglu: return f(std::integral_constant<K, K::kGeglu>{});
    default: return f(std::integral_constant<K, K::kNone>{});
  }
}

// The runtime-kind forms, exact math, float (for kernels that switch per element).
FASTGPT_HOST_DEVICE float activate(Activation a, float z) {
  return with_activation(a, [&](auto k) { return activate<decltype(k)::value>(z); });
}
FASTGPT_HOST_DEVICE float activate_grad(Activation a, float z) {
  return with_activation(a, [&](auto k) { return activate_grad<decltype(k)::value>(z); });
}

}  // namespace fastgpt
