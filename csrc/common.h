// Definitions shared by the CPU kernels, the CUDA kernels and the torch glue. Plain C++ (no
// torch, no CUDA headers), so that csrc/cuda/*.cu can include it. The glue exports what Python
// needs of it through the extension module (fastgpt._C), so Python never restates it.
#pragma once
#include <cstdint>

namespace fastgpt {

// Element types the kernels know. Each kernel header says which of them it serves.
enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Largest hidden size the CUDA norm kernels accept (the CPU kernels have no limit).
constexpr int64_t kNormMaxHidden = 65536;

}  // namespace fastgpt
