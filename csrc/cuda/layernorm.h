// CUDA kernels for the normalisation family: LayerNorm and RMSNorm (RMSNorm is LayerNorm
// without centring and without bias, so both share one kernel with an `rms` switch).
// Only CUDA runtime types here: the torch glue (csrc/fastgpt_ops.cpp) checks shapes,
// allocates outputs and workspace, and passes the current stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace fastgpt {
namespace cuda {

// Element type of x, residual, weight, bias, y, h, dy, dh, dx (all share one dtype).
// Statistics (mean, rstd) and dweight/dbias are always float32.
enum class NormDType { kFloat32, kFloat16, kBFloat16 };

// Largest hidden size the kernels accept.
constexpr int64_t kNormMaxHidden = 65536;

// Forward over M rows of N elements; same contract as fastgpt::cpu::norm_fwd, with
// float32 statistics. Row strides are in elements; x_row_stride and res_row_stride
// need not be multiples of the vector width (the kernel falls back to scalar access
// when a row is not 16-byte aligned). Returns the launch status (cudaGetLastError).
cudaError_t norm_fwd(NormDType dtype, bool rms,
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
// dweight/dbias. workspace: at least norm_bwd_workspace_bytes(...) bytes on the device,
// uninitialised (the kernel writes every partial it later reads).
cudaError_t norm_bwd(NormDType dtype, bool rms,
                     const void* dy, const void* dh,
                     const void* src, int64_t src_row_stride,
                     const void* weight, const float* mean, const float* rstd,
                     void* dx, float* dweight, float* dbias,
                     void* workspace, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgpt
