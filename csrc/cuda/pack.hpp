// Device-side building blocks of the CUDA pack/unpack kernels (included by .cu files only).
//
// A "block" is one contiguous byte range copied from src + src_off to dst + dst_off. The copy of
// one block is spread over all threads of the CUDA blocks assigned to it (grid-stride), using the
// widest access (16, 8, 4 or 1 bytes) for which src + src_off and dst + dst_off have the same
// misalignment; the bytes before the first aligned address (head) and after the last whole
// vector (tail) are copied byte by byte.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/check.hpp"

namespace piper::cuda::pack {

constexpr int kThreads = 256;  // threads per CUDA block of every copy kernel
constexpr int kUnroll = 4;     // vectors in flight per thread in the body loop

/// Copies n bytes with accesses of type T (both pointers aligned to sizeof(T) after `head`
/// bytes); thread t of nthreads cooperating threads.
template <typename T>
__device__ __forceinline__ void copy_vectorised(const uint8_t* src, uint8_t* dst, int64_t n,
                                                int64_t head, int64_t t, int64_t nthreads) {
  // Head: fewer than sizeof(T) bytes up to the first aligned address.
  for (int64_t b = t; b < head; b += nthreads) dst[b] = src[b];
  const int64_t num_vec = (n - head) / static_cast<int64_t>(sizeof(T));
  const T* s = reinterpret_cast<const T*>(src + head);
  T* d = reinterpret_cast<T*>(dst + head);

  // Body: kUnroll loads in flight per thread, then the remaining vectors one at a time.
  int64_t v = t;
  for (; v + (kUnroll - 1) * nthreads < num_vec; v += kUnroll * nthreads) {
    T r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = s[v + u * nthreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[v + u * nthreads] = r[u];
  }
  for (; v < num_vec; v += nthreads) d[v] = s[v];

  // Tail: the bytes after the last whole vector.
  const int64_t done = head + num_vec * static_cast<int64_t>(sizeof(T));
  for (int64_t b = done + t; b < n; b += nthreads) dst[b] = src[b];
}

/// Bytes from address a up to the next multiple of align (a power of two), at most n.
__device__ __forceinline__ int64_t head_bytes(uintptr_t a, int64_t align, int64_t n) {
  const int64_t h = static_cast<int64_t>((align - (a & (align - 1))) & (align - 1));
  return h < n ? h : n;
}

/// Copies n bytes from src to dst with the widest access their common alignment allows;
/// thread t of nthreads cooperating threads (all of them must call it with the same arguments).
__device__ __forceinline__ void copy_bytes(const uint8_t* src, uint8_t* dst, int64_t n, int64_t t,
                                           int64_t nthreads) {
  if (n <= 0) return;
  const uintptr_t sa = reinterpret_cast<uintptr_t>(src), da = reinterpret_cast<uintptr_t>(dst);
  const uintptr_t diff = sa ^ da;  // low bits equal <=> same misalignment
  if ((diff & 15) == 0) {
    const int64_t head = head_bytes(sa, 16, n);
    copy_vectorised<uint4>(src, dst, n, head, t, nthreads);
  } else if ((diff & 7) == 0) {
    const int64_t head = head_bytes(sa, 8, n);
    copy_vectorised<uint2>(src, dst, n, head, t, nthreads);
  } else if ((diff & 3) == 0) {
    const int64_t head = head_bytes(sa, 4, n);
    copy_vectorised<uint32_t>(src, dst, n, head, t, nthreads);
  } else {
    copy_vectorised<uint8_t>(src, dst, n, 0, t, nthreads);
  }
}

/// Sum of x over all threads of the CUDA block (every thread gets the result).
__device__ __forceinline__ int64_t block_sum(int64_t x) {
  __shared__ int64_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

}  // namespace piper::cuda::pack
