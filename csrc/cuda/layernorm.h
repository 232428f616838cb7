// CUDA kernels for the normalisation family: LayerNorm and RMSNorm (RMSNorm is LayerNorm
// without centring and without bias, so both share one kernel with an `rms` switch).
// Only CUDA runtime types here: the torch glue (csrc/fastgpt_ops.cpp) checks shapes,
// allocates outputs and workspace, and passes the current stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common.h"

namespace fastgpt {
namespace cuda {

// The activation dtypes the kernels serve (what the glue accepts for `dtype` below).
constexpr DType kNormDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

// Element types (fastgpt::DType, csrc/common.h). `dtype` is the type of the activations and
// their gradients: x, residual, y, h, dy, dh, src, dx; kFloat32, kFloat16 or kBFloat16.
// `param_dtype` is the type of weight and bias (both, when given): either `dtype` or
// kFloat32, so mixed precision training can hand fp32 parameters beside bf16/fp16
// activations; any other pair (and kFloat64 anywhere) returns cudaErrorInvalidValue.
// Statistics (mean, rstd) and dweight/dbias are always float32; all arithmetic is fp32.
// weight and bias are contiguous, N elements each, and may be null (scale 1, shift 0).
// Hidden sizes above fastgpt::kNormMaxHidden return cudaErrorInvalidValue.

// Forward over M rows of N elements; same contract as fastgpt::cpu::norm_fwd, with
// float32 statistics. Row strides are in elements; x_row_stride and res_row_stride
// need not be multiples of the vector width (the kernel falls back to scalar access
// when a row is not 16-byte aligned). Returns the launch status (cudaGetLastError).
cudaError_t norm_fwd(DType dtype, DType param_dtype, bool rms,
                     const void* x, int64_t x_row_stride,
                     const void* residual, int64_t res_row_stride,
                     const void* weight, const void* bias,
                     void* y, void* h, float* mean, float* rstd,
                     int64_t M, int64_t N, float eps, cudaStream_t stream);

// Bytes of device workspace norm_bwd needs for partial dweight/dbias sums
// (0 when neither is requested). `device` is the CUDA device ordinal.
size_t norm_bwd_workspace_bytes(int64_t M, int64_t N, bool need_dweight, bool need_dbias,
                                int device);

// Backward; same contract as fastgpt::cpu::norm_bwd with float32 statistics and float32
// dweight/dbias (whatever param_dtype is: the caller rounds them to the parameter's dtype).
// workspace: at least norm_bwd_workspace_bytes(...) bytes on the device, uninitialised (the
// kernel writes every partial it later reads).
cudaError_t norm_bwd(DType dtype, DType param_dtype, bool rms,
                     const void* dy, const void* dh,
                     const void* src, int64_t src_row_stride,
                     const void* weight, const float* mean, const float* rstd,
                     void* dx, float* dweight, float* dbias,
                     void* workspace, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgpt
