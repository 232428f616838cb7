// CPU kernels for the normalisation family: LayerNorm and RMSNorm (RMSNorm is LayerNorm
// without centring and without bias, so both share one kernel with an `rms` switch).
// Raw pointers only: the torch glue (csrc/fastgpt_ops.cpp) checks shapes and allocates.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastgpt {
namespace cpu {

// Element types the kernels serve, for x, residual, y, h, dy, dh, dx (all share one dtype).
// Statistics (mean, rstd), weight, bias and the dweight/dbias sums are "stats" type: double
// for kFloat64, float otherwise (the glue converts parameters of any dtype to it).
constexpr DType kNormDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16};

// Forward over M rows of N elements.
//  x:        row i starts at x + i * x_row_stride elements; elements within a row contiguous.
//  residual: nullable; same layout rule with res_row_stride. When given, h = x + residual
//            (rounded to the element type) is written to h and normalised; else x is normalised
//            and h is not touched (may be null).
//  weight:   nullable, N contiguous stats values. bias: nullable, N contiguous stats values;
//            ignored when rms.
//  y, h:     contiguous M x N outputs.
//  mean:     M stats values; written only when !rms (may be null when rms).
//  rstd:     M stats values, 1 / sqrt(var + eps) (rms: 1 / sqrt(mean(x^2) + eps)).
void norm_fwd(DType dtype, bool rms,
              const void* x, int64_t x_row_stride,
              const void* residual, int64_t res_row_stride,
              const void* weight, const void* bias,
              void* y, void* h, void* mean, void* rstd,
              int64_t M, int64_t N, double eps);

// Backward over M rows of N elements.
//  dy:       contiguous M x N, gradient of y.
//  dh:       nullable contiguous M x N, gradient arriving at the h output; added to dx.
//  src:      the tensor that was normalised (h when a residual was given, else x); row i at
//            src + i * src_row_stride.
//  weight:   nullable (then treated as ones), N contiguous stats values.
//  mean/rstd: as written by norm_fwd (mean unused when rms).
//  dx:       contiguous M x N output (also the residual's gradient).
//  dweight:  nullable; N stats values = sum over rows of dy * xhat.
//  dbias:    nullable; N stats values = sum over rows of dy (never when rms).
void norm_bwd(DType dtype, bool rms,
              const void* dy, const void* dh,
              const void* src, int64_t src_row_stride,
              const void* weight, const void* mean, const void* rstd,
              void* dx, void* dweight, void* dbias,
              int64_t M, int64_t N);

}  // namespace cpu
}  // namespace fastgpt
