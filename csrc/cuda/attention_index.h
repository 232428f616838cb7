// Index arithmetic of the FlashAttention-2 kernels (attention.cu): swizzled shared-memory
// tiles, the lane <-> element maps of mma.sync m16n8k16 and ldmatrix, causal block bounds and
// the order in which CTAs take their tiles. Plain C++ behind FASTGPT_HOST_DEVICE, so the CPU
// test suite checks every helper against brute force (tests/cpp/attention_index_test.cpp).
#pragma once
#include <cstdint>

#include "common.h"

namespace fastgpt {
namespace cuda {

// ------------------------------------------------------------------ shared-memory tiles
//
// A tile holds `rows` rows of 16-bit elements, each row `chunks` 16-byte chunks (8 elements)
// wide, chunks a multiple of 8 (the padded head dims 64, 128, 256 give 8, 16, 32). Unswizzled,
// every row starts at a multiple of 128 bytes, so the 8 rows that one ldmatrix phase reads at
// the same column would all hit the same 4 banks (an 8-way conflict). Chunk c of row r is
// stored at chunk c ^ (r % 8) instead: within each aligned group of 8 chunks (128 bytes, all
// 32 banks) the 8 rows of a phase land on 8 different 16-byte bank groups.

// Element offset of chunk `chunk` of row `row` in a tile `chunks` chunks wide.
FASTGPT_HOST_DEVICE int tile_offset(int row, int chunk, int chunks) {
  return (row * chunks + (chunk ^ (row & 7))) * 8;
}

// Element offset of element (row, col); col's 8 neighbours of one chunk stay contiguous.
FASTGPT_HOST_DEVICE int tile_elem_offset(int row, int col, int chunks) {
  return tile_offset(row, col >> 3, chunks) + (col & 7);
}

// ---------------------------------------------------------------- fragments
//
// mma.sync.aligned.m16n8k16.row.col with 16-bit operands and fp32 accumulators: per lane,
// A (16 x 16) is 4 registers of 2 elements, B (16 x 8, k x n) 2 registers of 2, C/D (16 x 8)
// 4 floats. `group` = lane / 4 (the row, or B's column), `quad` = lane % 4.

struct RowCol {
  int row, col;
};

// A: element e (0, 1: low, high half) of register r (0..3) of `lane`.
FASTGPT_HOST_DEVICE RowCol mma_a_coord(int lane, int r, int e) {
  return {(lane >> 2) + (r & 1) * 8, (lane & 3) * 2 + e + (r >> 1) * 8};
}

// B: element e of register r (0, 1) of `lane`, as (k, n).
FASTGPT_HOST_DEVICE RowCol mma_b_coord(int lane, int r, int e) {
  return {(lane & 3) * 2 + e + r * 8, lane >> 2};
}

// C/D: float i (0..3) of `lane`.
FASTGPT_HOST_DEVICE RowCol mma_c_coord(int lane, int i) {
  return {(lane >> 2) + (i >> 1) * 8, (lane & 3) * 2 + (i & 1)};
}

// The FA2 register trick: a 16 x 16k score tile held as C fragments (n-blocks of 8 columns)
// is the A operand of the next product without a trip through shared memory. A register r of
// k-step kk packs floats (2j, 2j + 1), j = c_to_a_pair(r), of C n-block 2 kk + c_to_a_nblock(r).
FASTGPT_HOST_DEVICE int c_to_a_nblock(int r) { return r >> 1; }
FASTGPT_HOST_DEVICE int c_to_a_pair(int r) { return r & 1; }

// ldmatrix.x4 loads four 8 x 8 matrices; lanes 8m..8m+7 give the row addresses of matrix m,
// and register m of every lane receives matrix m. The two address patterns below, offsets
// (row, col) into a 16 x 16 block of a row-major tile:
//
// ldsm_a_lane: matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
//   Without .trans: the A fragment of the block (a0..a3).
//   With .trans, on a tile stored [k][n] (V in P V, dO and Q in the backward): the B
//   fragments of the two 8-column n-blocks, registers (b0, b1) of n-block 0, then n-block 1.
FASTGPT_HOST_DEVICE RowCol ldsm_a_lane(int lane) { return {lane & 15, (lane >> 4) * 8}; }

// ldsm_b_lane: matrices (rows 0-7, cols 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
//   Without .trans, on a tile stored [n][k] (K in Q K^T): B fragments (b0, b1) of n-block 0
//   (tile rows 0-7), then of n-block 1 (rows 8-15).
FASTGPT_HOST_DEVICE RowCol ldsm_b_lane(int lane) {
  return {(lane & 7) + ((lane >> 4) << 3), ((lane >> 3) & 1) * 8};
}

// --------------------------------------------------------------- blocks and masks

FASTGPT_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

FASTGPT_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FASTGPT_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Whether query i sees key j (torch's top-left causal alignment: j <= i; keys j >= S are
// padding of a tail block).
FASTGPT_HOST_DEVICE bool visible(int64_t i, int64_t j, int64_t S, bool causal) {
  return j < S && (!causal || j <= i);
}

// Key blocks of `bn` keys that the valid queries [m0, m0 + rows) see: blocks [0, end), of
// which [0, unmasked) are seen whole by every one of them; blocks [unmasked, end) need the
// element mask (causal diagonal, the S tail). Causal blocks no query sees are past `end`.
struct KeyBlocks {
  int64_t end, unmasked;
};
FASTGPT_HOST_DEVICE KeyBlocks key_blocks(int64_t m0, int64_t rows, int64_t bn, int64_t S,
                                         bool causal) {
  const int64_t hi = causal ? min64(S, m0 + rows) : S;  // last query m0 + rows - 1 sees < hi
  const int64_t end = ceil_div(max64(hi, 0), bn);
  int64_t whole = S / bn;                           // blocks without keys past S
  if (causal) whole = min64(whole, (m0 + 1) / bn);  // last key <= m0, the first query
  return {end, min64(whole, end)};
}

// Query blocks of `bm` queries (out of L) that see any of the valid keys [n0, n0 + keys):
// blocks [begin, end), of which [begin, masked_end) hold a query that sees only part of them
// (causal only).
struct QueryBlocks {
  int64_t begin, masked_end, end;
};
FASTGPT_HOST_DEVICE QueryBlocks query_blocks(int64_t n0, int64_t keys, int64_t bm, int64_t L,
                                             bool causal) {
  const int64_t end = ceil_div(L, bm);
  if (!causal) return {0, 0, end};
  const int64_t begin = n0 < L ? n0 / bm : end;         // query i sees key n0 iff i >= n0
  const int64_t masked = ceil_div(n0 + keys - 1, bm);  // blocks starting before the last key
  return {begin, max64(begin, min64(masked, end)), end};
}

// CTA blockIdx.x = t of a 1-D grid over `blocks` tiles of each of `slices` (batch, head)
// slices. Consecutive CTAs take the same tile of consecutive slices, and tiles go in order
// `descending` (the last query block first: with a causal mask it sees the most keys) or
// ascending (the first key block first: it is seen by the most queries), so the most expensive
// CTAs start first and the cheap ones fill the tail.
struct BlockTask {
  int64_t block, slice;
};
FASTGPT_HOST_DEVICE BlockTask block_task(int64_t t, int64_t slices, int64_t blocks,
                                         bool descending) {
  const int64_t step = t / slices;
  return {descending ? blocks - 1 - step : step, t % slices};
}

// Lanes of a warp that share one row of `chunks` 16-byte chunks (1 <= chunks <= 32) in the
// backward pre-pass: the smallest power of 2 >= chunks, so each lane loads at most one chunk,
// the row's lanes are an aligned group (xor shuffles below the group size stay inside it) and
// a warp holds 32 / lanes rows.
FASTGPT_HOST_DEVICE int lanes_per_row(int chunks) {
  int lanes = 1;
  while (lanes < chunks) lanes *= 2;
  return lanes;
}

// Head dim the kernels are compiled for: E and Ev (multiples of 8, up to 256) padded up to
// one of 64, 128, 256 (0 for a dim outside that range).
FASTGPT_HOST_DEVICE int padded_head_dim(int64_t dim) {
  return dim < 1 ? 0 : dim <= 64 ? 64 : dim <= 128 ? 128 : dim <= 256 ? 256 : 0;
}

}  // namespace cuda
}  // namespace fastgpt
