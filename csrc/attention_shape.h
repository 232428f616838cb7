// Shapes, strides and masks of one attention call, shared by the CPU kernels (cpu/attention.h),
// the CUDA kernels (cuda/attention.h) and the torch glue. Plain C++, so .cu files include it.
#pragma once
#include <cstdint>

namespace fastgpt {

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

}  // namespace fastgpt
