// Index arithmetic of the tensor-core GEMM (linear.cu): swizzled shared-memory tiles for both
// operand layouts, the ldmatrix lane addresses, the lane <-> element maps of mma.sync m16n8k16,
// the grouped CTA order, the B column map of gated tiles, the staging of the fp32 accumulators
// for the epilogue and the tail bounds of cp.async. Plain C++ behind FASTGPT_HOST_DEVICE, so
// the CPU test suite checks every helper against brute force and the PTX ISA's fragment tables
// (tests/cpp/linear_index_test.cpp).
#pragma once
#include <cstdint>

#include "common.h"

namespace fastgpt {
namespace cuda {

// ------------------------------------------------------------------ shared-memory tiles
//
// A stage of one operand is a tile of 16-bit elements, `rows` rows of `chunks` 16-byte chunks
// (8 elements). A K-major operand (A K-contiguous, B K-contiguous) is stored as MN rows of K
// chunks (BK = 32: 4 chunks, 64-byte rows); an MN-major one (A M-contiguous, B N-contiguous) as
// K rows of MN chunks (BM or BN = 64, 128: 8 or 16 chunks). ldmatrix reads, per phase, one
// 16-byte chunk from each of 8 consecutive rows (a multiple of 8 apart from the tile start), all
// at the same logical chunk. Unswizzled those 8 chunks would sit 64 or 128+ bytes apart, i.e. on
// 2 or 1 of the 8 16-byte bank groups (a 4- or 8-way conflict). Each row's chunks are XORed
// with a function of the row so that the 8 rows land on 8 different bank groups:
//   chunks >= 8 (a multiple of 8): chunk ^ (row % 8), within each aligned group of 8 chunks;
//   chunks == 4: chunk ^ ((row / 2) % 4): rows 2i and 2i + 1 share a 128-byte line (bank groups
//                 0-3 and 4-7), and the 4 line pairs of a phase take 4 different XORs;
//   chunks == 2: chunk ^ ((row / 4) % 2), the same idea with 4 rows to a line.
// The same map makes the 16-byte cp.async stores conflict-free too (8 consecutive threads write
// 8 consecutive chunks of a row or of two rows).

// A (row, chunk) position in a tile.
struct GemmLaneAddr {
  int row, chunk;
};

FASTGPT_HOST_DEVICE int gemm_swizzle_chunk(int row, int chunk, int chunks) {
  return chunks >= 8 ? chunk ^ (row & 7) : chunk ^ ((row / (8 / chunks)) & (chunks - 1));
}

// Element offset of chunk `chunk` of row `row` in a tile `chunks` chunks wide.
FASTGPT_HOST_DEVICE int gemm_smem_offset(int row, int chunk, int chunks) {
  return (row * chunks + gemm_swizzle_chunk(row, chunk, chunks)) * 8;
}

// Stage copies: with `threads` threads copying a tile `chunks` chunks wide (threads a multiple
// of chunks), thread tid copies chunk tid % chunks of rows tid / chunks + i * (threads / chunks),
// i = 0, 1, ...: 8 consecutive threads write 8 chunks of one row (or 4 of each of two rows when
// chunks == 4), and when threads / chunks is a multiple of 8 the swizzle of load i is that of
// load 0, so load i lands i * threads * 8 elements after load 0.
FASTGPT_HOST_DEVICE GemmLaneAddr gemm_copy_chunk(int tid, int i, int threads, int chunks) {
  return {tid / chunks + i * (threads / chunks), tid % chunks};
}

// ---------------------------------------------------------------- ldmatrix lane addresses
//
// ldmatrix .x4 loads four 8 x 8 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i
// and matrix i lands in register i of every lane. In the non-transposed form lane t receives
// (row t / 4, columns 2 (t % 4), +1) of each matrix; with .trans it receives (rows 2 (t % 4), +1,
// column t / 4), i.e. the same elements of the transposed matrix.
// A (16 x 16, m x k): registers a0..a3 of mma are the blocks (m 0-7, k 0-7), (m 8-15, k 0-7),
// (m 0-7, k 8-15), (m 8-15, k 8-15): matrix i covers m block i % 2, k block i / 2.
// B (16 x 16, k x n, two n8 fragments): b0, b1 of n block 0, then of n block 1: matrix i covers
// k block i % 2, n block i / 2.
// K-major storage (rows are m or n) is read without .trans; MN-major storage (rows are k) with
// .trans. The lane's row address is returned relative to the fragment's first row and chunk:
// K-major: row mn0 + .row, chunk k0 / 8 + .chunk; MN-major: row k0 + .row, chunk mn0 / 8 + .chunk.
FASTGPT_HOST_DEVICE GemmLaneAddr gemm_ldmatrix_lane(int lane, bool operand_b, bool k_major) {
  const int i = lane >> 3, j = lane & 7;
  const int mn_block = operand_b ? i >> 1 : i & 1;
  const int k_block = operand_b ? i & 1 : i >> 1;
  return k_major ? GemmLaneAddr{mn_block * 8 + j, k_block}
                 : GemmLaneAddr{k_block * 8 + j, mn_block};
}

// Element offset, in a tile `chunks` chunks wide, of this lane's ldmatrix row address for the
// 16 x 16 fragment whose first m or n is mn0 (a multiple of 16) at k16 step kk of the stage.
FASTGPT_HOST_DEVICE int gemm_ldmatrix_offset(int lane, bool operand_b, bool k_major, int mn0,
                                             int kk, int chunks) {
  const GemmLaneAddr l = gemm_ldmatrix_lane(lane, operand_b, k_major);
  return k_major ? gemm_smem_offset(mn0 + l.row, kk * 2 + l.chunk, chunks)
                 : gemm_smem_offset(kk * 16 + l.row, mn0 / 8 + l.chunk, chunks);
}

// ---------------------------------------------------------------- mma fragments
//
// mma.sync.aligned.m16n8k16.row.col with 16-bit operands and fp32 accumulators: per lane, A
// (16 x 16) is 4 registers of 2 elements, B (16 x 8, k x n) 2 registers of 2, C/D (16 x 8) 4
// floats. `group` = lane / 4, `quad` = lane % 4.

struct GemmRowCol {
  int row, col;
};

// A: element e (0: low half, 1: high half) of register r (0..3) of `lane`, as (m, k).
FASTGPT_HOST_DEVICE GemmRowCol gemm_mma_a_coord(int lane, int r, int e) {
  return {(lane >> 2) + (r & 1) * 8, (lane & 3) * 2 + e + (r >> 1) * 8};
}

// B: element e of register r (0, 1) of `lane`, as (k, n).
FASTGPT_HOST_DEVICE GemmRowCol gemm_mma_b_coord(int lane, int r, int e) {
  return {(lane & 3) * 2 + e + r * 8, lane >> 2};
}

// C/D: float i (0..3) of `lane`, as (m, n).
FASTGPT_HOST_DEVICE GemmRowCol gemm_mma_c_coord(int lane, int i) {
  return {(lane >> 2) + (i >> 1) * 8, (lane & 3) * 2 + (i & 1)};
}

// ---------------------------------------------------------------- gated tiles
//
// A CTA's B stage holds bn columns. Plain: B columns n0 + [0, bn), n0 = tile_n * bn. Gated: the
// first bn / 2 are gate columns n0 + [0, bn / 2) of B, the last bn / 2 the matching up columns
// N + n0 + [0, bn / 2), with n0 = tile_n * bn / 2; the main loop does not know the difference,
// and the epilogue finds the gate of tile column c at c and its up value at c + bn / 2, so a
// gated CTA writes bn / 2 output columns with the registers and shared memory of a plain one.

// Column of B, relative to n0 and before the up half's + N, of stage column c.
FASTGPT_HOST_DEVICE int gemm_tile_b_col(int c, int bn, bool gated) {
  return gated && c >= bn / 2 ? c - bn / 2 : c;
}
// Whether stage column c is in the up half (read N columns further on).
FASTGPT_HOST_DEVICE bool gemm_tile_b_up(int c, int bn, bool gated) { return gated && c >= bn / 2; }

// ---------------------------------------------------------------- tails
//
// Bytes of the 8-element chunk that starts at index `start` of a dimension of `extent` that lie
// inside it (0 .. 16); cp.async copies that many and zero-fills the rest of the 16 bytes.
FASTGPT_HOST_DEVICE int gemm_chunk_bytes(int64_t extent, int64_t start) {
  const int64_t left = extent - start;
  return left <= 0 ? 0 : left >= 8 ? 16 : static_cast<int>(left) * 2;
}

// ---------------------------------------------------------------- stage copy sources
//
// What the chunk at stage position (row, chunk) of an operand tile copies. The tile's first
// logical m or n is mn0 (gated B: the tile's first output column), tile_mn its size (BM or BN),
// extent M or N. K-major tiles are rows of mn, chunks of k; MN-major tiles rows of k, chunks of
// mn. `mn` is the operand's mn index of the chunk's first element (+ extent in the up half of a
// gated B), `k` its k relative to the k-tile's first, `mn_bytes` the bytes of the chunk inside
// extent along mn (K-major: 16 or 0, one mn per chunk; MN-major: gemm_chunk_bytes).
struct GemmCopySrc {
  int64_t mn;
  int k;
  int mn_bytes;
};

FASTGPT_HOST_DEVICE GemmCopySrc gemm_copy_src(bool k_major, int row, int chunk, int tile_mn,
                                              int mn0, int extent, bool gated) {
  const int in_tile = k_major ? row : chunk * 8;
  const int mn = mn0 + gemm_tile_b_col(in_tile, tile_mn, gated);
  const int64_t global = int64_t(mn) + (gemm_tile_b_up(in_tile, tile_mn, gated) ? extent : 0);
  const int mn_bytes = k_major ? (mn < extent ? 16 : 0) : gemm_chunk_bytes(extent, mn);
  return {global, k_major ? chunk * 8 : row, mn_bytes};
}

// Bytes that chunk copies at the k-tile starting at k0 (the rest of its 16 are zero-filled).
FASTGPT_HOST_DEVICE int gemm_copy_bytes(bool k_major, const GemmCopySrc& s, int k0, int K) {
  if (s.mn_bytes == 0) return 0;
  return k_major ? gemm_chunk_bytes(K, int64_t(k0) + s.k) : (k0 + s.k < K ? s.mn_bytes : 0);
}

// ---------------------------------------------------------------- accumulator staging
//
// The epilogue stages the fp32 accumulators in shared memory (over the drained pipeline stages)
// so that it runs as a rolled loop over 8-column chunks (one copy of the activation code, and
// 16-byte global accesses) instead of once per accumulator register. Rows are bn + 8 floats
// apart: a lane writes float2 (row g, column 2q) of a fragment, and a 64-bit store is served per
// half warp (4 rows x 8 floats); with a row stride of 8 banks mod 32 those 4 rows take the 4
// different 8-bank quarters (conflict-free), where a stride of bn (a multiple of 32) would put
// all 4 on the same 8 banks.
FASTGPT_HOST_DEVICE int gemm_cstage_stride(int bn) { return bn + 8; }
FASTGPT_HOST_DEVICE int gemm_cstage_offset(int row, int col, int bn) {
  return row * gemm_cstage_stride(bn) + col;
}

// The epilogue reads its 8-float chunk (chunk index `idx` of the CTA's walk, consecutive in a
// warp) as two float4, which quarter warps serve: 8 chunks 8 floats apart span 64 banks, so
// threads 4..7 of a quarter read their second half first (this returns the half read at step
// h), and the 8 float4 of each step take 8 different 4-bank groups. This holds for a quarter
// warp on one row, and on two rows bn + 8 floats apart (gated small tile: 4 chunks per row).
FASTGPT_HOST_DEVICE int gemm_cstage_read_half(int idx, int h) { return h ^ ((idx >> 2) & 1); }

// ---------------------------------------------------------------- CTA order
//
// Tile index t (blockIdx.x) -> (tile_m, tile_n), grouped: `group` consecutive tile rows are
// walked column by column, so the CTAs resident at one time share a few A row panels and B
// column panels in L2 instead of streaming all of B once per tile row (Triton's GROUP_M order).
// The last group may have fewer rows. A permutation of all tiles_m * tiles_n tiles.
struct GemmTile {
  int m, n;
};

FASTGPT_HOST_DEVICE GemmTile gemm_grouped_tile(int t, int tiles_m, int tiles_n, int group) {
  const int per_group = group * tiles_n;
  const int first_m = (t / per_group) * group;
  const int rows = tiles_m - first_m < group ? tiles_m - first_m : group;
  const int in_group = t % per_group;
  return {first_m + in_group % rows, in_group / rows};
}

}  // namespace cuda
}  // namespace fastgpt
