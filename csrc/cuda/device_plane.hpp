// The device plane of an executor (runtime::DevicePlane): what CUDA calls run on, built
// collectively on the first one. Compiled only with CUDA (PIPER_WITH_CUDA); the bindings set
// the factory on every executor they make.
//
// Set-up, bounded by the first CUDA call's deadline: every rank says which device transport it
// can use (an all-gather over the host transport, which also carries rank 0's NCCL unique id);
// a disagreement raises the same PiperUsageError on every rank. Then the CUDA context
// (csrc/cuda/cuda_context.hpp; collective over the node) and the data transport:
//   PIPER_INTER=nccl  NcclTransport (nccl_transport.hpp); an error if NCCL cannot be loaded
//   PIPER_INTER=mpi   StagedTransport over the host transport (staged_transport.hpp)
//   unset ("auto")    NCCL when it loads, else staged
#pragma once

#include <memory>
#include <string>

#include "host/node_channel.hpp"
#include "runtime/executor.hpp"
#include "runtime/transport.hpp"

namespace piper::cuda {

struct DeviceOptions {
  std::string inter = "auto";                  // PIPER_INTER: auto | nccl | mpi
  std::string nccl_library;                    // libnccl.so.2 to load ("" the loader's search)
  host::NodeChannel* channel = nullptr;        // the node's channel (nullptr: one-rank node)
  std::shared_ptr<runtime::Transport> host;    // the executor's host transport
};

runtime::DevicePlaneFactory device_plane_factory(DeviceOptions options);

#ifdef PIPER_WITH_NCCL
/// Tests on hosts without a device: the same set-up round with PIPER_INTER=nccl, then a host
/// context (CUDA-interface arrays taken as host memory, _C.emulate_cuda_arrays) and an
/// NcclTransport on host memory, for a mock NCCL that moves host bytes
/// (tests/comm/mock_nccl.c): Piper's NCCL transport without a GPU.
runtime::DevicePlaneFactory host_memory_nccl_plane_factory(DeviceOptions options);
#endif

}  // namespace piper::cuda
