// CudaContext: the execution context of csrc/runtime/exec_context.hpp on CUDA device memory.
//
// The algorithms of csrc/runtime/executor.cpp run unchanged; this context carries out their
// copies, fences and node segment on the device:
//   copy            the block-copy kernel of csrc/cuda/pack.cu, one launch per copy list, on
//                   the caller's stream (set_stream). The list is checked against both buffers
//                   on the host, staged in pinned memory and uploaded on the same stream; a
//                   staging slot is reused only once the event recorded after its kernel has
//                   completed (otherwise a new slot is made), so no copy waits on the host.
//   node segment    device memory of local rank 0 (cudaMalloc), opened by the node's other ranks
//                   with cudaIpcOpenMemHandle; the handle travels through the host node channel's
//                   exchange area (NodeChannel::exchange, POSIX shared memory of mode 0600 that
//                   only this job's ranks map). Mapped once and reused; replaced only when a
//                   call needs more (at least doubling), closed by close().
//   fence           each rank records its IPC event (cudaEventInterprocess) on its stream, then
//                   the host barrier of the node channel (bounded, watches the peers' pids),
//                   then cudaStreamWaitEvent on every local peer's event. Two events per rank,
//                   alternated by fence parity, so a rank one fence ahead never re-records the
//                   event a slower peer has still to wait on.
//   counts          host memory, as HostContext (counts are host data: the caller's lists).
//   staging         private device memory, grown stream-ordered (cudaMallocAsync/FreeAsync).
//
// Why IPC events and not device-side flags: on one GPU shared by several processes (the test
// set-up, and any node without MPS) kernels of different processes time-slice, so a kernel
// spinning on a flag another process's kernel writes can wait for a time slice that never comes.
// An event wait is done by the GPU's scheduler, not by a resident kernel. Why legacy IPC
// (cudaIpcGetMemHandle) and not CUDA VMM with POSIX fds: the handle is 64 plain bytes that fit
// the node channel's shared memory, while a VMM fd must cross processes over a Unix socket or
// pidfd_getfd (ptrace rights); the one segment per node is a plain cudaMalloc, which legacy IPC
// covers. See docs/gpu.md.
//
// Host synchronisation: none on the data path. Replacing the segment (rare: the first call,
// then at least doubling) waits, bounded, for this rank's stream to finish with the old one,
// because cudaFree of an exported allocation must follow every importer's close.
//
// Compiled only with CUDA (PIPER_WITH_CUDA); in a CPU build create() raises kUsage
// "built without CUDA".
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "host/node_channel.hpp"
#include "runtime/exec_context.hpp"

namespace piper::cuda {

class CudaContext : public runtime::ExecContext {
 public:
  /// Collective over the node (every local rank, same order of calls): creates this rank's two
  /// IPC fence events, publishes their handles and opens its local peers'. channel: the node
  /// channel, or nullptr on a node of one rank (then the segment is private device memory and
  /// fences only order this rank's own stream). rank: this rank's global rank (for errors).
  /// device: the CUDA device ordinal this rank uses. Waits at most timeout_s.
  static std::unique_ptr<CudaContext> create(host::NodeChannel* channel, int64_t world_size,
                                             int64_t rank, int device, double timeout_s);

  /// The stream every later call orders its work on (a cudaStream_t as an integer; 0: the
  /// legacy default stream). The caller's stream: torch.cuda.current_stream().cuda_stream.
  void set_stream(uintptr_t stream) override = 0;
  virtual uintptr_t stream() const = 0;
  /// cudaStreamIsCapturing on the stream: a copy made while capturing keeps its copy table for
  /// the graph's life instead of recycling it.
  bool capturing() const override = 0;

  /// Releases what the node shares, collective over the node: importers close the segment and
  /// the peers' events, then a barrier, then the owner frees the segment (cudaFree of an
  /// exported allocation before every importer closed it is undefined behaviour). The stream
  /// last set must still exist; any later call raises kUsage. Bounded by timeout_s; if the
  /// barrier fails (a peer died or is late) the owner keeps the allocation, which the driver
  /// frees at process exit, and the error is raised. Idempotent. Without it the destructor
  /// releases only this rank's own resources and, on the owner, leaves the segment to process
  /// exit for the same reason.
  void close(const std::string& what, double timeout_s) override = 0;
};

}  // namespace piper::cuda
