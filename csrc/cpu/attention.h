// CPU kernels for scaled dot-product attention, forward and backward, FlashAttention-style:
// tiled with an online softmax, so the L x S score matrix never exists in memory (scratch is
// a few blocks per thread). Raw pointers only: the torch glue (csrc/fastgpt_ops.cpp) checks
// shapes and dtypes and allocates the outputs.
#pragma once
#include <cstdint>

#include "attention_shape.h"
#include "common.h"

namespace fastgpt {
namespace cpu {

// Element types the kernels serve, for q, k, v, out, dout, dq, dk, dv (all share one dtype).
// The log-sum-exp (lse) is "stats" type: double for kFloat64, float otherwise. 16-bit inputs
// are computed in float (tiles are converted on the way in and out).
constexpr DType kAttentionDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                      DType::kFloat64};

// Forward.
//  q: (B, Hq, L, E), k: (B, Hk, S, E), v: (B, Hk, S, Ev), each with its RowStrides.
//  out: contiguous (B, Hq, L, Ev) output, q's dtype.
//  lse: contiguous (B, Hq, L) stats values, the natural-log log-sum-exp over visible keys of
//       the scaled scores scale * q.k.
void attention_fwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                   double scale,
                   const void* q, const RowStrides& q_strides,
                   const void* k, const RowStrides& k_strides,
                   const void* v, const RowStrides& v_strides,
                   void* out, void* lse);

// Decoding: attention of the newest q_len queries over each batch row's own prefix of a KV
// cache (the contract of fastgpt::cuda::attention_with_kvcache, cuda/attention.h).
//  q: (B, Hq, Tq, E); k_cache: (B, Hk, Tmax, E); v_cache: (B, Hk, Tmax, Ev), each with its
//  RowStrides; shape.q_len = Tq, shape.kv_len = Tmax.
//  kv_lens: (B,), 0 <= kv_lens[b] <= Tmax: row b's keys are cache rows [0, kv_lens[b]), seen
//  causally bottom-right aligned (query i sees keys j <= kv_lens[b] - Tq + i; one that sees
//  none gets out = 0).
//  out: contiguous (B, Hq, Tq, Ev).
void attention_with_kvcache(DType dtype, const AttentionShape& shape, double scale,
                            const void* q, const RowStrides& q_strides,
                            const void* k_cache, const RowStrides& k_strides,
                            const void* v_cache, const RowStrides& v_strides,
                            const int32_t* kv_lens, void* out);

// Backward, from the forward's out and lse (the probabilities are recomputed, never stored).
//  dout: (B, Hq, L, Ev), gradient of out, with its RowStrides; out likewise.
//  q, k, v, lse: as given to and written by attention_fwd (same shape, mask and scale).
//  dq, dk, dv: contiguous outputs shaped like q, k, v; dk and dv sum over the query heads
//              that share each key/value head.
void attention_bwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                   double scale,
                   const void* dout, const RowStrides& dout_strides,
                   const void* q, const RowStrides& q_strides,
                   const void* k, const RowStrides& k_strides,
                   const void* v, const RowStrides& v_strides,
                   const void* out, const RowStrides& out_strides,
                   const void* lse,
                   void* dq, void* dk, void* dv);

}  // namespace cpu
}  // namespace fastgpt
