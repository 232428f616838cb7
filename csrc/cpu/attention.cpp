// CPU scaled dot-product attention, forward and backward (see attention.h for the contract).
//
// Shape of the work (FlashAttention 2 on a CPU):
//  * Forward: one task per (batch, query head, block of queries). A task walks the key
//    blocks its queries can see (fully masked causal blocks are never visited; only blocks
//    that straddle the mask boundary are masked element by element), keeping a running row
//    max and row sum (online softmax) and a block x Ev accumulator. Scratch is a few blocks
//    per thread: the L x S score matrix never exists.
//  * Backward, from out and lse (P is recomputed, never stored): delta = rowsum(dO * O), then
//    pass A, one task per (batch, query head, query block), accumulates dQ over key blocks;
//    pass B, one task per (batch, key/value head, key block), accumulates dK and dV over the
//    query heads of its group and the query blocks that see the key block. Every output
//    element has one writer: no atomics, no reduction buffers, and B = H = 1 still splits
//    into as many tasks as there are blocks. The price is that both passes recompute
//    S = QK^T and dP = dO V^T: 7 block products per tile pair against the 5 of a single pass.
//  * All block products go through gemm() below (BLAS); the element-wise work between them
//    (mask, exp, row sums, conversions) is plain loops vectorised by the compiler.
//
// Numerics: scores are computed already multiplied by scale * log2(e), so that the softmax
// needs only exp2 (see fast_exp2); lse is stored in natural log. 16-bit inputs are converted
// to float tile by tile; all accumulation is in float (double for float64 inputs).
//
// Tasks are handed out dynamically (run_tasks): causal query blocks differ in cost by up to
// the number of blocks, and a static split of the range leaves one thread most of the work.
//
// Where later features go: which keys a query sees is decided in one place, Visible (sliding
// windows change its ranges, which stay monotone in the query index); packed variable-length
// batches change how a task maps to its sequence (its first row in Operand::rows and its own
// Visible lengths), not the block loops; soft-capping is one more element-wise step in
// Problem::score_tile, which the forward and both backward passes share (the backward then
// also needs the cap's derivative in dscores_tile); lse is already returned.
#include "cpu/attention.h"
#include "cpu/element.h"
#include "cpu/simd.h"
#include "cpu/vmath.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

// ATen's parallel_for is a header template that only runs in parallel when this translation
// unit itself is compiled with the backend's flags (-fopenmp for torch's OpenMP build).
#if !defined(INTRA_OP_PARALLEL)
#error "attention.cpp must be compiled with -fopenmp (ATen/Parallel.h would run serially)"
#endif


// ---------------------------------------------------------------------------------------
// BLAS. The Fortran gemm symbols of the BLAS that libtorch_cpu is linked with (MKL in the
// x86-64 wheels, both this machine's torch 2.13 CPU and the GPU image's torch 2.11 cu130),
// declared weak: where a torch build does not export them they are null and gemm() falls back
// to ATen. (ATen's own at::native::cpublas::gemm is declared in a header but not exported from
// libtorch_cpu for float.)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastgpt {
namespace cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Block sizes (queries x keys per tile), measured on the 2-core AMD EPYC (AVX2, 512 KiB L2 per
// core) CI machine, fp32, B=4 H=12 T=1024 D=64, 2 threads, interleaved runs, best of 5 (other
// jobs shared the machine: spreads under ~5% are noise):
//   forward, causal      128x256 144 ms, 256x256 144, 128x512 148, 256x512 152, 64x256 181;
//   forward, not causal  128x256 148 ms, 256x256 137, 256x512 123, 512x512 124;
//   backward, causal     128x128 524 ms, 128x256 509, 256x128 528, 256x256 537, 64x64 592.
// Larger blocks amortise the per-call cost of the gemms (MKL packs both operands on every
// call); causal attention prefers short query blocks because the diagonal tile of each query
// block computes bq^2 / 2 scores that are masked away. The backward keeps 128 x 128 so its
// two score-sized tiles and K, V, dK, dV blocks (about 330 KiB at E = 64) stay in L2.
struct Blocks {
  int64_t q, k;
};
constexpr Blocks kFwdCausalBlocks{128, 256};
constexpr Blocks kFwdFullBlocks{256, 512};
constexpr Blocks kBwdBlocks{128, 128};

// ------------------------------------------------------------------------------- gemm
//
// Row-major C[m x n] = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T; A is m x k
// (k x m when ta), B is k x n (n x k when tb), leading dimensions in elements; beta = 0
// never reads C. The one place a block product is computed, so the BLAS can be swapped here.
//
// Why the Fortran symbols rather than at::mm_out on at::from_blob views: measured on this
// machine (1 thread, fp32, per call), sgemm_ vs at::mm_out: 1x512x64 3.4 vs 5.2 us,
// 64x64x64 6.7 vs 8.7 us, 128x256x64 51.2 vs 52.9 us, 256x256x64 100 vs 105 us: ATen's
// dispatch costs about 2 us a call, 3% at the forward's 128 x 256 tiles, more for the
// backward's smaller ones and a third of a decode-sized (1-query) call. With the fallback
// forced, the B=4 H=12 T=1024 D=64 benchmark ran as fast within its noise (a few %).
//
// Threads: gemm is called from inside at::parallel_for tasks and must run on the calling
// thread only. MKL's OpenMP layer does so inside an enclosing OpenMP parallel region
// (measured: attention calls add no threads to the process, and forcing MKL to one thread
// with MKL_Set_Num_Threads_Local(1) around the calls changed nothing); ATen's mm, the
// fallback, runs its own parallel_for serially there.
template <class S>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                             const S*, const S*, const int*, const S*, const int*, const S*, S*,
                             const int*);

template <class S>
FortranGemm<S> fortran_gemm() {
  if constexpr (std::is_same_v<S, float>) {
    return &sgemm_;
  } else {
    return &dgemm_;
  }
}

template <class S>
void aten_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, S alpha, const S* a,
               int64_t lda, const S* b, int64_t ldb, S beta, S* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  S* pa = const_cast<S*>(a);
  S* pb = const_cast<S*>(b);
  const at::Tensor A = ta ? at::from_blob(pa, {k, m}, {lda, 1}, opts).t()
                          : at::from_blob(pa, {m, k}, {lda, 1}, opts);
  const at::Tensor B = tb ? at::from_blob(pb, {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(pb, {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(A, B, beta, alpha);  // beta = 0 ignores C's old contents, NaN included
}

template <class S>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, S alpha, const S* a, int64_t lda,
          const S* b, int64_t ldb, S beta, S* c, int64_t ldc) {
  const FortranGemm<S> f = fortran_gemm<S>();
  if (f == nullptr || std::max({m, n, k, lda, ldb, ldc}) > int64_t(INT_MAX)) {
    aten_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
  const char op_b = tb ? 'T' : 'N', op_a = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDB = int(ldb), LDA = int(lda), LDC = int(ldc);
  f(&op_b, &op_a, &M, &N, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// ------------------------------------------------------------------- element-wise helpers


template <class S>
constexpr S kNegInf = -std::numeric_limits<S>::infinity();

// The softmax reference of a row whose max is m: exp2(s - ref). A row that sees nothing
// (m = -inf) uses 0, so its masked scores give exp2(-inf) = 0 rather than NaN.
template <class S>
FASTGPT_INLINE S finite_or_zero(S m) {
  return m == kNegInf<S> ? S(0) : m;
}

// Online-softmax step over an m x n tile of scaled scores (base-2 units), in place: each row
// becomes P = exp2(s - new_max); row_max and row_sum are updated and corr[r] receives
// exp2(old_max - new_max), the factor the row's accumulator must be multiplied by.
template <class S>
FASTGPT_SIMD_CLONES void softmax_tile(S* s, int64_t lds, int64_t m,
                                                               int64_t n, S* row_max, S* row_sum,
                                                               S* corr) {
  for (int64_t r = 0; r < m; ++r) {
    S* row = s + r * lds;
    S mx = kNegInf<S>;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    const S old = row_max[r];
    const S now = std::max(old, mx);
    const S ref = finite_or_zero(now);
    S sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const S p = fast_exp2(row[j] - ref);
      row[j] = p;
      sum += p;
    }
    const S c = old == kNegInf<S> ? S(0) : fast_exp2(old - ref);
    row_sum[r] = row_sum[r] * c + sum;
    row_max[r] = now;
    corr[r] = c;
  }
}

// acc row r *= corr[r], rows whose factor is 1 skipped.
template <class S>
FASTGPT_SIMD_CLONES void scale_rows(S* acc, int64_t ld, int64_t m, int64_t n, const S* corr) {
  for (int64_t r = 0; r < m; ++r) {
    if (corr[r] == S(1)) continue;
    S* row = acc + r * ld;
    const S c = corr[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= c;
  }
}

// Backward: s becomes P = exp2(s - lse2[r]) (lse2: the row's log-sum-exp in base 2).
template <class S>
FASTGPT_SIMD_CLONES void probs_tile(S* s, int64_t lds, int64_t m,
                                                             int64_t n, const S* lse2) {
  for (int64_t r = 0; r < m; ++r) {
    S* row = s + r * lds;
    const S ref = finite_or_zero(lse2[r]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = fast_exp2(row[j] - ref);
  }
}

// Backward: dp becomes dS = P * (dP - delta[r]), the gradient of the (unscaled-by-scale)
// scores; the callers fold scale into the next gemm's alpha.
template <class S>
FASTGPT_SIMD_CLONES void dscores_tile(S* dp, const S* p, int64_t ld, int64_t m, int64_t n,
                                      const S* delta) {
  for (int64_t r = 0; r < m; ++r) {
    S* d = dp + r * ld;
    const S* pr = p + r * ld;
    const S dl = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = pr[j] * (d[j] - dl);
  }
}

// rows x cols elements from src (row stride ld_src) to dst (row stride ld_dst), converted,
// each row multiplied by mul[r] when mul is given.
template <class From, class To>
FASTGPT_SIMD_CLONES void convert_rows(const From* src, int64_t ld_src, int64_t rows,
                                      int64_t cols, To* dst, int64_t ld_dst,
                                      const typename Compute<To>::type* mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const From* s = src + r * ld_src;
    To* d = dst + r * ld_dst;
    if (mul != nullptr) {
      const auto c = mul[r];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) d[j] = To(static_cast<decltype(c)>(s[j]) * c);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) d[j] = To(s[j]);
    }
  }
}

// ------------------------------------------------------------------------------ scratch

// One allocation per worker thread, carved into 64-byte aligned pieces by Pieces::take (which,
// on a Pieces without a base, only adds up the sizes).
class Scratch {
 public:
  explicit Scratch(int64_t bytes)
      : base_(static_cast<char*>(::operator new(size_t(std::max<int64_t>(bytes, 64)),
                                                std::align_val_t{64}))) {}
  ~Scratch() { ::operator delete(base_, std::align_val_t{64}); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* base() const { return base_; }

 private:
  char* base_;
};

struct Pieces {
  char* base = nullptr;  // null while sizing
  int64_t used = 0;
  template <class S>
  S* take(int64_t n) {
    S* p = base ? reinterpret_cast<S*>(base + used) : nullptr;
    used += (n * int64_t(sizeof(S)) + 63) / 64 * 64;
    return p;
  }
};

// Runs body(task, workspace) for every task in [0, n_tasks) on the intra-op threads, each
// thread taking the next task as it finishes one (causal tasks differ a lot in cost; ordering
// them most expensive first is the caller's job). Each thread gets one workspace,
// make(pieces), over its own scratch; make takes its buffers from `pieces` in the same order
// on the sizing call (base null) and the real one. Nested inside another parallel region,
// at::parallel_for runs everything on the calling thread.
template <class Make, class Body>
void run_tasks(int64_t n_tasks, const Make& make, const Body& body) {
  if (n_tasks <= 0) return;
  Pieces sizing;
  (void)make(sizing);
  const int64_t bytes = sizing.used;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch(bytes);
    Pieces pieces{scratch.base(), 0};
    auto ws = make(pieces);
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      body(t, ws);
    }
  });
}

// ------------------------------------------------------------------------------ the mask

struct Range {
  int64_t begin, end;
};

// Which keys each query sees: with `causal`, query i sees keys j <= i + offset (offset 0 is
// torch's top-left alignment; kv_len - q_len is the bottom-right alignment of decoding, where
// the queries are the last q_len keys). Every range is monotone in the query index (begin and
// end never decrease as i grows), which the block-level helpers rely on.
struct Visible {
  bool causal;
  int64_t q_len, kv_len;
  int64_t offset = 0;

  Range keys(int64_t i) const {
    return {0, causal ? std::clamp<int64_t>(i + 1 + offset, 0, kv_len) : kv_len};
  }
  // Keys seen by any of queries [i0, i1).
  Range keys(int64_t i0, int64_t i1) const { return {keys(i0).begin, keys(i1 - 1).end}; }
  // Queries that see any of keys [j0, j1).
  Range queries(int64_t j0, int64_t /*j1*/) const {
    return {causal ? std::clamp<int64_t>(j0 - offset, 0, q_len) : 0, q_len};
  }
  // Whether every query of [i0, i1) sees every key of [j0, j1) (the tile needs no mask).
  bool whole(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return keys(i1 - 1).begin <= j0 && keys(i0).end >= j1;
  }
};

// Sets the scores of keys a query does not see to -inf in an m x n tile of queries [i0, ..)
// and keys [j0, ..).
template <class S>
void mask_tile(S* s, int64_t lds, int64_t i0, int64_t m, int64_t j0, int64_t n,
               const Visible& vis) {
  for (int64_t r = 0; r < m; ++r) {
    const Range k = vis.keys(i0 + r);
    const int64_t lo = std::clamp<int64_t>(k.begin - j0, 0, n);
    const int64_t hi = std::clamp<int64_t>(k.end - j0, lo, n);
    S* row = s + r * lds;
    std::fill(row, row + lo, kNegInf<S>);
    std::fill(row + hi, row + n, kNegInf<S>);
  }
}

// ----------------------------------------------------------------------- the problem

// A strided (batch, head, row, dim) operand of element type T.
template <class T>
struct Operand {
  const T* data;
  RowStrides st;
  const T* rows(int64_t b, int64_t h, int64_t i) const {
    return data + b * st.batch + h * st.head + i * st.row;
  }
};

// A block of rows as gemm reads it: in place when the rows already are of the compute type
// and at a stride BLAS accepts, else converted / packed into scratch.
template <class S>
struct Tile {
  const S* data;
  int64_t ld;
};

template <class T, class S>
Tile<S> load_tile(const T* src, int64_t ld, int64_t rows, int64_t cols, S* scratch) {
  if constexpr (std::is_same_v<T, S>) {
    if (rows == 1) return {src, cols};
    if (ld >= cols && ld <= int64_t(INT_MAX)) return {src, ld};
  }
  convert_rows<T, S>(src, ld, rows, cols, scratch, cols, nullptr);
  return {scratch, cols};
}

template <class T>
struct Problem {
  using S = typename Compute<T>::type;
  AttentionShape sh;
  Visible vis;
  S scale;   // of the scores
  S alpha2;  // scale * log2(e): scores in base-2 units
  Operand<T> q, k, v;
  int64_t group;  // query heads per key/value head
  // Decoding (attention_with_kvcache): batch row b has its own key count kv_lens[b], seen
  // bottom-right causally; null for attention_fwd / attention_bwd.
  const int32_t* kv_lens = nullptr;

  Problem(const AttentionShape& shape, const AttentionMask& mask, double sc, const void* q_,
          const RowStrides& qs, const void* k_, const RowStrides& ks, const void* v_,
          const RowStrides& vs)
      : sh(shape),
        vis{mask.causal, shape.q_len, shape.kv_len},
        scale(S(sc)),
        alpha2(S(sc * kLog2e)),
        q{static_cast<const T*>(q_), qs},
        k{static_cast<const T*>(k_), ks},
        v{static_cast<const T*>(v_), vs},
        group(shape.kv_heads > 0 ? shape.q_heads / shape.kv_heads : 1) {}

  // Contiguous (B, H, rows, dim) layout of the outputs.
  int64_t out_offset(int64_t b, int64_t h, int64_t i, int64_t heads, int64_t rows,
                     int64_t dim) const {
    return ((b * heads + h) * rows + i) * dim;
  }

  // The keys batch row b's queries see.
  Visible visible(int64_t b) const {
    if (kv_lens == nullptr) return vis;
    return {true, sh.q_len, kv_lens[b], kv_lens[b] - sh.q_len};
  }

  // s[m x n] = alpha2 * Q K^T, masked where the tile straddles the mask boundary. The one
  // score computation that the forward and both backward passes share.
  void score_tile(const Tile<S>& qt, const Tile<S>& kt, int64_t i0, int64_t m, int64_t j0,
                  int64_t n, S* s, int64_t lds, const Visible& vis) const {
    gemm<S>(false, true, m, n, sh.qk_dim, alpha2, qt.data, qt.ld, kt.data, kt.ld, S(0), s, lds);
    if (!vis.whole(i0, i0 + m, j0, j0 + n)) mask_tile(s, lds, i0, m, j0, n, vis);
  }
};

// ------------------------------------------------------------------------------ forward

template <class S>
struct FwdWork {
  S *q, *k, *v;             // packed / converted tiles (used when not read in place)
  S* s;                     // bq x bk scores, then probabilities
  S* acc;                   // bq x Ev output accumulator
  S *row_max, *row_sum, *corr;
};

template <class T>
void fwd_impl(const Problem<T>& pb, T* out, typename Compute<T>::type* lse) {
  using S = typename Compute<T>::type;
  const AttentionShape& sh = pb.sh;
  const int64_t E = sh.qk_dim, Ev = sh.v_dim;
  const Blocks blocks = pb.vis.causal ? kFwdCausalBlocks : kFwdFullBlocks;
  const int64_t bq = std::min(blocks.q, sh.q_len);  // q_len >= 1 here
  const int64_t bk = std::max<int64_t>(1, std::min(blocks.k, sh.kv_len));
  const int64_t n_qb = (sh.q_len + bq - 1) / bq;
  const int64_t bh = sh.batch * sh.q_heads;

  const auto make = [&](Pieces& p) {
    FwdWork<S> w;
    w.q = p.take<S>(bq * E);
    w.k = p.take<S>(bk * E);
    w.v = p.take<S>(bk * Ev);
    w.s = p.take<S>(bq * bk);
    w.acc = p.take<S>(bq * Ev);
    w.row_max = p.take<S>(bq);
    w.row_sum = p.take<S>(bq);
    w.corr = p.take<S>(bq);
    return w;
  };
  // Task t: query block n_qb - 1 - t / bh, so the last causal blocks (the most keys) go
  // first; (batch, head) = t % bh.
  run_tasks(n_qb * bh, make, [&](int64_t t, FwdWork<S>& w) {
    const int64_t qb = n_qb - 1 - t / bh;
    const int64_t b = (t % bh) / sh.q_heads, h = (t % bh) % sh.q_heads, g = h / pb.group;
    const int64_t i0 = qb * bq, m = std::min(bq, sh.q_len - i0);
    const Tile<S> qt = load_tile(pb.q.rows(b, h, i0), pb.q.st.row, m, E, w.q);
    std::fill(w.row_max, w.row_max + m, kNegInf<S>);
    std::fill(w.row_sum, w.row_sum + m, S(0));
    const Visible vis = pb.visible(b);
    const Range keys = vis.keys(i0, i0 + m);
    bool first = true;
    for (int64_t j0 = keys.begin; j0 < keys.end; j0 += bk) {
      const int64_t n = std::min(bk, keys.end - j0);
      const Tile<S> kt = load_tile(pb.k.rows(b, g, j0), pb.k.st.row, n, E, w.k);
      const Tile<S> vt = load_tile(pb.v.rows(b, g, j0), pb.v.st.row, n, Ev, w.v);
      pb.score_tile(qt, kt, i0, m, j0, n, w.s, bk, vis);
      softmax_tile(w.s, bk, m, n, w.row_max, w.row_sum, w.corr);
      if (!first) scale_rows(w.acc, Ev, m, Ev, w.corr);
      gemm<S>(false, false, m, Ev, n, S(1), w.s, bk, vt.data, vt.ld, first ? S(0) : S(1), w.acc,
              Ev);
      first = false;
    }
    if (first) std::fill(w.acc, w.acc + m * Ev, S(0));  // no key seen: out = 0
    // out = acc / row_sum; lse = ln(2) * (row_max + log2(row_sum)), -inf where nothing is seen.
    S* lse_rows = lse == nullptr ? nullptr : lse + (b * sh.q_heads + h) * sh.q_len + i0;
    for (int64_t r = 0; r < m; ++r) {
      const S l = w.row_sum[r];
      if (lse_rows) lse_rows[r] = l > 0 ? S(kLn2) * (w.row_max[r] + std::log2(l)) : kNegInf<S>;
      w.corr[r] = l > 0 ? S(1) / l : S(0);
    }
    convert_rows<S, T>(w.acc, Ev, m, Ev, out + pb.out_offset(b, h, i0, sh.q_heads, sh.q_len, Ev),
                       Ev, w.corr);
  });
}

// ----------------------------------------------------------------------------- backward

// delta[row] = sum_e dO[row, e] * O[row, e] for every (b, h, i), in the compute type.
template <class T>
void delta_impl(const AttentionShape& sh, const Operand<T>& dout, const Operand<T>& out,
                typename Compute<T>::type* delta) {
  using S = typename Compute<T>::type;
  const int64_t rows = sh.batch * sh.q_heads * sh.q_len, Ev = sh.v_dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / Ev);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % sh.q_len, bh = row / sh.q_len;
      const int64_t b = bh / sh.q_heads, h = bh % sh.q_heads;
      const T* d = dout.rows(b, h, i);
      const T* o = out.rows(b, h, i);
      S sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t e = 0; e < Ev; ++e) sum += static_cast<S>(d[e]) * static_cast<S>(o[e]);
      delta[row] = sum;
    }
  });
}

template <class S>
struct BwdWork {
  S *q, *k, *v, *dout;  // packed / converted tiles
  S *s, *dp;            // scores -> P, dP -> dS
  S* acc;               // dQ (pass A) or dK (pass B)
  S* acc_v;             // dV (pass B)
  S* lse2;              // the query block's lse in base 2
};

template <class S>
void load_lse2(const S* lse, int64_t m, S* lse2) {
  for (int64_t r = 0; r < m; ++r) lse2[r] = lse[r] * S(kLog2e);
}

template <class T>
void bwd_impl(const Problem<T>& pb, const Operand<T>& dout, const Operand<T>& out,
              const typename Compute<T>::type* lse, T* dq, T* dk, T* dv) {
  using S = typename Compute<T>::type;
  const AttentionShape& sh = pb.sh;
  const int64_t E = sh.qk_dim, Ev = sh.v_dim, L = sh.q_len, Skv = sh.kv_len;

  // delta, O(B * Hq * L): the only buffer of the backward besides the per-thread scratch.
  std::unique_ptr<S[]> delta_buf(new S[size_t(std::max<int64_t>(1, sh.batch * sh.q_heads * L))]);
  S* const delta = delta_buf.get();
  delta_impl(sh, dout, out, delta);

  const int64_t bq = std::max<int64_t>(1, std::min(kBwdBlocks.q, L));
  const int64_t bk = std::max<int64_t>(1, std::min(kBwdBlocks.k, Skv));
  const auto make = [&](Pieces& p) {
    BwdWork<S> w;
    w.q = p.take<S>(bq * E);
    w.k = p.take<S>(bk * E);
    w.v = p.take<S>(bk * Ev);
    w.dout = p.take<S>(bq * Ev);
    w.s = p.take<S>(bq * bk);
    w.dp = p.take<S>(bq * bk);
    w.acc = p.take<S>(std::max(bq, bk) * E);
    w.acc_v = p.take<S>(bk * Ev);
    w.lse2 = p.take<S>(bq);
    return w;
  };
  const S* const lse_all = lse;
  const auto lse_rows = [&](int64_t b, int64_t h, int64_t i0) {
    return (b * sh.q_heads + h) * L + i0;  // offset into lse and delta
  };

  // Pass A: dQ[block] = scale * sum over key blocks of dS K. Task order as in the forward.
  if (L > 0) {
    const int64_t n_qb = (L + bq - 1) / bq, bh = sh.batch * sh.q_heads;
    run_tasks(n_qb * bh, make, [&](int64_t t, BwdWork<S>& w) {
      const int64_t qb = n_qb - 1 - t / bh;
      const int64_t b = (t % bh) / sh.q_heads, h = (t % bh) % sh.q_heads, g = h / pb.group;
      const int64_t i0 = qb * bq, m = std::min(bq, L - i0);
      const Tile<S> qt = load_tile(pb.q.rows(b, h, i0), pb.q.st.row, m, E, w.q);
      const Tile<S> dot = load_tile(dout.rows(b, h, i0), dout.st.row, m, Ev, w.dout);
      load_lse2(lse_all + lse_rows(b, h, i0), m, w.lse2);
      const S* dl = delta + lse_rows(b, h, i0);
      const Range keys = pb.vis.keys(i0, i0 + m);
      bool first = true;
      for (int64_t j0 = keys.begin; j0 < keys.end; j0 += bk) {
        const int64_t n = std::min(bk, keys.end - j0);
        const Tile<S> kt = load_tile(pb.k.rows(b, g, j0), pb.k.st.row, n, E, w.k);
        const Tile<S> vt = load_tile(pb.v.rows(b, g, j0), pb.v.st.row, n, Ev, w.v);
        pb.score_tile(qt, kt, i0, m, j0, n, w.s, bk, pb.vis);
        probs_tile(w.s, bk, m, n, w.lse2);
        gemm<S>(false, true, m, n, Ev, S(1), dot.data, dot.ld, vt.data, vt.ld, S(0), w.dp, bk);
        dscores_tile(w.dp, w.s, bk, m, n, dl);
        gemm<S>(false, false, m, E, n, pb.scale, w.dp, bk, kt.data, kt.ld, first ? S(0) : S(1),
                w.acc, E);
        first = false;
      }
      if (first) std::fill(w.acc, w.acc + m * E, S(0));
      convert_rows<S, T>(w.acc, E, m, E, dq + pb.out_offset(b, h, i0, sh.q_heads, L, E), E,
                         nullptr);
    });
  }

  // Pass B: dV[block] = sum of P^T dO and dK[block] = scale * sum of dS^T Q, over the group's
  // query heads and the query blocks that see the key block. Task t: key block t / bhk (the
  // first causal key blocks, seen by the most queries, go first), (batch, kv head) = t % bhk.
  if (Skv > 0) {
    const int64_t n_kb = (Skv + bk - 1) / bk, bhk = sh.batch * sh.kv_heads;
    run_tasks(n_kb * bhk, make, [&](int64_t t, BwdWork<S>& w) {
      const int64_t kb = t / bhk;
      const int64_t b = (t % bhk) / sh.kv_heads, g = (t % bhk) % sh.kv_heads;
      const int64_t j0 = kb * bk, n = std::min(bk, Skv - j0);
      const Tile<S> kt = load_tile(pb.k.rows(b, g, j0), pb.k.st.row, n, E, w.k);
      const Tile<S> vt = load_tile(pb.v.rows(b, g, j0), pb.v.st.row, n, Ev, w.v);
      const Range queries = pb.vis.queries(j0, j0 + n);
      bool first = true;
      for (int64_t h = g * pb.group; h < (g + 1) * pb.group; ++h) {
        for (int64_t i0 = queries.begin; i0 < queries.end; i0 += bq) {
          const int64_t m = std::min(bq, queries.end - i0);
          const Tile<S> qt = load_tile(pb.q.rows(b, h, i0), pb.q.st.row, m, E, w.q);
          const Tile<S> dot = load_tile(dout.rows(b, h, i0), dout.st.row, m, Ev, w.dout);
          load_lse2(lse_all + lse_rows(b, h, i0), m, w.lse2);
          const S* dl = delta + lse_rows(b, h, i0);
          const S beta = first ? S(0) : S(1);
          pb.score_tile(qt, kt, i0, m, j0, n, w.s, bk, pb.vis);
          probs_tile(w.s, bk, m, n, w.lse2);
          gemm<S>(true, false, n, Ev, m, S(1), w.s, bk, dot.data, dot.ld, beta, w.acc_v, Ev);
          gemm<S>(false, true, m, n, Ev, S(1), dot.data, dot.ld, vt.data, vt.ld, S(0), w.dp, bk);
          dscores_tile(w.dp, w.s, bk, m, n, dl);
          gemm<S>(true, false, n, E, m, pb.scale, w.dp, bk, qt.data, qt.ld, beta, w.acc, E);
          first = false;
        }
      }
      if (first) {  // no query sees these keys
        std::fill(w.acc, w.acc + n * E, S(0));
        std::fill(w.acc_v, w.acc_v + n * Ev, S(0));
      }
      convert_rows<S, T>(w.acc, E, n, E, dk + pb.out_offset(b, g, j0, sh.kv_heads, Skv, E), E,
                         nullptr);
      convert_rows<S, T>(w.acc_v, Ev, n, Ev, dv + pb.out_offset(b, g, j0, sh.kv_heads, Skv, Ev),
                         Ev, nullptr);
    });
  }
}

}  // namespace

void attention_fwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                   double scale,
                   const void* q, const RowStrides& q_strides,
                   const void* k, const RowStrides& k_strides,
                   const void* v, const RowStrides& v_strides,
                   void* out, void* lse) {
  if (shape.batch == 0 || shape.q_heads == 0 || shape.q_len == 0) return;
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    using S = typename Compute<T>::type;
    const Problem<T> pb(shape, mask, scale, q, q_strides, k, k_strides, v, v_strides);
    fwd_impl<T>(pb, static_cast<T*>(out), static_cast<S*>(lse));
  });
}

void attention_with_kvcache(DType dtype, const AttentionShape& shape, double scale,
                            const void* q, const RowStrides& q_strides,
                            const void* k_cache, const RowStrides& k_strides,
                            const void* v_cache, const RowStrides& v_strides,
                            const int32_t* kv_lens, void* out) {
  if (shape.batch == 0 || shape.q_heads == 0 || shape.q_len == 0) return;
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    using S = typename Compute<T>::type;
    Problem<T> pb(shape, AttentionMask{true}, scale, q, q_strides, k_cache, k_strides, v_cache,
                  v_strides);
    pb.kv_lens = kv_lens;
    fwd_impl<T>(pb, static_cast<T*>(out), nullptr);
  });
}

void attention_bwd(DType dtype, const AttentionShape& shape, const AttentionMask& mask,
                   double scale,
                   const void* dout, const RowStrides& dout_strides,
                   const void* q, const RowStrides& q_strides,
                   const void* k, const RowStrides& k_strides,
                   const void* v, const RowStrides& v_strides,
                   const void* out, const RowStrides& out_strides,
                   const void* lse,
                   void* dq, void* dk, void* dv) {
  if (shape.batch == 0 || shape.kv_heads == 0) return;
  with_element_type(dtype, [&](auto zero) {
    using T = decltype(zero);
    using S = typename Compute<T>::type;
    const Problem<T> pb(shape, mask, scale, q, q_strides, k, k_strides, v, v_strides);
    bwd_impl<T>(pb, Operand<T>{static_cast<const T*>(dout), dout_strides},
                Operand<T>{static_cast<const T*>(out), out_strides}, static_cast<const S*>(lse),
                static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv));
  });
}

}  // namespace cpu
}  // namespace fastgpt
