// Brute-force checks of the split-KV decoding index helpers
// (csrc/cuda/attention_with_kvcache_index.h) against direct definitions. Prints "checked N cases" and returns 0, or names the first failing
// case and returns 1. Run by tests/test_cuda_index.py.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/attention_with_kvcache_index.h"

namespace {

using namespace fastgpt::cuda;

long long g_cases = 0;

#define EXPECT(cond, ...)                          \
  do {                                             \
    ++g_cases;                                     \
    if (!(cond)) {                                 \
      std::printf("FAILED: %s: ", #cond);          \
      std::printf(__VA_ARGS__);                    \
      std::printf("\n");                           \
      return false;                                \
    }                                              \
  } while (0)

// Splits cover [0, n) exactly once, in order, each starting on a tile boundary, each holding
// floor or ceil of (tiles of the row) / splits whole tiles (the last key's tile may be
// partial), and empty only when the row has fewer tiles than splits.
bool check_split_ranges() {
  std::vector<int64_t> ns;
  for (int64_t n = 0; n <= 300; ++n) ns.push_back(n);
  for (int64_t n : {511, 512, 513, 1000, 4095, 4096, 4097, 32767, 32768, 32769, 131071})
    ns.push_back(n);
  ns.push_back(int64_t(2147483647));  // the largest int32 kv_lens value
  const int tiles_list[] = {1, 8, 16, 32, 48, 64, 128};
  for (const int64_t n : ns) {
    for (int splits = 1; splits <= kKvcacheMaxSplits + 3; ++splits) {
      for (const int tile : tiles_list) {
        if (n > 100000 && splits % 16 != 1 && splits != kKvcacheMaxSplits) continue;
        const int64_t tiles = (n + tile - 1) / tile;
        const int64_t lo = tiles / splits, hi = (tiles + splits - 1) / splits;
        int64_t next = 0;  // every key before this one is covered
        int64_t non_empty = 0;
        for (int s = 0; s < splits; ++s) {
          const KvcacheKeyRange r = kvcache_split_range(n, splits, s, tile);
          EXPECT(r.begin == next, "n=%lld splits=%d tile=%d split=%d begin=%lld expected %lld",
                 (long long)n, splits, tile, s, (long long)r.begin, (long long)next);
          EXPECT(r.begin <= r.end && r.end <= n, "n=%lld splits=%d tile=%d split=%d [%lld,%lld)",
                 (long long)n, splits, tile, s, (long long)r.begin, (long long)r.end);
          EXPECT(r.begin == n || r.begin % tile == 0,
                 "n=%lld splits=%d tile=%d split=%d begin %lld off the tile grid", (long long)n,
                 splits, tile, s, (long long)r.begin);
          const int64_t t = (r.end - r.begin + tile - 1) / tile;  // tiles it holds
          const bool whole = r.end == n || (r.end - r.begin) % tile == 0;
          EXPECT((t == lo || t == hi) && whole,
                 "n=%lld splits=%d tile=%d split=%d [%lld,%lld): %lld tiles, expected %lld..%lld",
                 (long long)n, splits, tile, s, (long long)r.begin, (long long)r.end,
                 (long long)t, (long long)lo, (long long)hi);
          non_empty += r.end > r.begin;
          next = r.end;
        }
        EXPECT(next == n, "n=%lld splits=%d tile=%d: splits end at %lld", (long long)n, splits,
               tile, (long long)next);
        EXPECT(non_empty == (tiles < splits ? tiles : splits),
               "n=%lld splits=%d tile=%d: %lld non-empty splits", (long long)n, splits, tile,
               (long long)non_empty);
      }
    }
  }
  // Exactly once, element by element, for small n (the checks above imply it; this is the
  // definition itself).
  for (int64_t n = 0; n <= 200; ++n) {
    for (int splits = 1; splits <= 40; ++splits) {
      for (const int tile : {1, 3, 32}) {
        std::vector<int> count(n, 0);
        for (int s = 0; s < splits; ++s) {
          const KvcacheKeyRange r = kvcache_split_range(n, splits, s, tile);
          for (int64_t j = r.begin; j < r.end; ++j) ++count[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          EXPECT(count[j] == 1, "n=%lld splits=%d tile=%d: key %lld covered %d times",
                 (long long)n, splits, tile, (long long)j, count[j]);
        }
      }
    }
  }
  return true;
}

// Split count: within [1, kKvcacheMaxSplits], no split under kKvcacheMinSplitKeys of Tmax
// (unless there is only one), and as many as the CTA target asks for when the limits allow.
bool check_num_splits() {
  const int64_t units_list[] = {0, 1, 2, 3, 8, 32, 33, 64, 100, 132, 264, 1000, 100000};
  const int64_t tmax_list[] = {0, 1, 255, 256, 257, 511, 512, 4096, 32768, 1 << 20, 1 << 30};
  const int sms_list[] = {0, 1, 46, 108, 132, 148, 170};
  for (const int64_t units : units_list) {
    for (const int64_t tmax : tmax_list) {
      for (const int sms : sms_list) {
        const int s = kvcache_num_splits(units, tmax, sms);
        EXPECT(s >= 1 && s <= kKvcacheMaxSplits, "units=%lld tmax=%lld sms=%d: %d splits",
               (long long)units, (long long)tmax, sms, s);
        EXPECT(s == 1 || tmax / s >= kKvcacheMinSplitKeys,
               "units=%lld tmax=%lld sms=%d: %d splits of under %lld keys", (long long)units,
               (long long)tmax, sms, s, (long long)kKvcacheMinSplitKeys);
        if (units <= 0 || tmax <= 0 || sms <= 0) {
          EXPECT(s == 1, "units=%lld tmax=%lld sms=%d: %d splits for nothing to do",
                 (long long)units, (long long)tmax, sms, s);
          continue;
        }
        const int64_t target = int64_t(kKvcacheCtasPerSm) * sms;
        const bool capped = s == kKvcacheMaxSplits || (tmax / (s + 1) < kKvcacheMinSplitKeys);
        EXPECT(units * s >= target || capped,
               "units=%lld tmax=%lld sms=%d: %d splits leave the GPU short of %lld CTAs",
               (long long)units, (long long)tmax, sms, s, (long long)target);
        EXPECT(s == 1 || units * (s - 1) < target,
               "units=%lld tmax=%lld sms=%d: %d splits, one fewer reaches %lld CTAs",
               (long long)units, (long long)tmax, sms, s, (long long)target);
      }
    }
  }
  return true;
}

// Causal bound against the definition: query i of q_len sees key j iff j <= n - q_len + i and
// j < n.
bool check_visible_end() {
  for (int64_t n = 0; n <= 70; ++n) {
    for (int64_t q_len = 1; q_len <= 80; ++q_len) {
      for (int64_t i = 0; i < q_len; ++i) {
        int64_t count = 0;
        bool prefix = true;
        for (int64_t j = 0; j < n + 2; ++j) {
          const bool sees = j <= n - q_len + i && j < n;
          if (sees && j != count) prefix = false;
          count += sees;
        }
        EXPECT(prefix, "n=%lld q_len=%lld i=%lld: visible keys are not a prefix", (long long)n,
               (long long)q_len, (long long)i);
        const int64_t got = kvcache_visible_end(n, q_len, i);
        EXPECT(got == count, "n=%lld q_len=%lld i=%lld: visible_end %lld, expected %lld",
               (long long)n, (long long)q_len, (long long)i, (long long)got, (long long)count);
      }
    }
  }
  EXPECT(kvcache_visible_end(2147483647, 1, 0) == 2147483647, "largest n, q_len 1");
  EXPECT(kvcache_visible_end(5, 2147483647, 3) == 0, "huge q_len");
  return true;
}

// The K-tile pitch: >= chunks, under chunks + 8, and conflict-free for the score phase's reads
// (8 consecutive lanes = one 128-byte wavefront of 16-byte accesses hit 8 bank groups).
bool check_smem_pitch() {
  for (int chunks = 1; chunks <= 32; ++chunks) {
    for (const int lanes : {1, 2, 4, 8}) {
      const int pitch = kvcache_smem_row_chunks(chunks, lanes);
      EXPECT(pitch >= chunks && pitch < chunks + 8, "chunks=%d lanes=%d: pitch %d", chunks,
             lanes, pitch);
      for (int step = 0; step * lanes < chunks; ++step) {
        for (int lane0 = 0; lane0 < 32; lane0 += 8) {
          bool used[8] = {};
          for (int l = lane0; l < lane0 + 8; ++l) {
            const int key = l / lanes, part = l % lanes;
            const int slot = (key * pitch + part + step * lanes) % 8;
            EXPECT(!used[slot], "chunks=%d lanes=%d step=%d lane %d: bank conflict", chunks,
                   lanes, step, l);
            used[slot] = true;
          }
        }
      }
    }
  }
  EXPECT(kvcache_smem_row_chunks(16, kKvcacheLanesPerKey) == 20, "E=128 pitch");
  return true;
}

// P*V lanes: every (key, chunk) pair of a warp's keys is accumulated by exactly one active
// lane, and every active lane has a key.
bool check_pv_lanes() {
  for (int v_chunks = 1; v_chunks <= 32; ++v_chunks) {
    std::vector<int> count(kKvcacheKeysPerWarp * v_chunks, 0);
    for (int lane = 0; lane < 32; ++lane) {
      const KvcachePvLane p = kvcache_pv_lane(v_chunks, lane);
      if (!p.active) continue;
      EXPECT(p.chunk >= 0 && p.chunk < v_chunks && p.first_key < kKvcacheKeysPerWarp &&
                 p.key_step >= 1,
             "v_chunks=%d lane=%d: chunk %d first_key %d step %d", v_chunks, lane, p.chunk,
             p.first_key, p.key_step);
      for (int k = p.first_key; k < kKvcacheKeysPerWarp; k += p.key_step)
        ++count[k * v_chunks + p.chunk];
    }
    for (int k = 0; k < kKvcacheKeysPerWarp; ++k) {
      for (int c = 0; c < v_chunks; ++c) {
        EXPECT(count[k * v_chunks + c] == 1, "v_chunks=%d key=%d chunk=%d: %d lanes", v_chunks,
               k, c, count[k * v_chunks + c]);
      }
    }
  }
  return true;
}

// CTA numbering is a bijection with chunks fastest; output rows are the (B, Hq, Tq) row of
// query head kv_head * group + r / q_len at position r % q_len; row chunks cover the rows.
bool check_cta_and_rows() {
  for (int64_t bhs = 1; bhs <= 5; ++bhs) {
    for (int splits = 1; splits <= 7; ++splits) {
      for (int chunks = 1; chunks <= 6; ++chunks) {
        int64_t cta = 0;
        for (int64_t bh = 0; bh < bhs; ++bh) {
          for (int s = 0; s < splits; ++s) {
            for (int c = 0; c < chunks; ++c, ++cta) {
              const KvcacheCta want{bh, s, c};
              EXPECT(kvcache_cta_index(want, splits, chunks) == cta,
                     "bh=%lld split=%d chunk=%d splits=%d chunks=%d", (long long)bh, s, c,
                     splits, chunks);
              const KvcacheCta got = kvcache_cta_coords(cta, splits, chunks);
              EXPECT(got.bh == bh && got.split == s && got.chunk == c,
                     "cta %lld splits=%d chunks=%d -> (%lld, %d, %d)", (long long)cta, splits,
                     chunks, (long long)got.bh, got.split, got.chunk);
            }
          }
        }
      }
    }
  }
  for (int64_t kv_heads = 1; kv_heads <= 4; ++kv_heads) {
    for (int64_t group = 1; group <= 5; ++group) {
      for (int64_t q_len = 1; q_len <= 19; ++q_len) {
        const int64_t rows = group * q_len, q_heads = kv_heads * group;
        const int64_t chunks = kvcache_row_chunks(rows);
        EXPECT(chunks * kKvcacheMaxRows >= rows && (chunks - 1) * kKvcacheMaxRows < rows,
               "rows=%lld: %lld chunks", (long long)rows, (long long)chunks);
        for (int64_t b = 0; b < 3; ++b) {
          for (int64_t hk = 0; hk < kv_heads; ++hk) {
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t h = hk * group + r / q_len, i = r % q_len;
              const int64_t want = (b * q_heads + h) * q_len + i;
              const int64_t got = kvcache_out_row(b * kv_heads + hk, group, q_len, r);
              EXPECT(got == want, "b=%lld hk=%lld group=%lld q_len=%lld r=%lld: row %lld, "
                     "expected %lld", (long long)b, (long long)hk, (long long)group,
                     (long long)q_len, (long long)r, (long long)got, (long long)want);
              EXPECT(h / group == hk, "GQA head mapping h=%lld group=%lld", (long long)h,
                     (long long)group);
            }
          }
        }
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  const bool ok = check_split_ranges() && check_num_splits() && check_visible_end() &&
                  check_smem_pitch() && check_pv_lanes() && check_cta_and_rows();
  if (!ok) return 1;
  std::printf("attention_with_kvcache index helpers: checked %lld cases\n", g_cases);
  return 0;
}
