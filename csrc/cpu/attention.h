// CPU kernels for scaled dot-product attention, forward and backward, FlashAttention-style:
// tiled with an online softmax, so the L x S score matrix never exists in memory (scratch is
// a few blocks per thread). Raw pointers only: the torch glue (csrc/fastgpt_ops.cpp) checks
// shapes and dtypes and allocates the outputs.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastgpt {
namespace cpu {

// Element types the kernels serve, for q, k, v, out, dout, dq, dk, dv (all share one dtype).
// The log-sum-exp (lse) is "stats" type: double for kFloat64, float otherwise. 16-bit inputs
// are computed in float (tiles are converted on the way in and out).
constexpr DType kAttentionDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                      DType::kFloat64};

// Sizes of one attention call. Query head h reads key/value head h / (q_heads / kv_heads)
// (grouped-query attention; q_heads must be a multiple of kv_heads, and K/V are never
// repeated in memory). qk_dim (E) and v_dim (Ev) are >= 1 and may differ; q_len (L) and
// kv_len (S) may be 0.
struct AttentionShape {
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t q_len = 0;
  int64_t kv_len = 0;
  int64_t qk_dim = 0;
  int64_t v_dim = 0;
};

// Where the rows of a (batch, heads, rows, dim) operand lie: element [b, h, i, e] is at
// data + b * batch + h * head + i * row + e. Any value is allowed (0 for a broadcast
// dimension, negative, overlapping); elements within a row must be contiguous.
struct RowStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

// Which keys a query sees. causal: torch's top-left alignment (query i sees keys j <= i,
// torch.ones(L, S).tril()), so with L > S rows i >= S see every key. A query that sees no
// key gets out = 0 and lse = -inf (with S = 0, every query).
struct AttentionMask {
  bool causal = false;
};

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
