// SIMD dispatch shared by the CPU kernels. The build has no -march flag (the extension must run
// on any x86-64), so the hot loops are compiled several times with target_clones and the loader
// picks the widest clone the CPU supports.
#pragma once

// Helpers called from the multiversioned functions must be inlined into them: an out-of-line
// helper is compiled once, for the baseline ISA, whichever clone calls it.
#define FASTGPT_INLINE inline __attribute__((always_inline))

// Clones can name the x86-64-v3/v4 levels from GCC 12 on. Older GCC (e.g. 11, seen to build
// and pass here) and Clang dispatch on single features instead: AVX512F alone lacks the BW
// word instructions the bf16 conversions use (bf16 measured up to 2x slower; fp32 the same)
// and AVX2 alone lacks FMA.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#if !defined(__clang__) && __GNUC__ >= 12
#define FASTGPT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTGPT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define FASTGPT_SIMD_CLONES
#endif
