// Brute-force checks of csrc/cuda/attention_index.h, the tile arithmetic of attention.cu.
// The fragment maps are checked against the layouts of the PTX ISA (mma.sync m16n8k16 with
// .f16/.bf16 operands, ldmatrix .x4 with and without .trans) written out as the ISA states
// them, the block bounds against element-by-element definitions of the mask.
// Prints "checked <n> cases" and returns 0, or names the first failing case and returns 1.
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "cuda/attention_index.h"

using namespace fastgpt::cuda;

namespace {

long long g_cases = 0;

bool expect(bool ok, const std::string& what) {
  ++g_cases;
  if (!ok) std::printf("FAILED: %s\n", what.c_str());
  return ok;
}

std::string str(const char* fmt, long long a = 0, long long b = 0, long long c = 0,
                long long d = 0, long long e = 0, long long f = 0) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), fmt, a, b, c, d, e, f);
  return buf;
}

// ------------------------------------------------------------- PTX ISA layouts
// "Matrix fragments for mma.m16n8k16 with floating point type": groupID = laneid >> 2,
// threadID_in_group = laneid % 4; elements a0..a7, b0..b3, c0..c3 in register order (two
// 16-bit elements per 32-bit register, the lower index in the lower half).

RowCol isa_a(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  const int col = i < 4 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
  return {row, col};
}
RowCol isa_b(int lane, int i) {  // (row = k, col = n)
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8, g};
}
RowCol isa_c(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

// ldmatrix .x4: lanes 8m..8m+7 address rows 0..7 of matrix m; without .trans lane l receives,
// in register m, elements (l % 4) * 2 + e of row l / 4 of matrix m; with .trans, element
// (row (l % 4) * 2 + e, column l / 4). Returns the tile position register m, element e of
// `lane` receives, given where each lane's address points.
template <class Addr>
RowCol ldmatrix_elem(Addr addr, bool trans, int lane, int m, int e) {
  if (!trans) {
    const RowCol base = addr(8 * m + lane / 4);
    return {base.row, base.col + (lane % 4) * 2 + e};
  }
  const RowCol base = addr(8 * m + (lane % 4) * 2 + e);
  return {base.row, base.col + lane / 4};
}

bool same(RowCol a, RowCol b) { return a.row == b.row && a.col == b.col; }

// ------------------------------------------------------------- checks

bool check_swizzle() {
  for (int chunks : {8, 16, 32}) {
    for (int rows : {16, 32, 64, 128}) {
      std::vector<int> seen(size_t(rows) * chunks, 0);
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < chunks; ++c) {
          const int off = tile_offset(r, c, chunks);
          const bool in_row = off % 8 == 0 && off / 8 >= r * chunks && off / 8 < (r + 1) * chunks;
          if (!expect(in_row, str("tile_offset(%lld, %lld, %lld) = %lld leaves row", r, c, chunks,
                                  off)))
            return false;
          ++seen[size_t(off / 8)];
          for (int x = 0; x < 8; ++x) {
            if (!expect(tile_elem_offset(r, c * 8 + x, chunks) == off + x,
                        str("tile_elem_offset(%lld, %lld, %lld)", r, c * 8 + x, chunks)))
              return false;
          }
        }
      }
      for (size_t s = 0; s < seen.size(); ++s) {
        if (!expect(seen[s] == 1, str("tile_offset not a bijection: chunks %lld rows %lld "
                                      "slot %lld", chunks, rows, (long long)s)))
          return false;
      }
      // Every ldmatrix phase (8 lanes, 8 row addresses of 16 bytes) over every 16 x 16 block,
      // with both address patterns: 8 distinct 16-byte bank groups (bytes / 16 mod 8).
      for (int pattern = 0; pattern < 2; ++pattern) {
        for (int r0 = 0; r0 < rows; r0 += 16) {
          for (int c0 = 0; c0 < chunks * 8; c0 += 16) {
            for (int phase = 0; phase < 4; ++phase) {
              std::set<int> groups;
              for (int l = 8 * phase; l < 8 * phase + 8; ++l) {
                const RowCol rc = pattern == 0 ? ldsm_a_lane(l) : ldsm_b_lane(l);
                const int bytes = 2 * tile_elem_offset(r0 + rc.row, c0 + rc.col, chunks);
                groups.insert((bytes / 16) % 8);
              }
              if (!expect(groups.size() == 8,
                          str("ldmatrix bank conflict: pattern %lld chunks %lld block (%lld, %lld) "
                              "phase %lld",
                              pattern, chunks, r0, c0, phase)))
                return false;
            }
          }
        }
      }
    }
  }
  return true;
}

bool check_fragments() {
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      for (int e = 0; e < 2; ++e) {
        if (!expect(same(mma_a_coord(lane, r, e), isa_a(lane, 2 * r + e)),
                    str("mma_a_coord(%lld, %lld, %lld)", lane, r, e)))
          return false;
      }
    }
    for (int r = 0; r < 2; ++r) {
      for (int e = 0; e < 2; ++e) {
        if (!expect(same(mma_b_coord(lane, r, e), isa_b(lane, 2 * r + e)),
                    str("mma_b_coord(%lld, %lld, %lld)", lane, r, e)))
          return false;
      }
    }
    for (int i = 0; i < 4; ++i) {
      if (!expect(same(mma_c_coord(lane, i), isa_c(lane, i)),
                  str("mma_c_coord(%lld, %lld)", lane, i)))
        return false;
    }
    // P = C fragments of n-blocks 2kk, 2kk + 1 reused as the A fragment of k-step kk.
    for (int r = 0; r < 4; ++r) {
      for (int e = 0; e < 2; ++e) {
        const RowCol c = isa_c(lane, 2 * c_to_a_pair(r) + e);
        const RowCol from = {c.row, 8 * c_to_a_nblock(r) + c.col};
        if (!expect(same(from, isa_a(lane, 2 * r + e)),
                    str("C -> A reuse: lane %lld reg %lld elem %lld", lane, r, e)))
          return false;
      }
    }
  }
  // ldmatrix with the helpers' lane addresses delivers the fragments the kernels expect.
  const auto a_addr = [](int l) { return ldsm_a_lane(l); };
  const auto b_addr = [](int l) { return ldsm_b_lane(l); };
  for (int lane = 0; lane < 32; ++lane) {
    for (int m = 0; m < 4; ++m) {
      for (int e = 0; e < 2; ++e) {
        // A operand from a row-major [row][k] tile (Q, dO, K and V as A in the backward).
        if (!expect(same(ldmatrix_elem(a_addr, false, lane, m, e), isa_a(lane, 2 * m + e)),
                    str("ldmatrix A: lane %lld reg %lld elem %lld", lane, m, e)))
          return false;
        // B of n-block m / 2 from a [n][k] tile (K in Q K^T): tile (row n, col k).
        const RowCol b = isa_b(lane, 2 * (m % 2) + e);
        const RowCol nk = {8 * (m / 2) + b.col, b.row};
        if (!expect(same(ldmatrix_elem(b_addr, false, lane, m, e), nk),
                    str("ldmatrix B [n][k]: lane %lld reg %lld elem %lld", lane, m, e)))
          return false;
        // B of n-block m / 2 from a [k][n] tile with .trans (V in P V): tile (row k, col n).
        const RowCol kn = {b.row, 8 * (m / 2) + b.col};
        if (!expect(same(ldmatrix_elem(a_addr, true, lane, m, e), kn),
                    str("ldmatrix B [k][n] .trans: lane %lld reg %lld elem %lld", lane, m, e)))
          return false;
      }
    }
  }
  return true;
}

bool check_blocks() {
  const std::vector<int64_t> lens = {0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 47,
                                     63, 64, 65, 100, 127, 128, 129, 200, 255, 257};
  const std::vector<int64_t> sizes = {16, 32, 64, 128};
  for (int causal = 0; causal < 2; ++causal) {
    for (int64_t L : lens) {
      for (int64_t S : lens) {
        for (int64_t bm : sizes) {
          for (int64_t bn : sizes) {
            // Forward / dq: key blocks of each query block.
            for (int64_t m0 = 0; m0 < L; m0 += bm) {
              const int64_t rows = min64(bm, L - m0);
              const KeyBlocks kb = key_blocks(m0, rows, bn, S, causal);
              for (int64_t blk = 0; blk * bn < S + 2 * bn; ++blk) {
                bool any = false, all = true;
                for (int64_t i = m0; i < m0 + rows; ++i) {
                  for (int64_t j = blk * bn; j < blk * bn + bn; ++j) {
                    const bool v = j < S && (!causal || j <= i);
                    any |= v;
                    all &= v;
                  }
                }
                const bool ok = any == (blk < kb.end) && (blk < kb.end ? all == (blk < kb.unmasked)
                                                                      : true);
                if (!expect(ok && kb.unmasked <= kb.end,
                            str("key_blocks L %lld S %lld bm %lld bn %lld m0 %lld causal %lld",
                                L, S, bm, bn, m0, causal)))
                  return false;
              }
            }
            // dK/dV: query blocks that see each key block.
            for (int64_t n0 = 0; n0 < S; n0 += bn) {
              const int64_t keys = min64(bn, S - n0);
              const QueryBlocks qb = query_blocks(n0, keys, bm, L, causal);
              for (int64_t blk = 0; blk * bm < L; ++blk) {
                bool any = false, all = true;
                for (int64_t i = blk * bm; i < min64(blk * bm + bm, L); ++i) {
                  for (int64_t j = n0; j < n0 + keys; ++j) {
                    const bool v = visible(i, j, S, causal);
                    if (v != (!causal || j <= i)) return expect(false, "visible()");
                    any |= v;
                    all &= v;
                  }
                }
                const bool in = blk >= qb.begin && blk < qb.end;
                const bool ok = any == in && (!in || all == (blk >= qb.masked_end)) &&
                                qb.begin <= qb.masked_end && qb.masked_end <= qb.end;
                if (!expect(ok, str("query_blocks L %lld S %lld bm %lld bn %lld n0 %lld "
                                    "causal %lld", L, S, bm, bn, n0, causal)))
                  return false;
              }
            }
          }
        }
      }
    }
  }
  // key_blocks at any first query (not only multiples of a block), any row count.
  for (int causal = 0; causal < 2; ++causal) {
    for (int64_t S : {0, 1, 15, 16, 17, 40, 64, 65}) {
      for (int64_t bn : {16, 32}) {
        for (int64_t m0 = 0; m0 < 70; ++m0) {
          for (int64_t rows : {1, 3, 16, 33}) {
            const KeyBlocks kb = key_blocks(m0, rows, bn, S, causal);
            for (int64_t blk = 0; blk * bn < S + 2 * bn; ++blk) {
              bool any = false, all = true;
              for (int64_t i = m0; i < m0 + rows; ++i) {
                for (int64_t j = blk * bn; j < blk * bn + bn; ++j) {
                  const bool v = j < S && (!causal || j <= i);
                  any |= v;
                  all &= v;
                }
              }
              const bool ok = any == (blk < kb.end) && (blk >= kb.end || all == (blk < kb.unmasked));
              if (!expect(ok, str("key_blocks S %lld bn %lld m0 %lld rows %lld causal %lld", S, bn,
                                  m0, rows, causal)))
                return false;
            }
          }
        }
      }
    }
  }
  // CTA order: a bijection onto (block, slice), blocks monotone in the CTA index.
  for (int64_t slices : {1, 2, 3, 7, 48}) {
    for (int64_t blocks : {1, 2, 5, 16}) {
      for (int desc = 0; desc < 2; ++desc) {
        std::vector<int> hit(size_t(slices * blocks), 0);
        int64_t prev = desc ? blocks : -1;
        for (int64_t t = 0; t < slices * blocks; ++t) {
          const BlockTask bt = block_task(t, slices, blocks, desc);
          const bool range =
              bt.block >= 0 && bt.block < blocks && bt.slice >= 0 && bt.slice < slices;
          const bool order = desc ? bt.block <= prev : bt.block >= prev;
          if (!expect(range && order, str("block_task t %lld slices %lld blocks %lld desc %lld", t,
                                          slices, blocks, desc)))
            return false;
          prev = bt.block;
          ++hit[size_t(bt.block * slices + bt.slice)];
        }
        for (int h : hit) {
          if (!expect(h == 1, str("block_task not a bijection: slices %lld blocks %lld", slices,
                                  blocks)))
            return false;
        }
      }
    }
  }
  for (int chunks = 1; chunks <= 32; ++chunks) {
    const int lanes = lanes_per_row(chunks);
    const bool pow2 = lanes > 0 && (lanes & (lanes - 1)) == 0;
    if (!expect(pow2 && lanes >= chunks && lanes < 2 * chunks && 32 % lanes == 0,
                str("lanes_per_row(%lld) = %lld", chunks, lanes)))
      return false;
  }
  for (int64_t d = 8; d <= 256; d += 8) {
    const int p = padded_head_dim(d);
    const bool ok = (p == 64 || p == 128 || p == 256) && p >= d && (p == 64 || p / 2 < d);
    if (!expect(ok, str("padded_head_dim(%lld) = %lld", d, p))) return false;
  }
  return expect(padded_head_dim(0) == 0 && padded_head_dim(264) == 0,
                "padded_head_dim out of range");
}

}  // namespace

int main() {
  if (!check_swizzle() || !check_fragments() || !check_blocks()) return 1;
  std::printf("attention_index: checked %lld cases\n", g_cases);
  return 0;
}
