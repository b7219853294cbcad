// The host-side parts of the CUDA execution context (csrc/cuda/cuda_context.hpp) that need no
// CUDA: what a local rank publishes in the node channel's exchange area (its IPC handles), and
// the copy table the block-copy kernel reads. Compiled in every build, so they are unit-tested
// on CPU hosts (tests/gpu/test_cuda_context.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/schedule.hpp"

namespace piper::cuda {

constexpr int64_t kIpcHandleBytes = 64;  // CUDA_IPC_HANDLE_SIZE (static_assert in cuda_context.cu)
constexpr int kFenceEvents = 2;          // IPC events per rank, alternated by fence parity
constexpr int64_t kIpcErrorChars = 120;  // room for the segment owner's error text

/// One local rank's record in NodeChannel::exchange(l). Written by its rank only; read by the
/// node's other ranks after a barrier that followed the write. Event handles are set once (the
/// context's construction); the segment fields only by local rank 0, the segment's owner, each
/// time it replaces the segment (generation 1, 2, ...; 0: none yet).
struct IpcRecord {
  uint64_t magic;
  int64_t pid;
  int64_t device;                 // CUDA device ordinal in the publishing process
  char bus_id[16];                // its PCI bus id, for messages ("0000:3b:00.0")
  int64_t segment_gen;            // generation of the published segment
  int64_t segment_bytes;          // its size in bytes
  char error[kIpcErrorChars];     // non-empty: the owner failed to create generation segment_gen
  uint8_t segment_handle[kIpcHandleBytes];               // cudaIpcMemHandle_t
  uint8_t event_handles[kFenceEvents][kIpcHandleBytes];  // cudaIpcEventHandle_t per parity
};

/// A record with the magic set and every other field zero.
IpcRecord empty_record();

/// Writes r into an exchange area of area_bytes bytes (kInternal if it does not fit).
void write_record(uint8_t* area, int64_t area_bytes, const IpcRecord& r);

/// Reads the record of global rank `rank` from its exchange area. kSystem naming `what` and the
/// rank when the area holds no record (the rank did not build a CUDA context: the node's ranks
/// disagree on the memory kind), kInternal when it does not fit.
IpcRecord read_record(const uint8_t* area, int64_t area_bytes, int64_t rank,
                      const std::string& what);

/// Checks that the segment owner `owner` published generation `gen` of at least `bytes` bytes
/// (kSystem with the owner's own error text when it failed to create it).
void check_segment(const IpcRecord& r, int64_t owner, int64_t gen, int64_t bytes,
                   const std::string& what);

/// The block-copy kernel's table (csrc/cuda/api.hpp copy_blocks): int64 [3, n], row-major (src
/// offsets, dst offsets, byte counts), blocks of zero bytes left out. Every block is checked
/// against the buffers' sizes first, as host::copy_blocks does: kInternal naming `what`, the
/// block and both sizes, so a bad plan never reaches the device.
std::vector<int64_t> device_table(const plan::CopyList& blocks, int64_t src_bytes,
                                  int64_t dst_bytes, const std::string& what);

/// The size the node segment grows to for a request of `bytes` when it holds `current`:
/// at least double, at least kMinSegmentBytes, in whole kSegmentGranule units.
int64_t grown_segment_bytes(int64_t bytes, int64_t current);
constexpr int64_t kMinSegmentBytes = 1 << 20;
constexpr int64_t kSegmentGranule = 2 << 20;  // cudaMalloc's large-page granule

}  // namespace piper::cuda
