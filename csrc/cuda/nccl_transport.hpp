// NcclTransport: device messages of the executor as grouped ncclSend/ncclRecv on the caller's
// stream (the inter-node stage of HALO on GPUs, and every message of flat and pairwise).
//
// NCCL is loaded at run time (dlopen), not linked: `import piper_comm` works where no NCCL is
// installed, and the library is the one the program already uses when torch loaded it (found
// by its soname), else the path given (the nvidia-nccl wheel's, found as torch finds it), else
// the loader's search path. The header comes from the same wheel at build time.
//
// One batch = one NCCL group: test_all() enqueues the posted sends and receives between
// ncclGroupStart/ncclGroupEnd on the stream and returns true once NCCL accepted them; the
// data moves in stream order, so the executor never waits for the device. Tags are not
// needed: NCCL matches a pair's messages in posting order, the same on both sides. The
// communicator is non-blocking (ncclConfig_t.blocking = 0) so that its set-up and every group
// are bounded by the call's deadline and a failed or late peer leads to ncclCommAbort, never
// to a hang. The device work of a group is bounded too: a CUDA event recorded after it is
// watched (runtime/watchdog.hpp) and a group not completed on the device within PIPER_TIMEOUT
// aborts the communicator from the watchdog's thread (its kernels end; the message goes to
// stderr at once and every later call raises it), as torch's NCCL watchdog does. Not for
// groups captured in a CUDA graph (their events are graph nodes) nor on host memory.
//
// Threads: the executor's thread calls the transport; the watchdog's thread only aborts, under
// the same lock (mutex_).
//
// Compiled only with CUDA and NCCL's header (PIPER_WITH_NCCL); see device_plane.cpp.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/executor.hpp"
#include "runtime/message_summary.hpp"
#include "runtime/transport.hpp"
#include "runtime/watchdog.hpp"

namespace piper::cuda {

/// NCCL's unique id (ncclUniqueId): 128 bytes that rank 0 makes and every rank needs.
constexpr int64_t kNcclIdBytes = 128;

/// The `device` of an NcclTransport whose buffers are host memory: tests only, over a mock
/// NCCL that moves host bytes (tests/comm/mock_nccl.c); no CUDA call is made then.
constexpr int kNcclHostMemory = -1;

/// Loads NCCL (once per process). library: a path, or "" for the loader's search. Returns
/// NCCL's version code (e.g. 23207), or throws kUsage saying what was tried.
int load_nccl(const std::string& library);

/// A new NCCL unique id (rank 0 calls it), kNcclIdBytes bytes.
std::string nccl_unique_id();

class NcclTransport final : public runtime::Transport {
 public:
  /// Collective over all `size` ranks: joins the NCCL communicator of `unique_id` on `device`
  /// (or kNcclHostMemory), bounded by the deadline (ncclCommAbort and kTimeout when a peer
  /// does not join).
  NcclTransport(const std::string& unique_id, int64_t size, int64_t rank, int device,
                const runtime::Deadline& deadline);
  ~NcclTransport() override;

  int64_t rank() const override { return rank_; }
  int64_t size() const override { return size_; }
  std::string name() const override;
  void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) override;
  void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) override;
  bool test_all() override;
  std::vector<runtime::Message> pending() const override;
  void cancel_all() override;
  void progress() override {}
  void set_stream(uintptr_t stream) override { stream_ = stream; }
  bool graph_capturable() const override { return true; }
  void close(const std::string& what, double timeout_s) override;

 private:
  struct Posted {
    runtime::Message m;
    void* buf;
  };
  void check_usable(const char* what) const;  // under mutex_
  /// "NCCL group 7 of 6 messages (... B sent, ... B received; peers 1, 3)": the batch.
  std::string describe_group();
  /// After a group was enqueued on a device stream: records an event and watches it.
  void watch_group(const std::string& what);
  /// The watchdog's expiry (its thread): aborts and keeps the message for later calls.
  void expire(const std::string& why);
  void stop_watchdog();  // joins the watchdog's thread; never under mutex_ (expire takes it)
  using Describe = std::function<std::string()>;  // the operation, for an error's message
  void set_device(const Describe& what) const;  // cudaSetDevice, unless host memory
  /// NCCL's state of the communicator: true when idle, false while work is in progress;
  /// aborts the communicator and throws on an error (the batch kept for the message).
  bool settled(const Describe& what);
  /// ncclCommAbort once, unless a CUDA graph captured work on the communicator: NCCL's abort
  /// and finalize then wait for every such graph to be destroyed, without a deadline, so the
  /// communicator is left to process exit instead. Returns whether it called ncclCommAbort.
  bool abort();

  void* comm_ = nullptr;  // ncclComm_t
  int64_t rank_, size_;
  int device_;
  uintptr_t stream_ = 0;
  std::vector<Posted> batch_;
  bool enqueued_ = false;
  bool broken_ = false;    // aborted: every later call raises
  bool captured_ = false;  // a group was enqueued on a capturing stream (a CUDA graph)
  double timeout_s_;       // PIPER_TIMEOUT: the watchdog's limit per group on the device
  int64_t groups_ = 0;     // groups enqueued, numbering them in the watchdog's messages
  std::string expired_;    // the watchdog's message once it aborted the communicator
  runtime::MessageSummary summary_;  // describe_group's
  std::mutex mutex_;       // the communicator and the state above, against the watchdog
  std::mutex events_mutex_;               // the event pool, released by the watchdog thread
  std::vector<void*> free_events_, all_events_;  // cudaEvent_t
  std::unique_ptr<runtime::Watchdog> watchdog_;  // device communicators only
};

}  // namespace piper::cuda
