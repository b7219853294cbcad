// Block copies on the device: copy_blocks (a CopyList resident in device memory) and the
// all-to-all(v) pack/unpack between a buffer laid out by counts and a buffer of fixed-size
// per-peer slots. One launch per call, ordered on the caller's stream; counts never leave the
// device, so equal-split all-to-all needs no host synchronisation.
//
// Grid: blockIdx.y strides over items (blocks or peers), blockIdx.x splits one item's bytes
// among gridDim.x CUDA blocks. The host sizes the grid from the item count only (it never sees
// the byte counts): about kBlocksPerSm CUDA blocks per SM in all.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>

#include "cuda/api.hpp"
#include "cuda/pack.hpp"

namespace piper::cuda {
namespace {

using pack::kThreads;

constexpr int kBlocksPerSm = 4;  // resident at once: launch bounds cap registers at 64
constexpr int64_t kMaxGridY = 65535;
constexpr int kMaxDevices = 64;

// Every block i: blocks[i] = src_off, blocks[num + i] = dst_off, blocks[2 * num + i] = bytes.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    copy_blocks_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                       const int64_t* __restrict__ blocks, int64_t num) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.y; i < num; i += gridDim.y) {
    const int64_t s = blocks[i], d = blocks[num + i], n = blocks[2 * num + i];
    pack::copy_bytes(src + s, dst + d, n, t, nthreads);
  }
}

// Peer p: the dense side holds counts[p] rows at row displacement sum(counts[:p]); the slotted
// side holds them at byte p * slot_bytes. kPack copies dense -> slots, else slots -> dense.
template <bool kPack>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    alltoallv_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                     const int64_t* __restrict__ counts, int64_t num_peers, int64_t row_bytes,
                     int64_t slot_bytes) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t p = blockIdx.y; p < num_peers; p += gridDim.y) {
    // Exclusive scan of counts at p, computed by this CUDA block (num_peers is small).
    int64_t partial = 0;
    for (int64_t q = threadIdx.x; q < p; q += kThreads) partial += counts[q];
    const int64_t dense = pack::block_sum(partial) * row_bytes;
    const int64_t slot = p * slot_bytes;
    const int64_t n = counts[p] * row_bytes;
    if (kPack)
      pack::copy_bytes(src + dense, dst + slot, n, t, nthreads);
    else
      pack::copy_bytes(src + slot, dst + dense, n, t, nthreads);
  }
}

// SMs of the current device (cached per device).
int num_sms() {
  static std::array<int, kMaxDevices> cache{};
  int dev = 0;
  PIPER_CHECK_CUDA(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  if (cache[dev] == 0) {
    int n = 0;
    PIPER_CHECK_CUDA(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev),
                     "cudaDeviceGetAttribute(MultiProcessorCount)");
    cache[dev] = std::max(n, 1);
  }
  return cache[dev];
}

// gridDim.y covers the items (up to the target), gridDim.x fills the rest of the target.
dim3 grid_for(int64_t num_items) {
  const int64_t target = static_cast<int64_t>(num_sms()) * kBlocksPerSm;
  const int64_t y = std::min({num_items, target, kMaxGridY});
  const int64_t x = std::max<int64_t>(1, (target + y - 1) / y);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), 1);
}

void check_launch(const char* what) {
  PIPER_CHECK_CUDA(cudaGetLastError(), fmt(what, " launch"));
}

// src and dst may be null (all blocks or counts empty); the table cannot.
void check_args(const char* what, const void* table, int64_t num) {
  if (num < 0)
    throw Error(ErrorCode::kUsage, fmt("piper: ", what, ": negative count ", num));
  if (num > 0 && table == nullptr)
    throw Error(ErrorCode::kUsage,
                fmt("piper: ", what, ": null device table with ", num, " entries"));
}

}  // namespace

void copy_blocks(const void* src, void* dst, const int64_t* blocks, int64_t num_blocks,
                 uintptr_t stream) {
  check_args("cuda copy_blocks", blocks, num_blocks);
  if (num_blocks == 0) return;
  copy_blocks_kernel<<<grid_for(num_blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), blocks, num_blocks);
  check_launch("cuda copy_blocks");
}

void pack_alltoallv(const void* src, void* dst, const int64_t* counts, int64_t num_peers,
                    int64_t row_bytes, int64_t slot_bytes, uintptr_t stream) {
  check_args("cuda pack_alltoallv", counts, num_peers);
  if (row_bytes < 0 || slot_bytes < 0)
    throw Error(ErrorCode::kUsage, fmt("piper: cuda pack_alltoallv: negative row_bytes ",
                                       row_bytes, " or slot_bytes ", slot_bytes));
  if (num_peers == 0 || row_bytes == 0) return;
  alltoallv_kernel<true><<<grid_for(num_peers), kThreads, 0,
                           reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), counts, num_peers, row_bytes,
      slot_bytes);
  check_launch("cuda pack_alltoallv");
}

void unpack_alltoallv(const void* src, void* dst, const int64_t* counts, int64_t num_peers,
                      int64_t row_bytes, int64_t slot_bytes, uintptr_t stream) {
  check_args("cuda unpack_alltoallv", counts, num_peers);
  if (row_bytes < 0 || slot_bytes < 0)
    throw Error(ErrorCode::kUsage, fmt("piper: cuda unpack_alltoallv: negative row_bytes ",
                                       row_bytes, " or slot_bytes ", slot_bytes));
  if (num_peers == 0 || row_bytes == 0) return;
  alltoallv_kernel<false><<<grid_for(num_peers), kThreads, 0,
                            reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), counts, num_peers, row_bytes,
      slot_bytes);
  check_launch("cuda unpack_alltoallv");
}

}  // namespace piper::cuda
