// MpiTransport: the Transport interface over MPI point-to-point, called from C++.
//
// Built only when CMake finds the MPI that mpi4py uses (PIPER_WITH_MPI). The communicator is
// the handle of an mpi4py communicator (Comm.handle: an int for MPICH's ABI, an address for
// Open MPI's and the MPI-5 standard ABI), already set to MPI_ERRORS_RETURN by the caller.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/transport.hpp"

namespace piper::runtime {

class MpiTransport final : public Transport {
 public:
  /// handle: the integer value of an mpi4py Comm.handle. The communicator must outlive this.
  explicit MpiTransport(uint64_t handle);
  ~MpiTransport() override;
  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) override;
  void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) override;
  bool any_tag() const override { return true; }
  int max_tag() const override { return max_tag_; }
  void post_recv_any(void* buf, int64_t bytes, int64_t peer) override;
  std::vector<Arrival> take_arrivals() override;
  bool test_all() override;
  std::vector<Message> pending() const override;
  void cancel_all() override;
  void progress() override;

  /// MPI_Get_library_version of the library this extension was linked against.
  static std::string library_version();

 private:
  void post(bool send, void* buf, int64_t bytes, int64_t peer, int tag, bool any);
  void completed(size_t i, const MPI_Status& status, bool in_error);
  [[noreturn]] void fail(int code, const char* call) const;

  MPI_Comm comm_;
  int64_t rank_ = 0, size_ = 0;
  int max_tag_ = 32767;
  // The batch: one entry per posted message; completed requests become MPI_REQUEST_NULL.
  std::vector<MPI_Request> requests_;
  std::vector<Message> messages_;
  std::vector<int> any_;               // per message: 1 for an any-tag receive
  std::vector<Arrival> arrivals_;      // per message (any-tag receives only meaningful)
  size_t open_ = 0;                    // messages not completed yet
  std::vector<int> indices_;           // MPI_Testsome's scratch
  std::vector<MPI_Status> statuses_;
};

}  // namespace piper::runtime
