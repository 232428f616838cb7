// Definitions shared by the CPU kernels, the CUDA kernels and the torch glue. Plain C++ (no
// torch, no CUDA headers), so that csrc/cuda/*.cu can include it. The glue exports what Python
// needs of it through the extension module (fastgpt._C), so Python never restates it.
#pragma once
#include <cstdint>

// Marks the small index helpers of the CUDA kernels (csrc/cuda/*_index.h) that the CPU test
// suite also compiles and runs with the host compiler (tests/test_cuda_index.py).
#ifdef __CUDACC__
#define FASTGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGPT_HOST_DEVICE inline
#endif

namespace fastgpt {

// Element types the kernels know. Each kernel header says which of them it serves.
enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Largest hidden size the CUDA norm kernels accept (the CPU kernels have no limit).
constexpr int64_t kNormMaxHidden = 65536;

}  // namespace fastgpt
