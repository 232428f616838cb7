// csrc/cpu/vmath.h against libm, and the CPU kernels' activations (activation.h with
// cpu::VecMath) against the exact ones (LibmMath), over dense grids of their inputs.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "activation.h"
#include "cpu/vmath.h"

namespace {

using fastgpt::Activation;
using fastgpt::LibmMath;
using fastgpt::cpu::VecMath;

long g_cases = 0;

void fail(const char* what, double x, double got, double want) {
  std::printf("FAILED %s at x = %.9g: got %.9g, want %.9g\n", what, x, got, want);
  std::exit(1);
}

// got within rel * |want| + abs of want (NaN only where want is NaN).
void check(const char* what, double x, double got, double want, double rel, double abs) {
  ++g_cases;
  if (std::isnan(want) != std::isnan(got)) fail(what, x, got, want);
  if (std::isnan(want)) return;
  if (std::isinf(want) || std::isinf(got)) {
    if (got != want) fail(what, x, got, want);
    return;
  }
  if (std::fabs(got - want) > rel * std::fabs(want) + abs) fail(what, x, got, want);
}

template <Activation A>
void check_activation(const char* name) {
  for (double x = -12.0; x <= 12.0; x += 1.0 / 512) {
    const float z = float(x);
    const double exact = fastgpt::activate<A, LibmMath>(double(z));
    const double exact_grad = fastgpt::activate_grad<A, LibmMath>(double(z));
    // float math: a few ulps of the result plus the 1.5e-7 of erf times |z| / 2
    check(name, z, fastgpt::activate<A, VecMath>(z), exact, 4e-7, 2e-7 * (1 + std::fabs(z)));
    check(name, z, fastgpt::activate<A, LibmMath>(z), exact, 4e-7, 1e-7 * (1 + std::fabs(z)));
    check(name, z, fastgpt::activate_grad<A, VecMath>(z), exact_grad, 4e-7,
          4e-7 * (1 + z * z));
    // the derivative is the derivative: central differences in double
    if (A != Activation::kRelu || std::fabs(x) > 1e-3) {
      const double h = 1e-5;
      const double fd = (fastgpt::activate<A, LibmMath>(x + h) -
                         fastgpt::activate<A, LibmMath>(x - h)) / (2 * h);
      check(name, x, fastgpt::activate_grad<A, LibmMath>(x), fd, 1e-6, 1e-8);
    }
  }
}

}  // namespace

int main() {
  using namespace fastgpt::cpu;
  for (double x = -130.0; x <= 127.0; x += 1.0 / 64) {
    check("fast_exp2", x, fast_exp2(float(x)), std::exp2(double(float(x))), 6e-7,
          x < -126 ? 1.2e-38 : 0);
  }
  check("fast_exp2(-inf)", -INFINITY, fast_exp2(-INFINITY), 0.0, 0, 0);
  check("fast_exp2(nan)", NAN, fast_exp2(NAN), NAN, 0, 0);
  for (double x = -87.0; x <= 88.0; x += 1.0 / 128) {
    // x * log2(e) is rounded to float first: a relative error of |x| * 2^-24 on top
    check("fast_exp", x, fast_exp(float(x)), std::exp(double(float(x))),
          6e-7 + std::fabs(x) * 6e-8, 0);
  }
  for (double x = -6.0; x <= 6.0; x += 1.0 / 4096) {
    check("fast_erf", x, fast_erf(float(x)), std::erf(double(float(x))), 0, 2e-7);
  }
  for (double x = -20.0; x <= 20.0; x += 1.0 / 1024) {
    check("fast_tanh", x, fast_tanh(float(x)), std::tanh(double(float(x))), 2e-6, 1e-7);
  }
  check_activation<Activation::kGelu>("gelu");
  check_activation<Activation::kGeluTanh>("gelu_tanh");
  check_activation<Activation::kRelu>("relu");
  check_activation<Activation::kSilu>("silu");
  // closed forms
  check("gelu(0)", 0, fastgpt::activate<Activation::kGelu>(0.0f), 0.0, 0, 0);
  check("silu(1)", 1, fastgpt::activate<Activation::kSilu>(1.0), 1.0 / (1.0 + std::exp(-1.0)),
        1e-15, 0);
  check("relu'(0)", 0, fastgpt::activate_grad<Activation::kRelu>(0.0f), 0.0, 0, 0);
  check("gelu'(0)", 0, fastgpt::activate_grad<Activation::kGelu>(0.0), 0.5, 1e-15, 0);
  if (!fastgpt::is_gated(Activation::kSwiglu) || fastgpt::is_gated(Activation::kSilu) ||
      fastgpt::gate_activation(Activation::kSwiglu) != Activation::kSilu ||
      fastgpt::gate_activation(Activation::kGeglu) != Activation::kGelu) {
    std::printf("FAILED gated kinds\n");
    return 1;
  }
  std::printf("checked %ld cases\n", g_cases);
  return 0;
}
