#include "cuda/nccl_transport.hpp"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>

#include "common/error.hpp"
#include "cuda/check.hpp"

namespace piper::cuda {

static_assert(sizeof(ncclUniqueId) == kNcclIdBytes, "ncclUniqueId size");

namespace {

constexpr auto kPoll = std::chrono::microseconds(100);  // bounded polls of NCCL's state
constexpr double kWatchPoll_s = 0.05;  // how often the watchdog tests the groups' events

// NCCL's entry points, resolved from the library loaded at run time.
struct Api {
  decltype(&ncclGetVersion) get_version;
  decltype(&ncclGetUniqueId) get_unique_id;
  decltype(&ncclCommInitRankConfig) init_rank_config;
  decltype(&ncclCommGetAsyncError) get_async_error;
  decltype(&ncclCommFinalize) finalize;
  decltype(&ncclCommDestroy) destroy;
  decltype(&ncclCommAbort) abort;
  decltype(&ncclGroupStart) group_start;
  decltype(&ncclGroupEnd) group_end;
  decltype(&ncclSend) send;
  decltype(&ncclRecv) recv;
  decltype(&ncclGetErrorString) error_string;
  decltype(&ncclGetLastError) last_error;
  int version = 0;
};

Api api;
std::mutex load_mutex;

// The error class of an NCCL failure: a misuse (also NCCL refusing several ranks on one GPU
// without NCCL_MULTI_RANK_GPU_ENABLE), the machine, or a peer / the network.
ErrorCode error_code(ncclResult_t r) {
  switch (r) {
    case ncclInvalidArgument:
    case ncclInvalidUsage: return ErrorCode::kUsage;
    case ncclUnhandledCudaError:
    case ncclSystemError:
    case ncclInternalError: return ErrorCode::kSystem;
    default: return ErrorCode::kPeer;
  }
}

std::string describe(ncclResult_t r, ncclComm_t comm = nullptr) {
  std::string s = api.error_string ? api.error_string(r) : fmt("ncclResult ", static_cast<int>(r));
  if (api.last_error != nullptr) {
    const char* last = api.last_error(comm);
    if (last != nullptr && *last) s += fmt(" (", last, ")");
  }
  return s;
}

template <typename F>
void resolve(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (fn == nullptr)
    throw Error(ErrorCode::kUsage, fmt("piper: the NCCL library loaded lacks ", name,
                                       " (NCCL >= 2.18 is needed)"));
}

void* open_library(const std::string& library) {
  // The NCCL the process already loaded (torch's), by soname, first: one NCCL per process.
  if (void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD)) return lib;
  std::string tried;
  for (const std::string& name : {library, std::string("libnccl.so.2")}) {
    if (name.empty()) continue;
    if (void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL)) return lib;
    tried += fmt(tried.empty() ? "" : "; ", name, ": ", dlerror());
  }
  throw Error(ErrorCode::kUsage,
              fmt("piper: NCCL could not be loaded (", tried, "). Install the nvidia-nccl-cu13 ",
                  "(or -cu12) wheel, set PIPER_NCCL_LIBRARY to libnccl.so.2, or set ",
                  "PIPER_INTER=mpi to stage device messages through host memory"));
}

}  // namespace

int load_nccl(const std::string& library) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (api.version) return api.version;
  void* lib = open_library(library);
  resolve(lib, "ncclGetVersion", api.get_version);
  resolve(lib, "ncclGetUniqueId", api.get_unique_id);
  resolve(lib, "ncclCommInitRankConfig", api.init_rank_config);
  resolve(lib, "ncclCommGetAsyncError", api.get_async_error);
  resolve(lib, "ncclCommFinalize", api.finalize);
  resolve(lib, "ncclCommDestroy", api.destroy);
  resolve(lib, "ncclCommAbort", api.abort);
  resolve(lib, "ncclGroupStart", api.group_start);
  resolve(lib, "ncclGroupEnd", api.group_end);
  resolve(lib, "ncclSend", api.send);
  resolve(lib, "ncclRecv", api.recv);
  resolve(lib, "ncclGetErrorString", api.error_string);
  resolve(lib, "ncclGetLastError", api.last_error);
  int v = 0;
  if (const ncclResult_t r = api.get_version(&v); r != ncclSuccess)
    throw Error(ErrorCode::kSystem, fmt("piper: ncclGetVersion failed: ", describe(r)));
  api.version = v;
  return v;
}

std::string nccl_unique_id() {
  PIPER_HOST_ASSERT(api.version != 0);
  ncclUniqueId id;
  if (const ncclResult_t r = api.get_unique_id(&id); r != ncclSuccess)
    throw Error(ErrorCode::kSystem, fmt("piper: ncclGetUniqueId failed: ", describe(r)));
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

NcclTransport::NcclTransport(const std::string& unique_id, int64_t size, int64_t rank,
                             int device, const runtime::Deadline& deadline)
    : rank_(rank), size_(size), device_(device), timeout_s_(deadline.timeout_s) {
  PIPER_HOST_ASSERT(api.version != 0 && unique_id.size() == sizeof(ncclUniqueId));
  const std::string setup = fmt("NCCL communicator set-up on rank ", rank_, " (device ",
                                device_, ", ", size_, " ranks)");
  const Describe what = [&setup] { return setup; };
  set_device(what);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every wait below is ours, hence bounded
  ncclComm_t comm = nullptr;
  const ncclResult_t r = api.init_rank_config(&comm, static_cast<int>(size_), id,
                                              static_cast<int>(rank_), &config);
  comm_ = comm;
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm != nullptr) api.abort(comm);
    comm_ = nullptr;
    throw Error(error_code(r), fmt("piper: ", setup, ": ncclCommInitRankConfig: ",
                                   describe(r)));
  }
  while (!settled(what)) {
    if (std::chrono::steady_clock::now() >= deadline.at) {
      abort();
      throw Error(ErrorCode::kTimeout,
                  fmt("piper: ", setup, ": timed out after ", deadline.timeout_s,
                      " s waiting for the other ranks to join (set PIPER_TIMEOUT to change "
                      "the limit)"));
    }
    std::this_thread::sleep_for(kPoll);
  }
  if (device_ == kNcclHostMemory) return;
  runtime::Watchdog::Hooks hooks;
  hooks.done = [device = device_](void* e) {
    // The watchdog's thread never captures: relaxed, its queries cannot invalidate a graph
    // capture another thread runs in global mode.
    thread_local bool relaxed = false;
    if (!relaxed) {
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      relaxed = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
    }
    cudaSetDevice(device);
    const cudaError_t r = cudaEventQuery(static_cast<cudaEvent_t>(e));
    if (r == cudaErrorNotReady) return false;
    cudaGetLastError();  // an error is the stream's, raised by the caller's next CUDA call
    return true;
  };
  hooks.release = [this](void* e) {
    std::lock_guard<std::mutex> lock(events_mutex_);
    free_events_.push_back(e);
  };
  hooks.expire = [this](const std::string& why) { expire(why); };
  watchdog_ = std::make_unique<runtime::Watchdog>(timeout_s_, kWatchPoll_s, std::move(hooks));
}

NcclTransport::~NcclTransport() {
  // Without close() (interpreter exit, an error): abort, which never waits for peers (once:
  // cancel_all may have aborted it already).
  stop_watchdog();
  std::lock_guard<std::mutex> lock(mutex_);
  abort();
  if (!all_events_.empty()) {
    cudaSetDevice(device_);
    for (void* e : all_events_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
    cudaGetLastError();
  }
}

bool NcclTransport::abort() {
  const bool now = comm_ != nullptr && !broken_ && !captured_;
  if (now) api.abort(static_cast<ncclComm_t>(comm_));
  broken_ = true;
  return now;
}

void NcclTransport::stop_watchdog() {
  if (watchdog_) watchdog_->stop();
}

void NcclTransport::watch_group(const std::string& what) {
  auto stream = reinterpret_cast<cudaStream_t>(stream_);
  cudaEvent_t e = nullptr;
  {
    std::lock_guard<std::mutex> lock(events_mutex_);
    if (!free_events_.empty()) {
      e = static_cast<cudaEvent_t>(free_events_.back());
      free_events_.pop_back();
    }
  }
  if (e == nullptr) {
    PIPER_CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming),
                     what + ": cudaEventCreate");
    std::lock_guard<std::mutex> lock(events_mutex_);
    all_events_.push_back(e);
    free_events_.reserve(all_events_.size());  // release (the watchdog's thread) never allocates
  }
  const cudaError_t r = cudaEventRecord(e, stream);
  if (r != cudaSuccess) {
    std::lock_guard<std::mutex> lock(events_mutex_);
    free_events_.push_back(e);
  }
  PIPER_CHECK_CUDA(r, what + ": cudaEventRecord");
  watchdog_->watch(e, what);
}

void NcclTransport::expire(const std::string& why) {
  std::string msg;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (broken_) return;  // aborted by the executor meanwhile: its error is the one raised
    const bool aborted = abort();
    msg = fmt("piper: rank ", rank_, ": ", why, " on the device (PIPER_TIMEOUT): a peer ",
              "skipped the call, is stuck or died. ",
              aborted ? "The NCCL communicator was aborted (its kernels end; the results of "
                        "this and later device work on it are undefined)"
                      : "The NCCL communicator is left to process exit (a CUDA graph captured "
                        "work on it)",
              "; every later call on it raises this error");
    expired_ = msg;
  }
  std::fprintf(stderr, "%s\n", msg.c_str());  // the caller may be blocked in a device sync
  std::fflush(stderr);
}

std::string NcclTransport::name() const {
  return fmt("nccl ", api.version / 10000, ".", api.version / 100 % 100, ".", api.version % 100);
}

void NcclTransport::check_usable(const char* what) const {
  if (!expired_.empty()) throw Error(ErrorCode::kTimeout, expired_);
  if (broken_ || comm_ == nullptr)
    throw Error(ErrorCode::kUsage,
                fmt("piper: rank ", rank_, ": ", what, " on an NCCL communicator that was ",
                    comm_ == nullptr ? "closed" : "aborted after an error"));
}

void NcclTransport::set_device(const Describe& what) const {
  if (device_ != kNcclHostMemory)
    PIPER_CHECK_CUDA(cudaSetDevice(device_), what() + ": cudaSetDevice");
}

bool NcclTransport::settled(const Describe& what) {
  ncclResult_t state = ncclSuccess;
  const ncclResult_t r = api.get_async_error(static_cast<ncclComm_t>(comm_), &state);
  if (r != ncclSuccess) state = r;
  if (state == ncclInProgress) return false;
  if (state != ncclSuccess) {
    const std::string why = describe(state, static_cast<ncclComm_t>(comm_));
    abort();
    throw Error(error_code(state), fmt("piper: ", what(), ": NCCL reports ", why));
  }
  return true;
}

void NcclTransport::post_send(const void* buf, int64_t bytes, int64_t peer, int tag) {
  (void)tag;
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable("a send");
  batch_.push_back({{true, peer, bytes}, const_cast<void*>(buf)});
}

void NcclTransport::post_recv(void* buf, int64_t bytes, int64_t peer, int tag) {
  (void)tag;
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable("a receive");
  batch_.push_back({{false, peer, bytes}, buf});
}

bool NcclTransport::test_all() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (batch_.empty()) return true;
  check_usable("a group");  // also mid-enqueue: the watchdog may have aborted meanwhile
  // Formatted only for an error: test_all is polled while NCCL enqueues.
  const Describe what = [this] { return fmt("rank ", rank_, ": NCCL group of ", batch_.size(),
                                            " messages"); };
  if (!enqueued_) {
    set_device(what);
    auto comm = static_cast<ncclComm_t>(comm_);
    auto stream = reinterpret_cast<cudaStream_t>(stream_);
    if (device_ != kNcclHostMemory) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      PIPER_CHECK_CUDA(cudaStreamIsCapturing(stream, &capture),
                       what() + ": cudaStreamIsCapturing");
      captured_ = captured_ || capture != cudaStreamCaptureStatusNone;
    }
    auto ok = [](ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; };
    ncclResult_t r = api.group_start();
    for (const Posted& p : batch_) {
      if (!ok(r) || p.m.bytes == 0) continue;  // both sides skip empty messages
      const auto n = static_cast<size_t>(p.m.bytes);
      const int peer = static_cast<int>(p.m.peer);
      r = p.m.send ? api.send(p.buf, n, ncclUint8, peer, comm, stream)
                   : api.recv(p.buf, n, ncclUint8, peer, comm, stream);
    }
    const ncclResult_t end = api.group_end();
    if (ok(r)) r = end;
    if (!ok(r)) {
      const std::string why = describe(r, comm);
      abort();  // the batch stays: the executor names it
      throw Error(error_code(r), fmt("piper: ", what(), ": ", why));
    }
    enqueued_ = true;
  }
  if (!settled(what)) return false;  // non-blocking: NCCL is still enqueuing
  if (watchdog_ && !captured_) watch_group(describe_group());  // a failure keeps the batch
  batch_.clear();
  enqueued_ = false;
  return true;
}

std::string NcclTransport::describe_group() {
  for (const Posted& p : batch_) summary_.add(p.m);
  return fmt("NCCL group ", ++groups_, " of ", summary_.take());
}

std::vector<runtime::Message> NcclTransport::pending() const {
  std::vector<runtime::Message> out;
  for (const Posted& p : batch_) out.push_back(p.m);
  return out;
}

void NcclTransport::cancel_all() {
  stop_watchdog();  // the abort below ends the watched work
  std::lock_guard<std::mutex> lock(mutex_);
  batch_.clear();
  enqueued_ = false;
  abort();
}

void NcclTransport::close(const std::string& what, double timeout_s) {
  stop_watchdog();  // finalize below waits for the groups' work, bounded by timeout_s
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr) return;
  auto comm = static_cast<ncclComm_t>(comm_);
  if (broken_) {  // aborted: nothing left to finalize
    comm_ = nullptr;
    return;
  }
  if (device_ != kNcclHostMemory) cudaSetDevice(device_);
  // ncclCommFinalize flushes the communicator's work, collectively; bounded here.
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  ncclResult_t r = api.finalize(comm);
  while (r == ncclSuccess || r == ncclInProgress) {
    ncclResult_t state = ncclSuccess;
    if (const ncclResult_t q = api.get_async_error(comm, &state); q != ncclSuccess) state = q;
    if (state != ncclInProgress) {
      r = state;
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      abort();
      comm_ = nullptr;
      throw Error(ErrorCode::kTimeout,
                  fmt("piper: ", what, ": rank ", rank_, " timed out after ", timeout_s,
                      " s finalizing the NCCL communicator (",
                      captured_ ? "a CUDA graph that captured Piper calls may still be alive: "
                                  "destroy such graphs before close(); the communicator is "
                                  "left to process exit"
                                : "a peer did not close",
                      ")"));
    }
    std::this_thread::sleep_for(kPoll);
  }
  if (r != ncclSuccess) {
    abort();
    comm_ = nullptr;
    throw Error(error_code(r), fmt("piper: ", what, ": rank ", rank_, ": ncclCommFinalize: ",
                                   describe(r)));
  }
  api.destroy(comm);
  comm_ = nullptr;
}

}  // namespace piper::cuda
