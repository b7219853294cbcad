#include "cuda/staged_transport.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "common/error.hpp"
#include "cuda/check.hpp"

namespace piper::cuda {

namespace {
constexpr auto kPoll = std::chrono::microseconds(50);
cudaEvent_t event(void* e) { return static_cast<cudaEvent_t>(e); }
}  // namespace

StagedTransport::StagedTransport(std::shared_ptr<runtime::Transport> host, int device)
    : host_(std::move(host)), device_(device) {
  PIPER_CHECK_CUDA(cudaSetDevice(device_), fmt("cudaSetDevice(", device_, ")"));
  cudaEvent_t a = nullptr, b = nullptr;
  PIPER_CHECK_CUDA(cudaEventCreateWithFlags(&a, cudaEventDisableTiming), "cudaEventCreate");
  copied_out_ = a;
  PIPER_CHECK_CUDA(cudaEventCreateWithFlags(&b, cudaEventDisableTiming), "cudaEventCreate");
  copied_in_ = b;
}

StagedTransport::~StagedTransport() { release(); }

void StagedTransport::release() {
  cudaSetDevice(device_);
  if (pinned_ != nullptr) cudaFreeHost(pinned_), pinned_ = nullptr;
  pinned_bytes_ = 0;
  if (copied_out_ != nullptr) cudaEventDestroy(event(copied_out_)), copied_out_ = nullptr;
  if (copied_in_ != nullptr) cudaEventDestroy(event(copied_in_)), copied_in_ = nullptr;
  cudaGetLastError();
}

void StagedTransport::post_send(const void* buf, int64_t bytes, int64_t peer, int tag) {
  batch_.push_back({true, static_cast<uint8_t*>(const_cast<void*>(buf)), bytes, peer, 0, tag});
}

void StagedTransport::post_recv(void* buf, int64_t bytes, int64_t peer, int tag) {
  batch_.push_back({false, static_cast<uint8_t*>(buf), bytes, peer, 0, tag});
}

bool StagedTransport::advance() {
  // Formatted only for an error: advance() is polled while the copies and messages run.
  auto what = [this] { return fmt("host staging of device messages on rank ", rank()); };
  auto stream = reinterpret_cast<cudaStream_t>(stream_);
  if (step_ == Step::kIdle) {
    if (batch_.empty()) return true;
    if (copied_out_ == nullptr)
      throw Error(ErrorCode::kUsage, fmt("piper: ", what(), ": the transport was closed"));
    PIPER_CHECK_CUDA(cudaSetDevice(device_), what() + ": cudaSetDevice");
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    PIPER_CHECK_CUDA(cudaStreamIsCapturing(stream, &capture), what() + ": cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone)
      throw Error(ErrorCode::kUsage,
                  fmt("piper: ", what(), ": staging through host memory waits for the device, ",
                      "which a CUDA graph cannot capture; use NCCL (PIPER_INTER=nccl)"));
    // The pinned buffer is reused once the last batch's copies completed: its host -> device
    // copies, and the device -> host ones of a batch that was cancelled before they ended.
    for (void* e : {copied_in_, copied_out_}) {
      const cudaError_t done = cudaEventQuery(event(e));
      if (done == cudaErrorNotReady) return false;
      PIPER_CHECK_CUDA(done, what() + ": cudaEventQuery");
    }
    int64_t total = 0;
    for (Posted& p : batch_) p.offset = total, total += p.bytes;
    if (total > pinned_bytes_) {
      const int64_t bytes = std::max(total, 2 * pinned_bytes_);
      if (pinned_ != nullptr) PIPER_CHECK_CUDA(cudaFreeHost(pinned_), what() + ": cudaFreeHost");
      pinned_ = nullptr;
      pinned_bytes_ = 0;
      PIPER_CHECK_CUDA(cudaMallocHost(&pinned_, bytes),
                       fmt(what(), ": cudaMallocHost of ", bytes, " B"));
      pinned_bytes_ = bytes;
    }
    for (const Posted& p : batch_)
      if (p.send && p.bytes > 0)
        PIPER_CHECK_CUDA(cudaMemcpyAsync(pinned_ + p.offset, p.device, p.bytes,
                                         cudaMemcpyDeviceToHost, stream),
                         what() + ": cudaMemcpyAsync device -> host");
    PIPER_CHECK_CUDA(cudaEventRecord(event(copied_out_), stream), what() + ": cudaEventRecord");
    step_ = Step::kCopyOut;
  }
  if (step_ == Step::kCopyOut) {
    const cudaError_t out = cudaEventQuery(event(copied_out_));
    if (out == cudaErrorNotReady) return false;
    PIPER_CHECK_CUDA(out, what() + ": cudaEventQuery");
    for (const Posted& p : batch_) {
      if (p.send)
        host_->post_send(pinned_ + p.offset, p.bytes, p.peer, p.tag);
      else
        host_->post_recv(pinned_ + p.offset, p.bytes, p.peer, p.tag);
    }
    step_ = Step::kHost;
  }
  if (!host_->test_all()) return false;
  PIPER_CHECK_CUDA(cudaSetDevice(device_), what() + ": cudaSetDevice");
  for (const Posted& p : batch_)
    if (!p.send && p.bytes > 0)
      PIPER_CHECK_CUDA(cudaMemcpyAsync(p.device, pinned_ + p.offset, p.bytes,
                                       cudaMemcpyHostToDevice, stream),
                       what() + ": cudaMemcpyAsync host -> device");
  PIPER_CHECK_CUDA(cudaEventRecord(event(copied_in_), stream), what() + ": cudaEventRecord");
  batch_.clear();
  step_ = Step::kIdle;
  return true;
}

bool StagedTransport::test_all() { return advance(); }

bool StagedTransport::wait_all(const std::string& what, double deadline_monotonic_s,
                               double timeout_s) {
  // A host transport that completes only inside its own wait (gloo) gets it once the sends
  // are in host memory; otherwise the executor polls test_all().
  auto now_s = [] {
    return std::chrono::duration<double>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  };
  while (step_ != Step::kHost) {
    if (advance()) return true;
    if (step_ == Step::kHost) break;
    if (now_s() >= deadline_monotonic_s) return false;  // the executor's loop reports it
    std::this_thread::sleep_for(kPoll);
  }
  if (!host_->wait_all(what, deadline_monotonic_s, timeout_s)) return false;
  return advance();
}

std::vector<runtime::Message> StagedTransport::pending() const {
  if (step_ == Step::kHost) return host_->pending();
  std::vector<runtime::Message> out;
  for (const Posted& p : batch_) out.push_back({p.send, p.peer, p.bytes});
  return out;
}

void StagedTransport::cancel_all() {
  if (step_ == Step::kHost) host_->cancel_all();
  batch_.clear();
  step_ = Step::kIdle;
}

void StagedTransport::close(const std::string& what, double timeout_s) {
  // The last batch's host -> device copies may still read the pinned buffer: it is freed once
  // they completed (bounded), else left to process exit.
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s));
  bool drained = true;
  for (void* e : {copied_out_, copied_in_}) {
    while (e != nullptr && cudaEventQuery(event(e)) == cudaErrorNotReady) {
      if (std::chrono::steady_clock::now() >= deadline) {
        drained = false;
        break;
      }
      std::this_thread::sleep_for(kPoll);
    }
  }
  if (!drained) pinned_ = nullptr, pinned_bytes_ = 0;
  release();
  if (!drained)
    throw Error(ErrorCode::kTimeout,
                fmt("piper: ", what, ": rank ", host_->rank(), " timed out after ", timeout_s,
                    " s waiting for the device's copies from the staging buffer"));
}

}  // namespace piper::cuda
