// CUDA kernels for fastgpt.linear / fastgpt.matmul: a tensor-core GEMM with the epilogue
// (bias, activation, gated activation, residual) applied while the tile is in registers, and the
// backward of the epilogue. Only CUDA runtime types here: the torch glue (csrc/fastgpt_ops.cpp)
// checks shapes, makes the layout below hold (copying the rare operand that breaks it),
// allocates outputs and workspace, and passes the current stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "activation.h"
#include "common.h"

namespace fastgpt {
namespace cuda {

// Element types of A, B, C, the residual and the saved pre-activation (one dtype per call).
constexpr DType kLinearDTypes[] = {DType::kFloat16, DType::kBFloat16};

// One GEMM operand, a (batch of) rows x cols matrix: element (r, c) of batch i is at
// data + i * batch_stride + r * row_stride + c * col_stride. One of row_stride and col_stride is
// 1 (the contiguous dimension; with a single row or column either may be), the other a multiple
// of 8 elements, data is 16-byte aligned, and batch_stride is a multiple of 8 (0 broadcasts one
// matrix to every batch). Any other layout returns cudaErrorInvalidValue.
struct MatrixRef {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  int64_t batch_stride = 0;
};

// What happens to the fp32 accumulator z = A @ B before C is stored (in this order):
//   z += bias[j]                       (bias: N floats-or-dtype; gated: 2N, [gate; up])
//   pre[i, j] = z                      (optional, for the backward; gated: pre is (M, 2N) with
//                                       the gate in columns [0, N) and up in [N, 2N))
//   y = activate(act, z)               (gated: y = activate(gate_activation(act), g) * u)
//   y += residual[i, j]                (optional, (M, N), unit column stride)
//   C[i, j] = y                        (rounded to dtype)
// Gated activations read B as 2N columns: columns [0, N) are the gate, [N, 2N) the up
// projection, so the kernel holds two accumulators per output tile. M, N here are C's shape.
struct Epilogue {
  Activation act = Activation::kNone;
  const void* bias = nullptr;       // contiguous; dtype or float32 (bias_fp32)
  bool bias_fp32 = false;
  const void* residual = nullptr;   // dtype
  int64_t residual_row_stride = 0;  // multiple of 8
  int64_t residual_batch_stride = 0;
  void* pre = nullptr;              // dtype, contiguous (batch, M, N or 2N)
};

// C (batch, M, N), contiguous = epilogue(A (batch, M, K) @ B (batch, K, N)); B has 2N columns
// for a gated activation. M, N, K >= 1 (M = 1 works: decode), any sizes (tails are masked).
// fp32 accumulation. Batched calls serve torch.matmul's 3-D case; linear passes batch = 1.
cudaError_t gemm(DType dtype, int64_t batch, int64_t M, int64_t N, int64_t K, const MatrixRef& a,
                 const MatrixRef& b, const Epilogue& epilogue, void* c, cudaStream_t stream);

// Bytes of device workspace linear_act_bwd needs (0 without dbias); `device` is the ordinal.
size_t linear_act_bwd_workspace_bytes(int64_t M, int64_t N, Activation act, bool need_dbias,
                                      int device);

// The backward of the epilogue, one pass over dy (M, N) and pre (the forward's saved z, (M, N),
// or (M, 2N) gated), both contiguous, dtype:
//   dz = dy * activate_grad(act, z)    (M, N); gated: dg = dy * u * act'(g), du = dy * act(g),
//                                      dz (M, 2N) as [dg | du] per row, like pre
//   dbias[j] = sum_i dz[i, j]          (float32, N or 2N; optional: null skips it; summed in a
//                                      fixed order through the workspace: deterministic)
// dz is what the two backward GEMMs take (dx = dz @ W, dW = dz^T @ x), in dtype, contiguous.
// With act kNone dz would equal dy: pass dz = null and pre = null, and only dbias is computed.
cudaError_t linear_act_bwd(DType dtype, Activation act, const void* dy, const void* pre, void* dz,
                           float* dbias, void* workspace, int64_t M, int64_t N,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgpt
