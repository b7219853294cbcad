// StagedTransport: device messages through host memory over the host transport (MPI, or a
// Python transport): PIPER_INTER=mpi, for machines without NCCL.
//
// A batch goes in three steps, polled by the executor's test_all() loop (bounded by the
// call's deadline like any host message): (1) every send is copied device -> pinned host
// memory on the caller's stream and an event recorded; (2) once that event completed, the
// host transport sends from and receives into the pinned buffer; (3) once it completed, every
// receive is copied pinned host -> device on the stream, and the batch is done (the copies
// complete in stream order). Costs two PCIe copies and a host wait for the device per batch:
// a fallback, not the fast path, and it cannot be captured in a CUDA graph (kUsage).
//
// Compiled only with CUDA (PIPER_WITH_CUDA); see device_plane.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/transport.hpp"

namespace piper::cuda {

class StagedTransport final : public runtime::Transport {
 public:
  StagedTransport(std::shared_ptr<runtime::Transport> host, int device);
  ~StagedTransport() override;

  int64_t rank() const override { return host_->rank(); }
  int64_t size() const override { return host_->size(); }
  std::string name() const override { return "host-staged over " + host_->name(); }
  void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) override;
  void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) override;
  bool test_all() override;
  std::vector<runtime::Message> pending() const override;
  void cancel_all() override;
  void progress() override { host_->progress(); }
  bool wait_all(const std::string& what, double deadline_monotonic_s, double timeout_s) override;
  void set_stream(uintptr_t stream) override { stream_ = stream; }
  void close(const std::string& what, double timeout_s) override;

 private:
  struct Posted {
    bool send;
    uint8_t* device;  // the caller's device buffer
    int64_t bytes, peer, offset;  // offset in the pinned buffer
    int tag;
  };
  enum class Step { kIdle, kCopyOut, kHost };
  bool advance();  // moves the batch as far as it can go without waiting; true when done
  void release();

  std::shared_ptr<runtime::Transport> host_;
  int device_;
  uintptr_t stream_ = 0;
  std::vector<Posted> batch_;
  Step step_ = Step::kIdle;
  uint8_t* pinned_ = nullptr;
  int64_t pinned_bytes_ = 0;
  void* copied_out_ = nullptr;  // cudaEvent_t after the device -> host copies
  void* copied_in_ = nullptr;   // cudaEvent_t after the host -> device copies (pinned reuse)
};

}  // namespace piper::cuda
