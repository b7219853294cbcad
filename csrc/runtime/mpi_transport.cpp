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
  int* ub = nullptr;
  int found = 0;
  if (MPI_Comm_get_attr(comm_, MPI_TAG_UB, &ub, &found) == MPI_SUCCESS && found && ub)
    max_tag_ = *ub;
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

void MpiTransport::post(bool send, void* buf, int64_t bytes, int64_t peer, int tag, bool any) {
  if (requests_.empty()) {  // a new batch: the last one's arrivals were taken or are dropped
    any_.clear();
    arrivals_.clear();
  }
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
  any_.push_back(any);
  arrivals_.push_back({peer, tag, 0, false});
  ++open_;
}

void MpiTransport::post_send(const void* buf, int64_t bytes, int64_t peer, int tag) {
  post(true, const_cast<void*>(buf), bytes, peer, tag, false);  // MPI's send buffer is const
}

void MpiTransport::post_recv(void* buf, int64_t bytes, int64_t peer, int tag) {
  post(false, buf, bytes, peer, tag, false);
}

void MpiTransport::post_recv_any(void* buf, int64_t bytes, int64_t peer) {
  post(false, buf, bytes, peer, MPI_ANY_TAG, true);
}

std::vector<Arrival> MpiTransport::take_arrivals() {
  std::vector<Arrival> out;
  for (size_t i = 0; i < arrivals_.size(); ++i)
    if (any_[i]) out.push_back(arrivals_[i]);
  arrivals_.clear();
  any_.clear();
  return out;
}

void MpiTransport::completed(size_t i, const MPI_Status& status, bool in_error) {
  const Message& m = messages_[i];
  --open_;
  const int err = in_error ? status.MPI_ERROR : MPI_SUCCESS;
  int cls = err;
  if (err != MPI_SUCCESS) MPI_Error_class(err, &cls);
  const bool truncated = cls == MPI_ERR_TRUNCATE;
  if (!m.send) {
    MPI_Count n = 0;
#if MPI_VERSION >= 4
    MPI_Get_count_c(&status, MPI_BYTE, &n);
#else
    int k = 0;
    MPI_Get_count(&status, MPI_BYTE, &k);
    n = k;
#endif
    arrivals_[i] = {m.peer, status.MPI_TAG, static_cast<int64_t>(n), truncated};
  }
  if (err == MPI_SUCCESS || (truncated && any_[i])) return;
  if (truncated)
    throw Error(ErrorCode::kUsage,
                fmt("rank ", rank_, ": a message from rank ", m.peer, " was larger than its ",
                    m.bytes, " B receive buffer (the ranks disagree on this call: counts that "
                    "PIPER_CHECK=0 trusted, or ranks in different collectives)"));
  throw Error(ErrorCode::kPeer, fmt("MPI reported an error on rank ", rank_, " for the ",
                                    m.send ? "send to" : "receive from", " rank ", m.peer, ": ",
                                    error_string(err)));
}

bool MpiTransport::test_all() {
  if (open_ > 0) {
    const int n = static_cast<int>(requests_.size());
    indices_.resize(n);
    statuses_.resize(n);
    int done = 0;
    const int rc = MPI_Testsome(n, requests_.data(), &done, indices_.data(), statuses_.data());
    if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS)
      throw Error(ErrorCode::kPeer, fmt("MPI reported an error on rank ", rank_,
                                        " in MPI_Testsome: ", error_string(rc)));
    if (done == MPI_UNDEFINED) done = 0;  // no active request left (cannot happen: open_ > 0)
    for (int k = 0; k < done; ++k)
      completed(static_cast<size_t>(indices_[k]), statuses_[k], rc == MPI_ERR_IN_STATUS);
    if (open_ > 0) return false;
  }
  requests_.clear();
  messages_.clear();
  return true;
}

std::vector<Message> MpiTransport::pending() const {
  std::vector<Message> out;
  for (size_t i = 0; i < requests_.size(); ++i)
    if (requests_[i] != MPI_REQUEST_NULL) out.push_back(messages_[i]);  // Testsome nulls done ones
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
  any_.clear();
  arrivals_.clear();
  open_ = 0;
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
