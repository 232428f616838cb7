// CUDA kernels for scaled dot-product attention: FlashAttention-2 style forward and backward on
// tensor cores (attention.cu), and split-KV decoding over a KV cache (attention_with_kvcache.cu).
// Only CUDA runtime types here: the torch glue (csrc/fastgpt_ops.cpp) checks shapes, makes the
// layout below hold (copying or zero-padding the rare input that breaks it), allocates outputs
// and workspace, and passes the current stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "attention_shape.h"
#include "common.h"

namespace fastgpt {
namespace cuda {

// Element types of q, k, v, out, dout, dq, dk, dv (one dtype per call). lse is always float32.
constexpr DType kAttentionDTypes[] = {DType::kFloat16, DType::kBFloat16};

// Largest qk_dim (E) and v_dim (Ev) the kernels serve.
constexpr int64_t kAttentionMaxHeadDim = 256;

// Layout every entry point below relies on (cudaErrorInvalidValue otherwise): every pointer is
// 16-byte aligned, qk_dim and v_dim are multiples of kAttentionDimMultiple, and every RowStrides
// value is a multiple of kAttentionDimMultiple elements, so each row is whole 16-byte vectors
// (cp.async / ldmatrix granules). Outputs are contiguous.
constexpr int64_t kAttentionDimMultiple = 8;

// Forward; the contract of fastgpt::cpu::attention_fwd (cpu/attention.h) with float32 lse:
//  q: (B, Hq, L, E), k: (B, Hk, S, E), v: (B, Hk, S, Ev), each with its RowStrides;
//  out: contiguous (B, Hq, L, Ev); lse: contiguous (B, Hq, L), natural-log log-sum-exp of the
//  scaled scores over the visible keys (-inf, with out = 0, for a query that sees none).
cudaError_t attention_fwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                          float scale,
                          const void* q, const RowStrides& q_strides,
                          const void* k, const RowStrides& k_strides,
                          const void* v, const RowStrides& v_strides,
                          void* out, float* lse, cudaStream_t stream);

// Bytes of device workspace attention_bwd needs (uninitialised; the kernels write every byte
// they later read).
size_t attention_bwd_workspace_bytes(const AttentionShape& shape);

// Backward; the contract of fastgpt::cpu::attention_bwd with float32 lse: dq, dk, dv are
// contiguous and shaped like q, k, v; dk and dv sum over the query heads sharing a kv head.
cudaError_t attention_bwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                          float scale,
                          const void* dout, const RowStrides& dout_strides,
                          const void* q, const RowStrides& q_strides,
                          const void* k, const RowStrides& k_strides,
                          const void* v, const RowStrides& v_strides,
                          const void* out, const RowStrides& out_strides,
                          const float* lse,
                          void* dq, void* dk, void* dv, void* workspace, cudaStream_t stream);

// Decoding: attention of a few new queries over each batch row's own prefix of a KV cache,
// after the new keys and values were written into it.
//  q: (B, Hq, Tq, E); k_cache: (B, Hk, Tmax, E); v_cache: (B, Hk, Tmax, Ev), with RowStrides;
//  shape.q_len = Tq, shape.kv_len = Tmax.
//  kv_lens: device int32 (B,), contiguous; row b's keys are cache rows [0, kv_lens[b]), with
//  0 <= kv_lens[b] <= Tmax (the glue checks). Causal, bottom-right aligned: query i of row b
//  sees keys j <= kv_lens[b] - Tq + i (the new tokens are the last Tq of the row's keys); a
//  query that sees no key gets out = 0.
//  out: contiguous (B, Hq, Tq, Ev).
// Split-KV (flash-decoding): each (batch, kv head) walks its keys in `splits` parts that run in
// parallel, each part a fixed share of that row's own length (read on the device, so a CUDA
// graph of the call stays valid as lengths grow), then a second kernel merges the parts by their
// log-sum-exp. `device` is the CUDA device ordinal (its SM count sets the split count).
size_t attention_with_kvcache_workspace_bytes(const AttentionShape& shape, int device);
cudaError_t attention_with_kvcache(DType dtype, const AttentionShape& shape, float scale,
                                   const void* q, const RowStrides& q_strides,
                                   const void* k_cache, const RowStrides& k_strides,
                                   const void* v_cache, const RowStrides& v_strides,
                                   const int32_t* kv_lens, void* out, void* workspace,
                                   int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastgpt
