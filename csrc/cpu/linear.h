// CPU kernels for fastgpt.linear: the epilogue of y = act(x @ w^T + bias) + residual, fused into
// one pass over the GEMM's output (the GEMM itself is ATen's: oneDNN / MKL), and the backward of
// that epilogue. Raw pointers only: the torch glue (csrc/fastgpt_ops.cpp) runs the GEMMs,
// checks shapes and allocates.
#pragma once
#include <cstdint>

#include "activation.h"
#include "common.h"

namespace fastgpt {
namespace cpu {

// Element types of z, y, the residual, dy and dz (one dtype per call).
constexpr DType kLinearDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                   DType::kFloat64};

// z = x @ w^T for a few rows of x (decoding: one token per sequence), float32. x (M, K) and w
// (N, K) have unit column strides, z (M, N) is contiguous. ATen's GEMM reads an nn.Linear
// weight at ~9.5 GB/s for M = 1 where the memory reads ~15 GB/s (AMD EPYC, 2 threads, GPT-2's
// layer weights, 340 MB, too large for the caches); this kernel streams it.
constexpr int64_t kSkinnyMaxRows = 4;
void skinny_gemm(const float* x, int64_t x_row_stride, const float* w, int64_t w_row_stride,
                 float* z, int64_t M, int64_t N, int64_t K);

// The forward epilogue, in one pass over rows of z = x @ w^T, (M, Nz) contiguous, where Nz = N,
// or 2N for a gated activation (columns [0, N) the gate g, [N, 2N) the up projection u):
//   z += bias                 in place: z becomes the pre-activation the backward reads
//   y = act(z)                gated: act(g) * u, with gate_activation(act)
//   y += residual             (M, N), rows residual_row_stride apart
// y (M, N) contiguous; it may be z itself when act is kNone. bias: Nz elements of bias_dtype
// (dtype, or kFloat32 beside 16-bit z), or null; residual may be null. Arithmetic in float
// (double for kFloat64) with cpu::VecMath's activations.
void linear_epilogue(DType dtype, DType bias_dtype, Activation act, void* z, const void* bias,
                     const void* residual, int64_t residual_row_stride, void* y, int64_t M,
                     int64_t N);

// The backward of the epilogue, one pass over dy (M, N; rows dy_row_stride apart) and pre (the
// forward's z + bias, (M, Nz) contiguous):
//   dz = dy * act'(pre)       (M, N) contiguous; gated: dg = dy * u * act'(g), du = dy * act(g),
//                             dz (M, 2N) laid out like pre
//   dbias = sum over rows of dz, Nz values, float (double for kFloat64), summed in a fixed order
//                             (per block of rows, then the blocks in order: deterministic for
//                             any thread count); null skips it.
// With act kNone, dz would be dy: pass dz = pre = null and only dbias (of dy) is computed.
void linear_act_bwd(DType dtype, Activation act, const void* dy, int64_t dy_row_stride,
                    const void* pre, void* dz, void* dbias, int64_t M, int64_t N);

}  // namespace cpu
}  // namespace fastgpt
