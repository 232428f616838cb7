// Brute-force checks of csrc/cuda/linear_index.h (the GEMM's swizzle, stage copies with their
// sources and tails, ldmatrix lane addresses, mma fragment maps, grouped CTA order, gated column
// map, accumulator staging) and of csrc/activation.h (the epilogue math). The fragment layouts
// are restated here from the PTX ISA's m16n8k16 tables (per element index, not per register)
// and ldmatrix is simulated on a shared-memory image, so the kernel's address arithmetic is
// checked end to end. Prints "checked N cases" and exits 0, or names the first failure and
// exits 1.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <vector>

#include "activation.h"
#include "cuda/linear_index.h"

using namespace fastgpt;
using namespace fastgpt::cuda;

namespace {

long long g_cases = 0;

void require(bool ok, const char* what, long long a = 0, long long b = 0, long long c = 0,
             long long d = 0) {
  ++g_cases;
  if (!ok) {
    std::printf("FAILED: %s (%lld, %lld, %lld, %lld)\n", what, a, b, c, d);
    std::exit(1);
  }
}

// The kernel's tile configurations (linear.cu LargeTile, SmallTile): BM, BN, BK, warps M x N.
struct Tile {
  int bm, bn, bk, wm, wn;
};
const Tile kTiles[] = {{128, 128, 32, 2, 4}, {64, 64, 32, 2, 2}};

// PTX ISA, mma.m16n8k16 with .f16/.bf16 A: a_i (i = 0..7), two per register (a0, a1 in reg 0).
// row = groupID for a0, a1, a4, a5, groupID + 8 for a2, a3, a6, a7;
// col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4.
void isa_a(int lane, int i, int* row, int* col) {
  const int g = lane >> 2, t = lane % 4;
  *row = (i == 2 || i == 3 || i == 6 || i == 7) ? g + 8 : g;
  *col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
// B (k x n): b_i (i = 0..3): row (k) = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2),
// col (n) = groupID.
void isa_b(int lane, int i, int* row, int* col) {
  *row = (lane % 4) * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  *col = lane >> 2;
}
// C/D: c_i (i = 0..3): row = groupID (+ 8 for i >= 2), col = threadID_in_group * 2 + (i & 1).
void isa_c(int lane, int i, int* row, int* col) {
  *row = (lane >> 2) + (i >= 2 ? 8 : 0);
  *col = (lane % 4) * 2 + (i & 1);
}

void check_fragment_maps() {
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      int r, c;
      isa_a(lane, i, &r, &c);
      const GemmRowCol h = gemm_mma_a_coord(lane, i / 2, i % 2);
      require(h.row == r && h.col == c, "gemm_mma_a_coord vs PTX ISA", lane, i, h.row, h.col);
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      isa_b(lane, i, &r, &c);
      const GemmRowCol h = gemm_mma_b_coord(lane, i / 2, i % 2);
      require(h.row == r && h.col == c, "gemm_mma_b_coord vs PTX ISA", lane, i, h.row, h.col);
      isa_c(lane, i, &r, &c);
      const GemmRowCol hc = gemm_mma_c_coord(lane, i);
      require(hc.row == r && hc.col == c, "gemm_mma_c_coord vs PTX ISA", lane, i, hc.row, hc.col);
    }
  }
}

void check_swizzle() {
  const int chunk_counts[] = {2, 4, 8, 16, 32};
  const int row_counts[] = {8, 16, 32, 64, 128};
  for (int chunks : chunk_counts) {
    for (int rows : row_counts) {
      std::vector<int> seen(rows * chunks, 0);
      for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < chunks; ++c) {
          const int off = gemm_smem_offset(r, c, chunks);
          require(off % 8 == 0 && off >= r * chunks * 8 && off < (r + 1) * chunks * 8,
                  "swizzle keeps a chunk in its row, 16-byte aligned", chunks, rows, r, c);
          require(seen[off / 8]++ == 0, "swizzle is a bijection per tile", chunks, rows, r, c);
        }
      }
      // 8 consecutive rows (from a multiple of 8) at one logical chunk: 8 bank groups.
      for (int r0 = 0; r0 < rows; r0 += 8) {
        for (int c = 0; c < chunks; ++c) {
          std::set<int> groups;
          for (int j = 0; j < 8; ++j) groups.insert((gemm_smem_offset(r0 + j, c, chunks) / 8) % 8);
          require(groups.size() == 8, "8 rows of one chunk hit 8 bank groups", chunks, r0, c);
        }
      }
    }
  }
}

// Stage copies: the threads' (load, tid) -> (row, chunk) map covers each chunk of the stage
// once, load i is load 0 plus i * threads chunks (the kernel adds a constant), and 8 consecutive
// threads store to 8 different bank groups.
void check_stage_copy() {
  for (const Tile& t : kTiles) {
    const int threads = t.wm * t.wn * 32;
    for (int operand_b = 0; operand_b < 2; ++operand_b) {
      for (int k_major = 0; k_major < 2; ++k_major) {
        const int mn_size = operand_b ? t.bn : t.bm;
        const int chunks = (k_major ? t.bk : mn_size) / 8;
        const int rows = k_major ? mn_size : t.bk;
        const int loads = rows * chunks / threads;
        require(loads * threads == rows * chunks && (threads / chunks) % 8 == 0,
                "stage copy: whole chunks per thread at one swizzle phase", t.bm, operand_b,
                k_major);
        std::vector<int> seen(rows * chunks, 0);
        for (int i = 0; i < loads; ++i) {
          for (int tid = 0; tid < threads; ++tid) {
            const GemmLaneAddr at = gemm_copy_chunk(tid, i, threads, chunks);
            const GemmLaneAddr at0 = gemm_copy_chunk(tid, 0, threads, chunks);
            require(at.row < rows && at.chunk < chunks, "stage copy inside the tile", t.bm,
                    operand_b * 10 + k_major, i, tid);
            const int off = gemm_smem_offset(at.row, at.chunk, chunks);
            require(seen[off / 8]++ == 0, "stage copy writes each chunk once", t.bm,
                    operand_b * 10 + k_major, i, tid);
            require(off == gemm_smem_offset(at0.row, at0.chunk, chunks) + i * threads * 8,
                    "load i is load 0 plus a constant", t.bm, operand_b * 10 + k_major, i, tid);
          }
          for (int tid0 = 0; tid0 < threads; tid0 += 8) {
            std::set<int> groups;
            for (int tid = tid0; tid < tid0 + 8; ++tid) {
              const GemmLaneAddr at = gemm_copy_chunk(tid, i, threads, chunks);
              groups.insert((gemm_smem_offset(at.row, at.chunk, chunks) / 8) % 8);
            }
            require(groups.size() == 8, "stage copy stores are bank-conflict free", t.bm,
                    operand_b * 10 + k_major, i, tid0);
          }
        }
      }
    }
  }
}

// Stage copy sources with tails: over every tile and k-tile of operands of awkward sizes, each
// copied element is the operand element the stage position stands for (plain: mn0 + position;
// gated B: gate columns n0 + position, up columns N + n0 + position - bn / 2), inside the
// operand; the zero-filled rest of a chunk is exactly what lies outside; every element inside
// is copied exactly once; chunks start 16-byte aligned.
void check_copy_sources() {
  const int extents[] = {1, 7, 8, 9, 63, 64, 65, 130, 200};
  const int ks[] = {1, 5, 8, 31, 32, 33, 70};
  for (const Tile& t : kTiles) {
    const int threads = t.wm * t.wn * 32;
    for (int operand_b = 0; operand_b < 2; ++operand_b) {
      for (int k_major = 0; k_major < 2; ++k_major) {
        for (int gated = 0; gated <= operand_b; ++gated) {
          const int tile_mn = operand_b ? t.bn : t.bm;
          const int chunks = (k_major ? t.bk : tile_mn) / 8;
          const int rows = k_major ? tile_mn : t.bk;
          const int loads = rows * chunks / threads;
          const int out = gated ? tile_mn / 2 : tile_mn;  // logical columns per tile
          for (int E : extents) {
            for (int K : ks) {
              const int width = gated ? 2 * E : E;  // of the operand along mn
              std::vector<int> copied(size_t(width) * K, 0);
              const int tiles = (E + out - 1) / out;
              for (int tile = 0; tile < tiles; ++tile) {
                const int mn0 = tile * out;
                for (int k0 = 0; k0 < K; k0 += t.bk) {
                  for (int i = 0; i < loads; ++i) {
                    for (int tid = 0; tid < threads; ++tid) {
                      const GemmLaneAddr at = gemm_copy_chunk(tid, i, threads, chunks);
                      const GemmCopySrc src =
                          gemm_copy_src(k_major, at.row, at.chunk, tile_mn, mn0, E, gated);
                      const int bytes = gemm_copy_bytes(k_major, src, k0, K);
                      const int id = ((operand_b * 2 + k_major) * 2 + gated) * 1000 + E;
                      require(bytes >= 0 && bytes <= 16 && bytes % 2 == 0, "copy bytes in range",
                              id, K, tile, tid);
                      if (bytes > 0 && (k_major || !gated || E % 8 == 0)) {
                        require((k_major ? k0 + src.k : src.mn) % 8 == 0,
                                "copy chunk starts 16-byte aligned", id, K, tile, tid);
                      }
                      for (int e = 0; e < 8; ++e) {
                        const int pos = k_major ? at.row : at.chunk * 8 + e;  // in the tile
                        const int k = k0 + (k_major ? at.chunk * 8 + e : at.row);
                        const bool up = gated && pos >= tile_mn / 2;
                        const int logical = mn0 + (up ? pos - tile_mn / 2 : pos);
                        const int64_t want = logical + (up ? E : 0);
                        const bool inside = logical < E && k < K;
                        const int64_t got_mn = src.mn + (k_major ? 0 : e);
                        const int got_k = k0 + src.k + (k_major ? e : 0);
                        require(got_k == k, "copy k is the stage position's", id, K, tile, tid);
                        if (e < bytes / 2) {
                          require(inside && got_mn == want, "copied element is the position's",
                                  id, K, tile * 100000 + tid, e);
                          ++copied[size_t(got_mn) * K + k];
                        } else {
                          require(!inside, "zero-filled element lies outside", id, K,
                                  tile * 100000 + tid, e);
                        }
                      }
                    }
                  }
                }
              }
              for (int mn = 0; mn < width; ++mn) {
                for (int k = 0; k < K; ++k) {
                  require(copied[size_t(mn) * K + k] == 1, "every element copied once",
                          ((operand_b * 2 + k_major) * 2 + gated) * 1000 + E, K, mn, k);
                }
              }
            }
          }
        }
      }
    }
  }
}

// Simulates ldmatrix .x4 (optionally .trans) on a tile of element ids and compares every lane's
// registers with the mma fragment of the operand at (mn0, kk), for every warp, fragment and k16
// step of both tile configurations and both storage layouts of A and B; also checks that the 8
// addresses of each phase hit 8 different bank groups.
void check_ldmatrix() {
  for (const Tile& t : kTiles) {
    for (int operand_b = 0; operand_b < 2; ++operand_b) {
      for (int k_major = 0; k_major < 2; ++k_major) {
        const int mn_size = operand_b ? t.bn : t.bm;
        const int chunks = (k_major ? t.bk : mn_size) / 8;
        const int rows = k_major ? mn_size : t.bk;
        // id(mn, k) = mn * 1000 + k at the element the StageCopy writes it to.
        std::vector<int> smem(rows * chunks * 8, -1);
        for (int mn = 0; mn < mn_size; ++mn) {
          for (int k = 0; k < t.bk; ++k) {
            const int off = k_major ? gemm_smem_offset(mn, k / 8, chunks) + k % 8
                                    : gemm_smem_offset(k, mn / 8, chunks) + mn % 8;
            smem[off] = mn * 1000 + k;
          }
        }
        const int warps = operand_b ? t.wn : t.wm;
        const int warp_mn = mn_size / warps;
        for (int w = 0; w < warps; ++w) {
          for (int f = 0; f < warp_mn / 16; ++f) {
            const int mn0 = w * warp_mn + f * 16;
            for (int kk = 0; kk < t.bk / 16; ++kk) {
              int addr[32];
              for (int lane = 0; lane < 32; ++lane) {
                addr[lane] = gemm_ldmatrix_offset(lane, operand_b, k_major, mn0, kk, chunks);
                require(addr[lane] % 8 == 0 && addr[lane] >= 0 &&
                            addr[lane] + 8 <= int(smem.size()),
                        "ldmatrix row address inside the tile", operand_b, k_major, mn0, lane);
              }
              for (int m = 0; m < 4; ++m) {
                std::set<int> groups;
                for (int j = 0; j < 8; ++j) groups.insert((addr[8 * m + j] / 8) % 8);
                require(groups.size() == 8, "ldmatrix phase is bank-conflict free", operand_b,
                        k_major, mn0 * 100 + kk, m);
              }
              for (int lane = 0; lane < 32; ++lane) {
                for (int reg = 0; reg < 4; ++reg) {
                  for (int e = 0; e < 2; ++e) {
                    // What ldmatrix puts in element e of register `reg` of `lane`.
                    const int q = lane / 4, p = (lane % 4) * 2 + e;
                    const int got = k_major ? smem[addr[8 * reg + q] + p]  // row q, column p
                                            : smem[addr[8 * reg + p] + q];  // .trans
                    int row, col, mn, k;
                    if (!operand_b) {
                      isa_a(lane, 2 * reg + e, &row, &col);
                      mn = mn0 + row;
                      k = kk * 16 + col;
                    } else {
                      // registers 0, 1: n block 0 (b0, b1); 2, 3: n block 1.
                      isa_b(lane, 2 * (reg % 2) + e, &row, &col);
                      mn = mn0 + (reg / 2) * 8 + col;
                      k = kk * 16 + row;
                    }
                    require(got == mn * 1000 + k, "ldmatrix delivers the mma fragment",
                            operand_b * 10 + k_major, mn0 * 100 + kk, lane * 10 + reg, got);
                  }
                }
              }
            }
          }
        }
      }
    }
  }
}

void check_grouped_order() {
  const int groups[] = {1, 2, 3, 8};
  for (int group : groups) {
    for (int tm = 1; tm <= 37; ++tm) {
      for (int tn = 1; tn <= 29; ++tn) {
        std::vector<int> seen(tm * tn, 0);
        for (int t = 0; t < tm * tn; ++t) {
          const GemmTile g = gemm_grouped_tile(t, tm, tn, group);
          require(g.m >= 0 && g.m < tm && g.n >= 0 && g.n < tn, "grouped tile in range", group,
                  tm * 100 + tn, t, g.m * 100 + g.n);
          require(seen[g.m * tn + g.n]++ == 0, "grouped order is a permutation", group,
                  tm * 100 + tn, t, g.m * 100 + g.n);
          // The group of tile rows [first, first + group) is walked before the next one.
          require(g.m / group == t / (group * tn), "grouped order walks one group at a time",
                  group, tm * 100 + tn, t, g.m);
        }
      }
    }
  }
}

void check_tails_and_gating() {
  for (int extent = 0; extent < 40; ++extent) {
    for (int start = 0; start < 48; start += 1) {
      int inside = 0;
      for (int e = start; e < start + 8; ++e) inside += e < extent;
      require(gemm_chunk_bytes(extent, start) == 2 * inside, "chunk bytes", extent, start);
    }
  }
  require(gemm_chunk_bytes(int64_t(1) << 40, (int64_t(1) << 40) - 3) == 6, "chunk bytes int64");
  for (int bn : {64, 128}) {
    for (int c = 0; c < bn; ++c) {
      require(gemm_tile_b_col(c, bn, false) == c && !gemm_tile_b_up(c, bn, false),
              "plain tile columns are B columns", bn, c);
      const int col = gemm_tile_b_col(c, bn, true);
      require(col >= 0 && col < bn / 2 && gemm_tile_b_up(c, bn, true) == (c >= bn / 2),
              "gated tile column in its half", bn, c);
      if (c < bn / 2) {
        require(gemm_tile_b_col(c + bn / 2, bn, true) == col,
                "gate column c and up column c + bn / 2 are the same output column", bn, c);
      }
    }
  }
}

// Accumulator staging: each half warp's float2 stores of one fragment (4 rows x 8 floats) hit
// 32 different banks, for every warp tile position of both configurations.
void check_cstage() {
  for (const Tile& t : kTiles) {
    const int warp_m = t.bm / t.wm, warp_n = t.bn / t.wn;
    for (int row0 = 0; row0 < t.bm; row0 += 16) {
      for (int col0 = 0; col0 < t.bn; col0 += 8) {
        for (int h = 0; h < 2; ++h) {
          for (int half = 0; half < 2; ++half) {
            std::set<int> banks;
            for (int lane = 16 * half; lane < 16 * half + 16; ++lane) {
              const GemmRowCol rc = gemm_mma_c_coord(lane, 2 * h);
              const int off = gemm_cstage_offset(row0 + rc.row, col0 + rc.col, t.bn);
              require(off % 2 == 0, "staged float2 is 8-byte aligned", t.bn, row0, col0, lane);
              banks.insert(off % 32);
              banks.insert((off + 1) % 32);
            }
            require(banks.size() == 32, "staged float2 stores are conflict-free", t.bn, row0,
                    col0, h);
          }
        }
      }
    }
    // The epilogue's float4 reads: each quarter warp's 8 float4 of a step take all 32 banks,
    // for the plain and the gated walk (gate and up halves alike), and the two steps of a
    // chunk read both halves.
    for (int gated = 0; gated < 2; ++gated) {
      const int out_chunks = (gated ? t.bn / 2 : t.bn) / 8;
      for (int idx0 = 0; idx0 < t.bm * out_chunks; idx0 += 8) {
        for (int half_up = 0; half_up <= gated; ++half_up) {
          for (int step = 0; step < 2; ++step) {
            std::set<int> banks;
            for (int idx = idx0; idx < idx0 + 8; ++idx) {
              const int r = idx / out_chunks, c = idx % out_chunks * 8 + half_up * t.bn / 2;
              const int h = gemm_cstage_read_half(idx, step);
              require(h + gemm_cstage_read_half(idx, 1 - step) == 1, "both halves read", t.bn,
                      gated, idx, step);
              const int off = gemm_cstage_offset(r, c, t.bn) + 4 * h;
              for (int w = 0; w < 4; ++w) banks.insert((off + w) % 32);
            }
            require(banks.size() == 32, "staged float4 reads are conflict-free", t.bn, gated,
                    idx0, step * 2 + half_up);
          }
        }
      }
    }
    require(warp_m % 16 == 0 && warp_n % 8 == 0, "warp tiles are whole fragments", t.bm, t.bn);
    // Rows are disjoint and inside the tile's bytes.
    require(gemm_cstage_offset(t.bm - 1, t.bn - 1, t.bn) < t.bm * gemm_cstage_stride(t.bn) &&
                gemm_cstage_stride(t.bn) >= t.bn,
            "staged rows are disjoint", t.bm, t.bn);
  }
}

// ---------------------------------------------------------------- activation.h

const Activation kPlain[] = {Activation::kNone, Activation::kGelu, Activation::kGeluTanh,
                             Activation::kRelu, Activation::kSilu};

double closed_form(Activation a, double z) {
  switch (a) {
    case Activation::kGelu: return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double inner = std::sqrt(2.0 / 3.14159265358979323846) * (z + 0.044715 * z * z * z);
      return 0.5 * z * (1.0 + std::tanh(inner));
    }
    case Activation::kRelu: return z > 0 ? z : 0;
    case Activation::kSilu: return z / (1.0 + std::exp(-z));
    default: return z;
  }
}

void check_activation() {
  for (Activation a : kPlain) {
    require(!is_gated(a) && gate_activation(a) == a, "plain kinds are not gated",
            static_cast<int>(a));
    for (int i = -1000; i <= 1000; ++i) {
      const float z = i * 0.008f;  // [-8, 8]
      const double want = closed_form(a, z);
      const double got = activate(a, z);
      require(std::fabs(got - want) <= 2e-6 + 2e-6 * std::fabs(want), "activate vs closed form",
              static_cast<int>(a), i, static_cast<long long>(got * 1e6),
              static_cast<long long>(want * 1e6));
      // Central difference of the float implementation, h = 2^-7 (exact in float); relu is
      // skipped where z +- h straddles its kink.
      const float h = 1.0f / 128;
      if (a == Activation::kRelu && std::fabs(z) <= h) continue;
      const double fd = (double(activate(a, z + h)) - double(activate(a, z - h))) / (2.0 * h);
      const double g = activate_grad(a, z);
      require(std::fabs(g - fd) <= 2e-3 + 1e-3 * std::fabs(fd),
              "activate_grad vs central difference", static_cast<int>(a), i,
              static_cast<long long>(g * 1e6), static_cast<long long>(fd * 1e6));
    }
  }
  // Points with known values.
  require(activate(Activation::kGelu, 0.f) == 0.f, "gelu(0) = 0");
  require(activate(Activation::kGeluTanh, 0.f) == 0.f, "gelu_tanh(0) = 0");
  require(activate(Activation::kSilu, 0.f) == 0.f, "silu(0) = 0");
  require(activate(Activation::kRelu, -3.f) == 0.f && activate(Activation::kRelu, 3.f) == 3.f,
          "relu");
  require(activate(Activation::kNone, -2.5f) == -2.5f, "identity");
  require(activate_grad(Activation::kRelu, 0.f) == 0.f, "relu'(0) = 0 (threshold_backward)");
  require(activate_grad(Activation::kNone, 7.f) == 1.f, "identity' = 1");
  require(std::fabs(activate_grad(Activation::kGelu, 0.f) - 0.5f) < 1e-7f, "gelu'(0) = 1/2");
  require(std::fabs(activate_grad(Activation::kGeluTanh, 0.f) - 0.5f) < 1e-7f,
          "gelu_tanh'(0) = 1/2");
  require(std::fabs(activate_grad(Activation::kSilu, 0.f) - 0.5f) < 1e-7f, "silu'(0) = 1/2");
  // Large |z| saturates without NaN: silu(-100) -> 0, gelu(30) -> 30.
  require(std::fabs(activate(Activation::kSilu, -100.f)) < 1e-30f, "silu(-100) ~ 0");
  require(activate(Activation::kGelu, 30.f) == 30.f, "gelu(30) = 30");
  require(!std::isnan(activate_grad(Activation::kSilu, -100.f)) &&
              !std::isnan(activate_grad(Activation::kGeluTanh, 100.f)),
          "grads finite at large |z|");
  // Gated kinds.
  require(is_gated(Activation::kSwiglu) && is_gated(Activation::kGeglu), "swiglu, geglu gated");
  require(gate_activation(Activation::kSwiglu) == Activation::kSilu, "swiglu gates with silu");
  require(gate_activation(Activation::kGeglu) == Activation::kGelu, "geglu gates with erf gelu");
}

}  // namespace

int main() {
  check_fragment_maps();
  check_swizzle();
  check_stage_copy();
  check_copy_sources();
  check_ldmatrix();
  check_grouped_order();
  check_tails_and_gating();
  check_cstage();
  check_activation();
  std::printf("linear_index_test: checked %lld cases\n", g_cases);
  return 0;
}
