// Element types of the CPU kernels: the run-time dtype as a C++ type, and the type each one
// computes in. Shared by every CPU kernel that serves the four floating dtypes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace fastgpt {
namespace cpu {

// Compute type: float for float and the 16-bit types, double for double.
template <class T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

// Calls f(T{}) with T the C++ element type of dtype.
template <class F>
void with_element_type(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat64: f(double{}); return;
    case DType::kBFloat16: f(c10::BFloat16{}); return;
    case DType::kFloat16: f(c10::Half{}); return;
  }
}

}  // namespace cpu
}  // namespace fastgpt
