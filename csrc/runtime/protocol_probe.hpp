// The context protocol, observed: the order of ExecContext calls (publish_counts, fence,
// read_counts, ensure_segment, copy, ...) the algorithms of executor.cpp make, recorded on a CPU
// host. The CUDA context (csrc/cuda/cuda_context.hpp) relies on this order: its fences order
// device work across processes only at the points the algorithms fence, so a test checks that
// every read of the node segment follows a fence after every rank's writes to it
// (tests/gpu/test_cuda_context.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/call.hpp"

namespace piper::runtime {

struct ProbeResult {
  std::vector<std::vector<std::string>> traces;  // per rank: one line per context call
  std::vector<std::vector<uint8_t>> recv;        // per rank: its receive buffer after the call
};

/// Runs one Executor::alltoallv per rank of the topology node_of (node of each rank), every
/// rank a thread of this process: an in-process transport between them, each node's real
/// NodeChannel (POSIX shared memory) under a HostContext, wrapped by a context that records
/// each call. S: P x P row-major bytes (S[r * P + d]: rank r to rank d); rank r's block for d
/// holds the bytes (r * 31 + d * 7 + i) & 0xff, i = 0, 1, ... Trace lines:
///   "publish_counts", "read_counts", "fence <step>", "ensure_segment <bytes>", "segment",
///   "staging <bytes>", "copy <src>-><dst> <blocks> <bytes>" (buffers named send, recv,
///   segment, staging).
ProbeResult probe_protocol(const std::vector<int64_t>& node_of, const std::vector<int64_t>& S,
                           Algorithm algorithm);

}  // namespace piper::runtime
