// Device and host primitives shared by the CUDA kernels of csrc/cuda/*.cu: 16-bit element
// conversions, the PTX wrappers of the tile kernels (cp.async, ldmatrix, mma.sync), device
// limits, the cached SM-count query and the fixed-order column sum of per-CTA partial rows.
// One definition here instead of a private copy per .cu, so the copies cannot drift.
//
// Everything sits in an anonymous namespace, as the private copies did: each .cu keeps its own
// internal copy (kernels and the per-device caches included), nothing is exported from the
// extension, and a kernel is compiled only into the files that launch it (it is a template).
// CUDA headers and the C++ standard library only (DESIGN.md: the CPU torch build ships
// incomplete CUDA headers of its own).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace fastgpt {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// Constants.

constexpr int kWarp = 32;
constexpr float kLog2e = 1.4426950408889634f;

// Dynamic shared memory a CTA may use without cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr int kDefaultSmemBytes = 48 * 1024;
// Per block: 227 KiB on sm_90/sm_100, 163 KiB on sm_80, 99 KiB on sm_86/89/120. Tile configs
// that stay within the smallest (checked at compile time) run on every target.
constexpr int kMaxSmemBytes = 99 * 1024;

// ---------------------------------------------------------------------------------------
// Element access.

// An element type as a value, for generic lambdas that dispatch on dtype at run time:
// launch(TypeTag<__half>{}) then `typename decltype(t)::type` inside.
template <typename T>
struct TypeTag {
  using type = T;
};

// One element <-> float; from_float rounds to nearest even.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two floats rounded (to nearest even) into one 32-bit word of T = __half or __nv_bfloat16:
// lo in the low half, i.e. at the lower address and the lower column of an mma fragment.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit T");
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The inverse of pack2 (exact): .x from the low half.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit T");
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  } else {
    // A bf16 is the top half of its float.
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

// ---------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

// The 32-bit shared-window address of a pointer into shared memory, as cp.async and
// ldmatrix take it.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy (cp.async.cg: bypasses L1) of which the first src_bytes
// (0..16) are read from src, the rest written as zeros; src_bytes = 0 reads nothing, but src
// must still be a valid global address. dst and src 16-byte aligned. The "memory" clobbers
// keep the compiler from moving shared-memory accesses across the copy, commit and wait.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
// Closes the group of the copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most kPending committed groups are still in flight (this thread's copies
// only: a __syncthreads must follow before other threads read them).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices from shared memory (ldmatrix.x4, .trans when kTrans): lanes 8i..8i+7
// give the row addresses of matrix i, r[i] receives this lane's fragment of it. volatile: a
// pipeline stage address is read again after other data has been copied there; a plain asm
// could be merged with the earlier read.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// d += a * b for one m16n8k16 fragment (A row-major, B column-major, fp32 accumulators) of
// T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit T");
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, "
        "%7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Devices whose attributes are cached; queries for others go to the driver every time.
constexpr int kCachedDevices = 64;

// cudaDeviceGetAttribute(value, attr, device), cached in cache[device] once positive (every
// launch needs the value; a driver query costs ~1 us).
inline cudaError_t cached_device_attribute(cudaDeviceAttr attr,
                                           std::atomic<int> (&cache)[kCachedDevices], int device,
                                           int* value) {
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    *value = cache[device].load(std::memory_order_relaxed);
    if (*value > 0) return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(value, attr, device);
  if (err == cudaSuccess && cacheable) cache[device].store(*value, std::memory_order_relaxed);
  return err;
}

// Multiprocessor count of `device`, cached (grids and workspace sizes derive from it, so a
// launcher and its workspace query agree).
inline cudaError_t multiprocessor_count(int device, int* count) {
  static std::atomic<int> cache[kCachedDevices] = {};
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, cache, device, count);
}

// ---------------------------------------------------------------------------------------
// Fixed-order column sums of per-CTA partial rows (deterministic parameter gradients).

constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;

// out_y[col] = sum_r partials[y][r, col] for the slab y = blockIdx.y (out_0 = out0,
// out_1 = out1) of `rows` x `width` floats. Each thread sums a strided subset of rows for one
// column (a warp reads 128 contiguous bytes per row), then one warp adds the kSlices
// subtotals: the order depends on the shape only, never on scheduling.
template <int kCols, int kSlices>
__global__ void __launch_bounds__(kCols* kSlices)
    sum_partial_rows_kernel(const float* __restrict__ partials, int rows, int64_t width,
                            float* __restrict__ out0, float* __restrict__ out1) {
  const int64_t col = int64_t(blockIdx.x) * kCols + threadIdx.x;
  const float* const part = partials + int64_t(blockIdx.y) * rows * width;
  float s = 0.f;
  if (col < width) {
    for (int r = threadIdx.y; r < rows; r += kSlices) s += part[r * width + col];
  }
  __shared__ float subtotal[kSlices][kCols];
  subtotal[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= width) return;
  float total = 0.f;
#pragma unroll
  for (int k = 0; k < kSlices; ++k) total += subtotal[k][threadIdx.x];
  (blockIdx.y == 0 ? out0 : out1)[col] = total;
}

// Launches sum_partial_rows_kernel over `slabs` (1 or 2) consecutive slabs of
// [rows, width] floats at `partials`, slab 0 into out0 and slab 1 into out1. A template like
// the kernel: a plain inline function would instantiate the kernel in every file that
// includes this header, launched or not.
template <int kCols = kReduceCols, int kSlices = kReduceSlices>
cudaError_t sum_partial_rows(const float* partials, int rows, int64_t width, int slabs,
                             float* out0, float* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((width + kCols - 1) / kCols),
                  static_cast<unsigned>(slabs));
  sum_partial_rows_kernel<kCols, kSlices>
      <<<grid, dim3(kCols, kSlices), 0, stream>>>(partials, rows, width, out0, out1);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace fastgpt
