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
  bool test_all() override;
  std::vector<Message> pending() const override;
  void cancel_all() override;
  void progress() override;

  /// MPI_Get_library_version of the library this extension was linked against.
  static std::string library_version();

 private:
  void post(bool send, void* buf, int64_t bytes, int64_t peer, int tag);
  [[noreturn]] void fail(int code, const char* call) const;

  MPI_Comm comm_;
  int64_t rank_ = 0, size_ = 0;
  std::vector<MPI_Request> requests_;
  std::vector<Message> messages_;
  std::vector<MPI_Status> statuses_;
};

}  // namespace piper::runtime
