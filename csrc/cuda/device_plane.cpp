#include "cuda/device_plane.hpp"

#include <cuda_runtime.h>

#include <cstring>

#include "common/error.hpp"
#include "cuda/check.hpp"
#include "cuda/cuda_context.hpp"
#include "cuda/staged_transport.hpp"
#include "runtime/exec_context.hpp"
#ifdef PIPER_WITH_NCCL
#include "cuda/nccl_transport.hpp"
#endif

namespace piper::cuda {

namespace {
enum Kind : int64_t { kStaged = 1, kNccl = 2 };
constexpr int64_t kIdWords = 16;  // NCCL's 128-byte unique id as int64 words
const char* kind_name(int64_t k) { return k == kNccl ? "NCCL" : "host staging"; }

// The set-up round's outcome: the data transport every rank agreed on (kStaged, kNccl) and,
// for NCCL, rank 0's unique id.
struct Agreed {
  int64_t kind;
  std::string nccl_id;
};

// Every rank says which device transport it can use (an all-gather over the host transport
// that also carries rank 0's NCCL unique id); a disagreement raises the same PiperUsageError
// on every rank.
Agreed agree_on_transport(runtime::Executor& ex, const DeviceOptions& opt, int device,
                          const runtime::Deadline& deadline, const std::string& what) {
  const int64_t P = ex.topology().size();
  if (opt.inter != "auto" && opt.inter != "nccl" && opt.inter != "mpi")
    throw Error(ErrorCode::kUsage, fmt("piper: ", what, ": PIPER_INTER=", opt.inter,
                                       " (expected nccl or mpi)"));
  int64_t kind = kStaged, version = 0;
  if (P > 1 && opt.inter != "mpi") {
#ifdef PIPER_WITH_NCCL
    try {
      version = load_nccl(opt.nccl_library);
      kind = kNccl;
    } catch (const Error&) {
      if (opt.inter == "nccl") throw;
    }
#else
    if (opt.inter == "nccl")
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", what, ": PIPER_INTER=nccl, but piper_comm._C was built ",
                      "without NCCL's header (install nvidia-nccl-cu13 and rebuild)"));
#endif
  }
  std::vector<int64_t> row(3 + kIdWords, 0);
  row[0] = kind, row[1] = device, row[2] = version;
#ifdef PIPER_WITH_NCCL
  if (kind == kNccl && opt.host->rank() == 0) std::memcpy(&row[3], nccl_unique_id().data(), kNcclIdBytes);
#endif
  const auto W = static_cast<int64_t>(row.size());
  const std::vector<int64_t> table = ex.allgather(row.data(), W, runtime::kDeviceTag, what,
                                                  deadline);
  for (int64_t r = 1; r < P; ++r)
    if (table[r * W] != table[0])
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", what, ": ranks disagree on the transport of device messages: ",
                      "rank 0 uses ", kind_name(table[0]), ", rank ", r, " ",
                      kind_name(table[r * W]), " (set PIPER_INTER alike on every rank, or ",
                      "make NCCL loadable everywhere) (raised on every rank)"));
  Agreed agreed{table[0], {}};
  if (agreed.kind == kNccl)
    agreed.nccl_id.assign(reinterpret_cast<const char*>(&table[3]), kIdWords * sizeof(int64_t));
  return agreed;
}

std::string set_up_what(const DeviceOptions& opt, int device) {
  return fmt("device plane set-up on rank ", opt.host->rank(), " (CUDA device ", device, ")");
}

}  // namespace

runtime::DevicePlaneFactory device_plane_factory(DeviceOptions opt) {
  return [opt](runtime::Executor& ex, int device, uintptr_t stream,
               const runtime::Deadline& deadline) {
    const int64_t P = ex.topology().size(), me = opt.host->rank();
    const std::string what = set_up_what(opt, device);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PIPER_CHECK_CUDA(cudaStreamIsCapturing(reinterpret_cast<cudaStream_t>(stream), &capture),
                     what + ": cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone)  // every rank captures the same call
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", what, ": the first CUDA call of a communicator builds its ",
                      "device plane (IPC segment, NCCL communicator) and cannot be captured in ",
                      "a CUDA graph: make one call of each shape before capturing"));
    const Agreed agreed = agree_on_transport(ex, opt, device, deadline, what);
    runtime::DevicePlane plane;
    plane.device = device;
    plane.context = CudaContext::create(opt.channel, P, me, device, deadline.left_s());
#ifdef PIPER_WITH_NCCL
    if (agreed.kind == kNccl) {
      plane.data = std::make_shared<NcclTransport>(agreed.nccl_id, P, me, device, deadline);
      return plane;
    }
#endif
    plane.data = std::make_shared<StagedTransport>(opt.host, device);
    return plane;
  };
}

#ifdef PIPER_WITH_NCCL
runtime::DevicePlaneFactory host_memory_nccl_plane_factory(DeviceOptions opt) {
  opt.inter = "nccl";
  return [opt](runtime::Executor& ex, int device, uintptr_t /*stream: host memory*/,
               const runtime::Deadline& deadline) {
    const int64_t P = ex.topology().size(), me = opt.host->rank();
    const Agreed agreed = agree_on_transport(ex, opt, device, deadline, set_up_what(opt, device));
    runtime::DevicePlane plane;
    plane.device = device;
    plane.context = std::make_unique<runtime::HostContext>(opt.channel, P);
    plane.data = std::make_shared<NcclTransport>(agreed.nccl_id, P, me, kNcclHostMemory,
                                                 deadline);
    return plane;
  };
}
#endif

}  // namespace piper::cuda
