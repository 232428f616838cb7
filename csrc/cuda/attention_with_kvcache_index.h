// Index arithmetic of the split-KV decoding kernels (attention_with_kvcache.cu): the split
// count, the key range of each split, the causal bound of each query row, the CTA numbering,
// the shared-memory row padding and the lane layouts. Plain C++ with FASTGPT_HOST_DEVICE, so
// tests/cpp/attention_with_kvcache_index_test.cpp checks it on the CPU against direct
// definitions; the kernels use exactly these functions. Why the constants have their values is
// explained at the top of attention_with_kvcache.cu.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastgpt {
namespace cuda {

// Keys per pipeline tile (a tile is one cp.async stage); split ranges start on multiples of it.
constexpr int kKvcacheTileKeys = 32;
// Warps per CTA; each owns kKvcacheTileKeys / kKvcacheWarps keys of every tile.
constexpr int kKvcacheWarps = 4;
constexpr int kKvcacheKeysPerWarp = kKvcacheTileKeys / kKvcacheWarps;
// Score phase: the lanes that share one key, each summing a quarter of its 16-byte chunks.
constexpr int kKvcacheLanesPerKey = 32 / kKvcacheKeysPerWarp;
// Query rows (query head x query position pairs of one kv head) one CTA serves.
constexpr int kKvcacheMaxRows = 8;
// Split choice: aim for this many CTAs per SM, give no split fewer than kKvcacheMinSplitKeys
// of the cache's Tmax keys, and never more than kKvcacheMaxSplits splits.
constexpr int kKvcacheCtasPerSm = 3;
constexpr int64_t kKvcacheMinSplitKeys = 256;
constexpr int kKvcacheMaxSplits = 128;
// fp16/bf16 elements per 16-byte vector access (one cp.async granule, one "chunk").
constexpr int kKvcacheChunkElems = 8;

FASTGPT_HOST_DEVICE int64_t kvcache_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FASTGPT_HOST_DEVICE int64_t kvcache_min(int64_t a, int64_t b) { return a < b ? a : b; }
FASTGPT_HOST_DEVICE int64_t kvcache_max(int64_t a, int64_t b) { return a > b ? a : b; }

// Row chunks of one (batch, kv head): its group * q_len query rows, kKvcacheMaxRows per CTA.
FASTGPT_HOST_DEVICE int64_t kvcache_row_chunks(int64_t rows) {
  return kvcache_ceil_div(rows, kKvcacheMaxRows);
}

// Splits per (batch, kv head, row chunk), from the number of such units, the cache length Tmax
// and the SM count: enough that units * splits >= kKvcacheCtasPerSm * sms, but no more than
// Tmax / kKvcacheMinSplitKeys nor kKvcacheMaxSplits; at least 1.
FASTGPT_HOST_DEVICE int kvcache_num_splits(int64_t units, int64_t tmax, int sms) {
  if (units <= 0 || tmax <= 0 || sms <= 0) return 1;
  const int64_t want = kvcache_ceil_div(int64_t(kKvcacheCtasPerSm) * sms, units);
  const int64_t cap = kvcache_min(kKvcacheMaxSplits, kvcache_max(1, tmax / kKvcacheMinSplitKeys));
  return static_cast<int>(kvcache_max(1, kvcache_min(want, cap)));
}

// Keys [begin, end) of split `split` (0 <= split < splits) of a row of n keys: the row's
// ceil(n / tile) tiles are dealt out as evenly as possible (split s gets tiles
// [s * tiles / splits, (s + 1) * tiles / splits), floor or ceil of tiles / splits of them), so
// splits start on tile boundaries, together cover [0, n) once, and differ by at most one tile
// (the last one may be partial). With fewer tiles than splits, some splits are empty.
struct KvcacheKeyRange {
  int64_t begin;
  int64_t end;
};
FASTGPT_HOST_DEVICE KvcacheKeyRange kvcache_split_range(int64_t n, int splits, int split,
                                                        int tile) {
  const int64_t tiles = kvcache_ceil_div(n, tile);
  const int64_t first = int64_t(split) * tiles / splits;
  const int64_t last = (int64_t(split) + 1) * tiles / splits;
  return {kvcache_min(n, first * tile), kvcache_min(n, last * tile)};
}

// Keys query i (0 <= i < q_len) of a row of n keys sees, bottom-right causal: j < the result,
// i.e. j <= n - q_len + i and j < n; 0 when it sees none.
FASTGPT_HOST_DEVICE int64_t kvcache_visible_end(int64_t n, int64_t q_len, int64_t i) {
  return kvcache_max(0, kvcache_min(n, n - q_len + 1 + i));
}

// Shared-memory row pitch, in 16-byte chunks, of a K tile row of `chunks` chunks read by
// `lanes_per_key` lanes per key (lane p of a key reads chunks p, p + lanes_per_key, ...): the
// smallest pitch >= chunks that is congruent to lanes_per_key mod 8, so that the 8 lanes of
// each 128-byte shared-memory wavefront (8 / lanes_per_key keys x lanes_per_key parts) hit 8
// different 16-byte bank groups. lanes_per_key divides 8.
FASTGPT_HOST_DEVICE int kvcache_smem_row_chunks(int chunks, int lanes_per_key) {
  return chunks + ((lanes_per_key - chunks) % 8 + 8) % 8;
}

// P*V phase: lane `lane` of a warp accumulates output chunk `chunk` (of v_chunks <= 32) over the
// warp's keys first_key, first_key + key_step, ... < kKvcacheKeysPerWarp. Lanes that would get
// no key (or no chunk) are inactive; every (key, chunk) pair belongs to exactly one active lane.
struct KvcachePvLane {
  int chunk;
  int first_key;
  int key_step;
  bool active;
};
FASTGPT_HOST_DEVICE KvcachePvLane kvcache_pv_lane(int v_chunks, int lane) {
  const int step = static_cast<int>(kvcache_min(32 / v_chunks, kKvcacheKeysPerWarp));
  const int first = lane / v_chunks;
  return {lane % v_chunks, first, step, first < step};
}

// One CTA per (batch * kv head, split, row chunk), row chunks fastest: the chunks of one split
// read the same K/V tiles at about the same time, so all but the first find them in L2.
struct KvcacheCta {
  int64_t bh;  // b * kv_heads + kv head
  int split;
  int chunk;
};
FASTGPT_HOST_DEVICE int64_t kvcache_cta_index(const KvcacheCta& c, int splits, int chunks) {
  return (c.bh * splits + c.split) * chunks + c.chunk;
}
FASTGPT_HOST_DEVICE KvcacheCta kvcache_cta_coords(int64_t cta, int splits, int chunks) {
  const int64_t per_bh = int64_t(splits) * chunks;
  const int64_t rest = cta % per_bh;
  return {cta / per_bh, static_cast<int>(rest / chunks), static_cast<int>(rest % chunks)};
}

// Row r (0 <= r < group * q_len) of a (batch, kv head) is query head kv_head * group + r / q_len
// at position r % q_len. Rows are head-major, so the rows of one group are consecutive rows of
// the contiguous (B, Hq, Tq, Ev) output: output row bh * group * q_len + r.
FASTGPT_HOST_DEVICE int64_t kvcache_out_row(int64_t bh, int64_t group, int64_t q_len, int64_t r) {
  return bh * group * q_len + r;
}

}  // namespace cuda
}  // namespace fastgpt
