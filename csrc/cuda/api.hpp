// Entry points of the CUDA backend (compiled only when nvcc is found; see CMakeLists.txt).
// Plain C++ signatures: no pybind11 and no torch in .cu files.
#pragma once

#include <cstdint>
#include <string>

namespace piper::cuda {

/// CUDA runtime version the extension was built against (e.g. 13000).
int runtime_version();
/// Number of visible devices; on failure returns -1 and sets `error` (e.g. no driver).
int device_count(std::string* error);
/// The device ordinal of a device (or managed) pointer; -1 for host memory or an unknown
/// pointer, with `error` set when the runtime failed.
int pointer_device(const void* ptr, std::string* error);
/// The calling thread's current device (cudaGetDevice); -1 and `error` set on failure.
int current_device(std::string* error);

// Block copies on the device (csrc/cuda/pack.cu). Every pointer is a device address; `stream` is
// a cudaStream_t as an integer (0: the legacy default stream). One kernel launch per call, ordered
// on `stream`; nothing synchronises with the host. Source and destination must not overlap.
// Bounds are the caller's duty: nothing here knows the buffers' sizes. Launch failures throw
// piper::Error (kSystem, with cudaGetErrorString's text); bad arguments throw kUsage.

/// Copies num_blocks blocks from src to dst. `blocks` is int64 [3, num_blocks] in device
/// memory, row-major: src offsets, then dst offsets, then byte counts (a plan::CopyList).
/// Blocks with a byte count <= 0 are skipped.
void copy_blocks(const void* src, void* dst, const int64_t* blocks, int64_t num_blocks,
                 uintptr_t stream);

/// All-to-all(v) pack: src holds counts[p] rows of row_bytes for each peer p back to back
/// (row displacement = exclusive scan of counts, computed on the device); copies peer p's rows
/// to dst + p * slot_bytes. `counts` is int64 [num_peers] in device memory, each count >= 0 and
/// counts[p] * row_bytes <= slot_bytes (not checked: counts stay on the device).
void pack_alltoallv(const void* src, void* dst, const int64_t* counts, int64_t num_peers,
                    int64_t row_bytes, int64_t slot_bytes, uintptr_t stream);

/// The inverse of pack_alltoallv: copies counts[p] rows from src + p * slot_bytes to dst, back
/// to back in peer order.
void unpack_alltoallv(const void* src, void* dst, const int64_t* counts, int64_t num_peers,
                      int64_t row_bytes, int64_t slot_bytes, uintptr_t stream);

}  // namespace piper::cuda
