// CudaContext over CUDA IPC (the design and its reasons: cuda_context.hpp, docs/gpu.md).
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/error.hpp"
#include "cuda/api.hpp"
#include "cuda/cuda_context.hpp"
#include "cuda/ipc_record.hpp"
#include "cuda/pack.hpp"

namespace piper::cuda {

static_assert(kIpcHandleBytes == CUDA_IPC_HANDLE_SIZE, "IPC handle size");
static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes, "cudaIpcMemHandle_t size");
static_assert(sizeof(cudaIpcEventHandle_t) == kIpcHandleBytes, "cudaIpcEventHandle_t size");
static_assert(static_cast<int64_t>(sizeof(IpcRecord)) <= host::NodeChannel::kExchangeBytes,
              "IpcRecord must fit the node channel's exchange area");

namespace {

constexpr auto kStreamPoll = std::chrono::microseconds(200);  // bounded stream-drain poll

// One staged copy table: pinned host memory, its device copy, and the event after the kernel
// that read it (the slot is free again once that event completed).
struct TableSlot {
  int64_t* host = nullptr;
  int64_t* device = nullptr;
  int64_t capacity = 0;  // int64 entries
  cudaEvent_t done = nullptr;
};

class IpcCudaContext final : public CudaContext {
 public:
  IpcCudaContext(host::NodeChannel* channel, int64_t world_size, int64_t rank, int device,
                 double timeout_s);
  ~IpcCudaContext() override;

  void copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
            const plan::CopyList& blocks) override;
  void fence(const std::string& what, double timeout_s) override;
  void publish_counts(int64_t seq, const std::vector<int64_t>& row) override {
    counts_.publish_counts(seq, row);
  }
  std::vector<int64_t> read_counts(int64_t seq) const override { return counts_.read_counts(seq); }
  void ensure_segment(int64_t bytes, const std::string& what, double timeout_s) override;
  uint8_t* segment() const override { return segment_; }
  int64_t segment_bytes() const override { return segment_bytes_; }
  uint8_t* staging(int64_t bytes) override;
  int64_t local_size() const override { return channel_ ? channel_->local_size() : 1; }

  void set_stream(uintptr_t stream) override { stream_ = reinterpret_cast<cudaStream_t>(stream); }
  uintptr_t stream() const override { return reinterpret_cast<uintptr_t>(stream_); }
  bool capturing() const override;
  void close(const std::string& what, double timeout_s) override;

 private:
  void open(double timeout_s);  // the constructor's work: events, handles, the peers' events
  void check_open(const std::string& what) const;
  bool owner() const { return channel_ == nullptr || channel_->local_rank() == 0; }
  int64_t global_rank(int64_t l) const { return channel_->rank_of(l); }
  void use_device() const;
  void drain_stream(const std::string& what, double timeout_s) const;
  void release_segment();  // this rank's mapping or allocation of the segment
  void release_local();    // events, tables, staging: what only this rank uses
  TableSlot& free_slot(int64_t entries);

  host::NodeChannel* channel_;
  runtime::HostContext counts_;
  int64_t rank_;
  int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t events_[kFenceEvents] = {};
  std::vector<std::array<cudaEvent_t, kFenceEvents>> peer_events_;  // [local rank][parity]
  uint64_t fences_ = 0;
  uint8_t* segment_ = nullptr;  // owner: cudaMalloc; others: cudaIpcOpenMemHandle
  int64_t segment_bytes_ = 0, segment_gen_ = 0;
  uint8_t* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
  std::vector<TableSlot> tables_;
  std::vector<TableSlot> captured_;  // tables read by captured graphs: kept until release
  // A grown table's old buffers, freed at release: cudaFree waits for the whole device, which
  // may be running another rank's NCCL kernel that waits for a peer (no deadline there).
  std::vector<TableSlot> retired_;
  bool closed_ = false;
  // Set when close() timed out on this rank's stream: the work on the device is stuck, and
  // cudaFree/cudaFreeHost/cudaIpcCloseMemHandle would wait for it with no deadline, so the
  // buffers are left to process exit.
  bool stuck_ = false;
};

void IpcCudaContext::check_open(const std::string& what) const {
  if (closed_)
    throw Error(ErrorCode::kUsage, fmt("piper: ", what, ": the CUDA context of rank ", rank_,
                                       " was closed"));
}

void IpcCudaContext::use_device() const {
  PIPER_CHECK_CUDA(cudaSetDevice(device_), fmt("cudaSetDevice(", device_, ") on rank ", rank_));
}

IpcCudaContext::IpcCudaContext(host::NodeChannel* channel, int64_t world_size, int64_t rank,
                               int device, double timeout_s)
    : channel_(channel), counts_(channel, world_size), rank_(rank), device_(device) {
  try {
    open(timeout_s);
  } catch (...) {  // the destructor does not run for a half-built object
    release_local();
    cudaGetLastError();
    throw;
  }
}

void IpcCudaContext::open(double timeout_s) {
  use_device();
  const std::string what = fmt("CudaContext on rank ", rank_, " (device ", device_, ")");
  for (auto& e : events_)
    PIPER_CHECK_CUDA(
        cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventInterprocess),
        what + ": cudaEventCreateWithFlags(interprocess)");
  if (channel_ == nullptr) return;

  int ipc_events = 0;
  PIPER_CHECK_CUDA(cudaDeviceGetAttribute(&ipc_events, cudaDevAttrIpcEventSupport, device_),
                   what + ": cudaDeviceGetAttribute(IpcEventSupport)");
  if (!ipc_events)
    throw Error(ErrorCode::kUsage, fmt("piper: ", what, ": the device does not support IPC ",
                                       "events, which the node fences need"));
  IpcRecord mine = empty_record();
  mine.pid = getpid();
  mine.device = device_;
  cudaDeviceGetPCIBusId(mine.bus_id, sizeof(mine.bus_id), device_);
  for (int p = 0; p < kFenceEvents; ++p) {
    cudaIpcEventHandle_t h;
    PIPER_CHECK_CUDA(cudaIpcGetEventHandle(&h, events_[p]), what + ": cudaIpcGetEventHandle");
    std::memcpy(mine.event_handles[p], &h, kIpcHandleBytes);
  }
  const int64_t me = channel_->local_rank(), L = channel_->local_size();
  write_record(channel_->exchange(me), host::NodeChannel::kExchangeBytes, mine);
  channel_->barrier(what + " (IPC event handles published)", timeout_s);

  // A handle is never opened in the process that created it (that fails).
  peer_events_.assign(L, {});
  for (int64_t l = 0; l < L; ++l) {
    if (l == me) continue;
    const IpcRecord r = read_record(channel_->exchange(l), host::NodeChannel::kExchangeBytes,
                                    global_rank(l), what);
    for (int p = 0; p < kFenceEvents; ++p) {
      cudaIpcEventHandle_t h;
      std::memcpy(&h, r.event_handles[p], kIpcHandleBytes);
      PIPER_CHECK_CUDA(cudaIpcOpenEventHandle(&peer_events_[l][p], h),
                       fmt(what, ": cudaIpcOpenEventHandle of rank ", global_rank(l), " (device ",
                           r.device, ", bus ", r.bus_id, ")"));
    }
  }
}

IpcCudaContext::~IpcCudaContext() {
  // Errors are ignored here: a destructor cannot report them and the process may be exiting.
  cudaSetDevice(device_);
  if (!closed_) {
    if (!owner() && segment_ != nullptr && !stuck_) cudaIpcCloseMemHandle(segment_);
    segment_ = nullptr;  // the owner's allocation is left to process exit (see close())
  }
  release_local();
  cudaGetLastError();
}

void IpcCudaContext::release_local() {
  for (auto& row : peer_events_)
    for (auto& e : row)
      if (e != nullptr) cudaEventDestroy(e), e = nullptr;
  for (auto& e : events_)
    if (e != nullptr) cudaEventDestroy(e), e = nullptr;
  for (auto* list : {&tables_, &captured_, &retired_}) {
    for (auto& t : *list) {
      if (t.done) cudaEventDestroy(t.done);
      if (stuck_) continue;  // left to process exit (see stuck_)
      if (t.host) cudaFreeHost(t.host);
      if (t.device) cudaFree(t.device);
    }
    list->clear();
  }
  // cudaFree, not cudaFreeAsync: the caller's stream may no longer exist here.
  if (staging_ != nullptr && !stuck_) cudaFree(staging_);
  staging_ = nullptr;
  staging_bytes_ = 0;
}

void IpcCudaContext::release_segment() {
  if (segment_ == nullptr) return;
  if (owner())
    PIPER_CHECK_CUDA(cudaFree(segment_), fmt("cudaFree of the node segment on rank ", rank_));
  else
    PIPER_CHECK_CUDA(cudaIpcCloseMemHandle(segment_),
                     fmt("cudaIpcCloseMemHandle of the node segment on rank ", rank_));
  segment_ = nullptr;
  segment_bytes_ = 0;
}

// NOTE: host sync, bounded; only before the segment is replaced or released.
void IpcCudaContext::drain_stream(const std::string& what, double timeout_s) const {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  for (;;) {
    const cudaError_t err = cudaStreamQuery(stream_);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotReady)
      PIPER_CHECK_CUDA(err, fmt(what, ": cudaStreamQuery on rank ", rank_));
    if (std::chrono::steady_clock::now() >= deadline)
      throw Error(ErrorCode::kTimeout,
                  fmt("piper: ", what, ": rank ", rank_, " timed out after ", timeout_s,
                      " s waiting for its stream to finish with the node segment of ",
                      segment_bytes_, " B (set PIPER_TIMEOUT to change the limit)"));
    std::this_thread::sleep_for(kStreamPoll);
  }
}

TableSlot& IpcCudaContext::free_slot(int64_t entries) {
  TableSlot* slot = nullptr;
  for (auto& t : tables_) {
    const cudaError_t err = cudaEventQuery(t.done);
    if (err == cudaSuccess) {
      slot = &t;
      break;
    }
    if (err != cudaErrorNotReady)
      PIPER_CHECK_CUDA(err, fmt("cudaEventQuery of a copy table on rank ", rank_));
  }
  if (slot == nullptr) {  // every slot is still in flight: add one rather than wait
    tables_.emplace_back();
    slot = &tables_.back();
    PIPER_CHECK_CUDA(cudaEventCreateWithFlags(&slot->done, cudaEventDisableTiming),
                     fmt("cudaEventCreate for a copy table on rank ", rank_));
  }
  if (slot->capacity < entries) {  // its event completed: nothing reads the old buffers
    const int64_t cap = std::max<int64_t>(entries, 2 * slot->capacity);
    if (slot->host || slot->device) retired_.push_back({slot->host, slot->device, 0, nullptr});
    slot->host = nullptr, slot->device = nullptr, slot->capacity = 0;
    PIPER_CHECK_CUDA(cudaMallocHost(&slot->host, cap * sizeof(int64_t)),
                     fmt("cudaMallocHost of a ", cap * 8, " B copy table on rank ", rank_));
    PIPER_CHECK_CUDA(cudaMalloc(&slot->device, cap * sizeof(int64_t)),
                     fmt("cudaMalloc of a ", cap * 8, " B copy table on rank ", rank_));
    slot->capacity = cap;
  }
  return *slot;
}

bool IpcCudaContext::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  PIPER_CHECK_CUDA(cudaStreamIsCapturing(stream_, &status),
                   fmt("cudaStreamIsCapturing on rank ", rank_));
  return status == cudaStreamCaptureStatusActive;
}

void IpcCudaContext::copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
                          const plan::CopyList& blocks) {
  const std::string what = fmt("cuda copy on rank ", rank_);
  const std::vector<int64_t> table = device_table(blocks, src_bytes, dst_bytes, what);
  const int64_t n = static_cast<int64_t>(table.size()) / 3;
  if (n == 0) return;
  check_open(what);
  use_device();
  if (capturing()) {
    // A graph replays the upload from this table: it gets its own, kept until close, and no
    // event (an event recorded during capture cannot be queried outside the graph).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;  // allocations are legal now
    PIPER_CHECK_CUDA(cudaThreadExchangeStreamCaptureMode(&mode), what + ": capture mode");
    TableSlot slot;
    const cudaError_t a = cudaMallocHost(&slot.host, table.size() * sizeof(int64_t));
    const cudaError_t b = a == cudaSuccess
                              ? cudaMalloc(&slot.device, table.size() * sizeof(int64_t))
                              : a;
    PIPER_CHECK_CUDA(cudaThreadExchangeStreamCaptureMode(&mode), what + ": capture mode");
    if (slot.host != nullptr || slot.device != nullptr) captured_.push_back(slot);
    PIPER_CHECK_CUDA(b, fmt(what, ": a ", table.size() * 8, " B copy table for a CUDA graph"));
    std::memcpy(slot.host, table.data(), table.size() * sizeof(int64_t));
    PIPER_CHECK_CUDA(cudaMemcpyAsync(slot.device, slot.host, table.size() * sizeof(int64_t),
                                     cudaMemcpyHostToDevice, stream_),
                     what + ": cudaMemcpyAsync of the copy table (captured)");
    copy_blocks(src, dst, slot.device, n, reinterpret_cast<uintptr_t>(stream_));
    return;
  }
  TableSlot& slot = free_slot(3 * n);
  std::memcpy(slot.host, table.data(), table.size() * sizeof(int64_t));
  PIPER_CHECK_CUDA(cudaMemcpyAsync(slot.device, slot.host, table.size() * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, stream_),
                   what + ": cudaMemcpyAsync of the copy table");
  copy_blocks(src, dst, slot.device, n, reinterpret_cast<uintptr_t>(stream_));
  PIPER_CHECK_CUDA(cudaEventRecord(slot.done, stream_), what + ": cudaEventRecord");
}

void IpcCudaContext::fence(const std::string& what, double timeout_s) {
  check_open(what);
  if (channel_ == nullptr) return;  // one rank: its stream orders everything
  use_device();
  const int parity = static_cast<int>(fences_++ % kFenceEvents);
  PIPER_CHECK_CUDA(cudaEventRecord(events_[parity], stream_),
                   fmt(what, ": cudaEventRecord of the fence event on rank ", rank_));
  channel_->barrier(what, timeout_s);
  for (int64_t l = 0; l < channel_->local_size(); ++l) {
    if (l == channel_->local_rank()) continue;
    PIPER_CHECK_CUDA(cudaStreamWaitEvent(stream_, peer_events_[l][parity], 0),
                     fmt(what, ": cudaStreamWaitEvent on rank ", rank_, " for rank ",
                         global_rank(l)));
  }
}

void IpcCudaContext::ensure_segment(int64_t bytes, const std::string& what, double timeout_s) {
  if (bytes <= segment_bytes_) return;
  check_open(what);
  use_device();
  const int64_t new_bytes = grown_segment_bytes(bytes, segment_bytes_);
  const std::string grow = fmt(what, " (grow the node's device segment to ", new_bytes, " B)");
  if (segment_ != nullptr) drain_stream(grow, timeout_s);
  if (channel_ == nullptr) {
    release_segment();
    PIPER_CHECK_CUDA(cudaMalloc(&segment_, new_bytes),
                     fmt(grow, ": cudaMalloc on rank ", rank_));
    segment_bytes_ = new_bytes;
    return;
  }
  const int64_t me = channel_->local_rank();
  const int64_t gen = ++segment_gen_;
  // 1. Importers close the old mapping; the owner frees it only after every close.
  if (!owner()) release_segment();
  channel_->barrier(grow + " (old segment closed)", timeout_s);
  if (owner()) {
    IpcRecord r = read_record(channel_->exchange(me), host::NodeChannel::kExchangeBytes, rank_,
                              grow);
    r.segment_gen = gen;
    r.segment_bytes = new_bytes;
    r.error[0] = '\0';
    try {
      release_segment();
      PIPER_CHECK_CUDA(cudaMalloc(&segment_, new_bytes), "cudaMalloc");
      cudaIpcMemHandle_t h;
      PIPER_CHECK_CUDA(cudaIpcGetMemHandle(&h, segment_), "cudaIpcGetMemHandle");
      std::memcpy(r.segment_handle, &h, kIpcHandleBytes);
      segment_bytes_ = new_bytes;
    } catch (const Error& e) {  // published, so the peers raise it too instead of waiting
      std::strncpy(r.error, e.what(), sizeof(r.error) - 1);
      segment_ = nullptr;
      segment_bytes_ = 0;
      cudaGetLastError();
    }
    write_record(channel_->exchange(me), host::NodeChannel::kExchangeBytes, r);
  }
  // 2. The owner's handle is published; the others open it.
  channel_->barrier(grow + " (new segment published)", timeout_s);
  const IpcRecord r = read_record(channel_->exchange(0), host::NodeChannel::kExchangeBytes,
                                  global_rank(0), grow);
  check_segment(r, global_rank(0), gen, new_bytes, grow);
  if (!owner()) {
    cudaIpcMemHandle_t h;
    std::memcpy(&h, r.segment_handle, kIpcHandleBytes);
    void* p = nullptr;
    PIPER_CHECK_CUDA(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess),
                     fmt(grow, ": cudaIpcOpenMemHandle on rank ", rank_, " of rank ",
                         global_rank(0), "'s segment (device ", r.device, ", bus ", r.bus_id,
                         ")"));
    segment_ = static_cast<uint8_t*>(p);
    segment_bytes_ = r.segment_bytes;
  }
}

uint8_t* IpcCudaContext::staging(int64_t bytes) {
  if (bytes <= staging_bytes_) return staging_;
  check_open("cuda staging");
  use_device();
  const int64_t new_bytes = std::max(bytes, 2 * staging_bytes_);
  // Stream-ordered: work already queued on the stream still reads the old buffer safely.
  if (staging_ != nullptr)
    PIPER_CHECK_CUDA(cudaFreeAsync(staging_, stream_), fmt("cudaFreeAsync of staging on rank ",
                                                           rank_));
  staging_ = nullptr;
  staging_bytes_ = 0;
  void* p = nullptr;
  PIPER_CHECK_CUDA(cudaMallocAsync(&p, new_bytes, stream_),
                   fmt("cudaMallocAsync of ", new_bytes, " B of staging on rank ", rank_));
  staging_ = static_cast<uint8_t*>(p);
  staging_bytes_ = new_bytes;
  return staging_;
}

void IpcCudaContext::close(const std::string& what, double timeout_s) {
  if (closed_) return;
  use_device();
  try {
    if (segment_ != nullptr) drain_stream(what, timeout_s);
  } catch (const Error& e) {
    stuck_ = e.code() == ErrorCode::kTimeout;  // the destructor must not wait (see stuck_)
    throw;
  }
  if (!owner()) release_segment();
  for (auto& row : peer_events_)
    for (auto& e : row)
      if (e != nullptr) cudaEventDestroy(e), e = nullptr;
  if (channel_ != nullptr) channel_->barrier(what + " (CUDA IPC handles closed)", timeout_s);
  closed_ = true;  // from here the owner may free: every importer has closed
  release_segment();
}

}  // namespace

std::unique_ptr<CudaContext> CudaContext::create(host::NodeChannel* channel, int64_t world_size,
                                                 int64_t rank, int device, double timeout_s) {
  return std::make_unique<IpcCudaContext>(channel, world_size, rank, device, timeout_s);
}

}  // namespace piper::cuda
