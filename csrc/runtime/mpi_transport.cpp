#include "runtime/mpi_transport.hpp"

#include <climits>
#include <type_traits>

#include "common/error.hpp"

namespace piper::runtime {

namespace {
// MPI_Comm is an int in MPICH's ABI and a pointer in Open MPI's and the standard ABI.
template <typename Handle>
Handle handle_cast(uint64_t value) {
  if constexpr (std::is_pointer_v<Handle>)
    return reinterpret_cast<Handle>(static_cast<uintptr_t>(value));
  else
    return static_cast<Handle>(value);
}

MPI_Comm comm_from_handle(uint64_t handle) { return handle_cast<MPI_Comm>(handle); }

std::string error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return fmt("MPI error ", code);
  return std::string(text, len);
}
}  // namespace

MpiTransport::MpiTransport(uint64_t handle) : comm_(comm_from_handle(handle)) {
  int r = 0, s = 0;
  if (int rc = MPI_Comm_rank(comm_, &r); rc != MPI_SUCCESS) fail(rc, "MPI_Comm_rank");
  if (int rc = MPI_Comm_size(comm_, &s); rc != MPI_SUCCESS) fail(rc, "MPI_Comm_size");
  rank_ = r;
  size_ = s;
}

MpiTransport::~MpiTransport() {
  int finalized = 1;
  MPI_Finalized(&finalized);
  if (!finalized && !requests_.empty()) cancel_all();
}

void MpiTransport::fail(int code, const char* call) const {
  throw Error(ErrorCode::kPeer, fmt("piper: MPI reported an error on rank ", rank_, " in ", call,
                                    ": ", error_string(code)));
}

void MpiTransport::post(bool send, void* buf, int64_t bytes, int64_t peer, int tag) {
  MPI_Request req;
  const int dest = static_cast<int>(peer);
  int rc;
#if MPI_VERSION >= 4
  const auto n = static_cast<MPI_Count>(bytes);
  rc = send ? MPI_Isend_c(buf, n, MPI_BYTE, dest, tag, comm_, &req)
            : MPI_Irecv_c(buf, n, MPI_BYTE, dest, tag, comm_, &req);
#else
  PIPER_HOST_ASSERT(bytes <= INT_MAX);
  const int n = static_cast<int>(bytes);
  rc = send ? MPI_Isend(buf, n, MPI_BYTE, dest, tag, comm_, &req)
            : MPI_Irecv(buf, n, MPI_BYTE, dest, tag, comm_, &req);
#endif
  if (rc != MPI_SUCCESS) fail(rc, send ? "MPI_Isend" : "MPI_Irecv");
  requests_.push_back(req);
  messages_.push_back({send, peer, bytes});
}

void MpiTransport::post_send(const void* buf, int64_t bytes, int64_t peer, int tag) {
  post(true, const_cast<void*>(buf), bytes, peer, tag);  // MPI's send buffer is const
}

void MpiTransport::post_recv(void* buf, int64_t bytes, int64_t peer, int tag) {
  post(false, buf, bytes, peer, tag);
}

bool MpiTransport::test_all() {
  if (requests_.empty()) return true;
  statuses_.resize(requests_.size());
  int flag = 0;
  const int rc = MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag,
                             statuses_.data());
  if (rc == MPI_ERR_IN_STATUS) {
    for (size_t i = 0; i < statuses_.size(); ++i) {
      const int err = statuses_[i].MPI_ERROR;
      if (err == MPI_SUCCESS || err == MPI_ERR_PENDING) continue;
      int cls = err;
      MPI_Error_class(err, &cls);
      const Message& m = messages_[i];
      if (cls == MPI_ERR_TRUNCATE)
        throw Error(ErrorCode::kUsage,
                    fmt("rank ", rank_, ": a message from rank ", m.peer,
                        " was larger than its ", m.bytes, " B receive buffer (counts disagree "
                        "between ranks; run with PIPER_CHECK=1 to find them)"));
      throw Error(ErrorCode::kPeer, fmt("MPI reported an error on rank ", rank_, " for the ",
                                        m.send ? "send to" : "receive from", " rank ", m.peer,
                                        ": ", error_string(err)));
    }
  }
  if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS)
    throw Error(ErrorCode::kPeer, fmt("MPI reported an error on rank ", rank_, " in MPI_Testall: ",
                                      error_string(rc)));
  if (!flag) return false;
  requests_.clear();
  messages_.clear();
  return true;
}

std::vector<Message> MpiTransport::pending() const {
  std::vector<Message> out;
  for (size_t i = 0; i < requests_.size(); ++i) {
    if (requests_[i] == MPI_REQUEST_NULL) continue;
    int done = 0;
    MPI_Request_get_status(requests_[i], &done, MPI_STATUS_IGNORE);
    if (!done) out.push_back(messages_[i]);
  }
  return out;
}

void MpiTransport::cancel_all() {
  for (MPI_Request& req : requests_) {
    if (req == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&req);
    MPI_Request_free(&req);
  }
  requests_.clear();
  messages_.clear();
}

void MpiTransport::progress() {
  int flag = 0;
  MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm_, &flag, MPI_STATUS_IGNORE);
}

std::string MpiTransport::library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(text, &len);
  return std::string(text, len);
}

}  // namespace piper::runtime
