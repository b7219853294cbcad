// PyTransport: the Transport interface over a Python transport object (piper_comm/transport.py:
// TorchTransport over torch.distributed/gloo, MpiTransport over mpi4py, SingleTransport), so
// that the algorithms of executor.hpp run on every transport. Each call takes the GIL; waits go
// to the object's wait_all (its deadline, liveness checks and error messages).
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "runtime/transport.hpp"

namespace piper::runtime {

class PyTransport final : public Transport {
 public:
  /// transport: an object with rank, size, name, isend(buf, peer, tag), irecv(...),
  /// test_all(requests), wait_all(pending, what, deadline, timeout), abandon(pending),
  /// progress() (piper_comm.transport.Transport). Called with the GIL held.
  explicit PyTransport(pybind11::object transport);
  ~PyTransport() override;
  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override { return name_; }  // "python:<the object's name>"
  void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) override;
  void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) override;
  bool test_all() override;
  std::vector<Message> pending() const override;
  void cancel_all() override;
  void progress() override;
  bool wait_all(const std::string& what, double deadline_monotonic_s, double timeout_s) override;

 private:
  void post(bool send, const void* buf, int64_t bytes, int64_t peer, int tag);
  pybind11::list pending_list() const;  // piper_comm.transport.Pending of the batch

  pybind11::object transport_, pending_cls_;
  int64_t rank_, size_;
  std::string name_;
  std::vector<pybind11::object> requests_;
  std::vector<Message> messages_;
};

}  // namespace piper::runtime
