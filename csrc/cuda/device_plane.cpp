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
// kNoNccl: PIPER_INTER=nccl, and NCCL did not load on this rank
enum Kind : int64_t { kStaged = 1, kNccl = 2, kNoNccl = 3 };
enum Column : int64_t { kKind, kDevice, kVersion, kCapturing, kId };  // of the set-up row
constexpr int64_t kIdWords = 16;  // NCCL's 128-byte unique id as int64 words
#ifdef PIPER_WITH_NCCL
static_assert(kIdWords * sizeof(int64_t) == kNcclIdBytes, "NCCL unique id size");
#endif
const char* kind_name(int64_t k) {
  return k == kNccl ? "NCCL" : k == kNoNccl ? "NCCL (not loadable)" : "host staging";
}

// The ranks whose row has `value` in `column`, as "1, 3".
std::string ranks_with(const std::vector<int64_t>& table, int64_t P, int64_t W, Column column,
                       int64_t value) {
  std::string out;
  for (int64_t r = 0; r < P; ++r)
    if (table[r * W + column] == value) out += fmt(out.empty() ? "" : ", ", r);
  return out;
}

// The set-up round's outcome: the data transport every rank agreed on (kStaged, kNccl) and,
// for NCCL, rank 0's unique id.
struct Agreed {
  int64_t kind;
  std::string nccl_id;
};

// Every rank says which device transport it can use and whether its stream is capturing a
// CUDA graph (an all-gather over the host transport that also carries rank 0's NCCL unique
// id). A capture, NCCL missing under PIPER_INTER=nccl, or a disagreement raises the same
// PiperUsageError on every rank, naming the ranks (a rank's own reason added on that rank).
Agreed agree_on_transport(runtime::Executor& ex, const DeviceOptions& opt, int device,
                          bool capturing, const runtime::Deadline& deadline,
                          const std::string& what) {
  const int64_t P = ex.topology().size();
  if (opt.inter != "auto" && opt.inter != "nccl" && opt.inter != "mpi")
    throw Error(ErrorCode::kUsage, fmt("piper: ", what, ": PIPER_INTER=", opt.inter,
                                       " (expected nccl or mpi)"));
  int64_t kind = kStaged, version = 0;
  std::string why_not;  // this rank's reason for kNoNccl
  if (P > 1 && opt.inter != "mpi") {
#ifdef PIPER_WITH_NCCL
    try {
      version = load_nccl(opt.nccl_library);
      kind = kNccl;
    } catch (const Error& e) {
      if (opt.inter == "nccl") kind = kNoNccl, why_not = e.what();
    }
#else
    if (opt.inter == "nccl")
      kind = kNoNccl, why_not = "piper_comm._C was built without NCCL's header (install "
                                "nvidia-nccl-cu13 and rebuild)";
#endif
  }
  std::vector<int64_t> row(kId + kIdWords, 0);
  row[kKind] = kind, row[kDevice] = device, row[kVersion] = version;
  row[kCapturing] = capturing;
#ifdef PIPER_WITH_NCCL
  if (kind == kNccl && opt.host->rank() == 0 && !capturing)
    std::memcpy(&row[kId], nccl_unique_id().data(), kNcclIdBytes);
#endif
  const auto W = static_cast<int64_t>(row.size());
  const std::vector<int64_t> table = ex.allgather(row.data(), W, runtime::kDeviceTag, what,
                                                  deadline);
  if (const std::string r = ranks_with(table, P, W, kCapturing, 1); !r.empty())
    throw Error(ErrorCode::kUsage,
                fmt("piper: ", what, ": the first CUDA call of a communicator builds its device ",
                    "plane (IPC segment, NCCL communicator) and cannot be captured in a CUDA ",
                    "graph (rank(s) ", r, " capturing): make one call of each shape before ",
                    "capturing (raised on every rank)"));
  if (const std::string r = ranks_with(table, P, W, kKind, kNoNccl); !r.empty())
    throw Error(ErrorCode::kUsage,
                fmt("piper: ", what, ": PIPER_INTER=nccl, but NCCL is not usable on rank(s) ", r,
                    " (raised on every rank)", why_not.empty() ? "" : ": ", why_not));
  for (int64_t r = 1; r < P; ++r)
    if (table[r * W + kKind] != table[kKind])
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", what, ": ranks disagree on the transport of device messages: ",
                      "rank 0 uses ", kind_name(table[kKind]), ", rank ", r, " ",
                      kind_name(table[r * W + kKind]), " (set PIPER_INTER alike on every rank, ",
                      "or make NCCL loadable everywhere) (raised on every rank)"));
  Agreed agreed{table[kKind], {}};
  if (agreed.kind == kNccl)
    agreed.nccl_id.assign(reinterpret_cast<const char*>(&table[kId]),
                          kIdWords * sizeof(int64_t));
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
    const Agreed agreed = agree_on_transport(ex, opt, device,
                                             capture != cudaStreamCaptureStatusNone, deadline,
                                             what);
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
    const Agreed agreed = agree_on_transport(ex, opt, device, false, deadline,
                                             set_up_what(opt, device));
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
