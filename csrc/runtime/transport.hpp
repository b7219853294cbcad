// Transport: the point-to-point layer under the algorithms of csrc/runtime/executor.hpp.
//
// A transport holds one batch of posted messages at a time: the executor posts a batch
// (post_send / post_recv), then polls test_all() until it returns true, or gives up with
// cancel_all() (deadline passed, peer dead). A transport that can receive with any tag
// (any_tag(): MPI) also takes receives that accept whatever the peer sends next and report
// its tag and size (post_recv_any, take_arrivals): the in-band call checks of the executor.
// Buffers are plain host pointers with sizes in bytes; a transport never copies them. Implementations: MpiTransport (mpi_transport.hpp,
// compiled when MPI is found) and PyTransport (py_transport.hpp: a Python transport object of
// piper_comm/transport.py, e.g. torch.distributed's gloo, called with the GIL held).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace piper::runtime {

/// What an any-tag receive got: the sender's tag and the bytes it sent (truncated: more than
/// the receive buffer held; the first bytes were delivered).
struct Arrival {
  int64_t peer;
  int tag;
  int64_t bytes;
  bool truncated;
};

/// One posted message, as an error names it.
struct Message {
  bool send;      // send or receive
  int64_t peer;   // rank in the transport's numbering
  int64_t bytes;  // payload size
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int64_t rank() const = 0;
  virtual int64_t size() const = 0;
  virtual std::string name() const = 0;

  /// Posts one message of the current batch (zero bytes allowed).
  virtual void post_send(const void* buf, int64_t bytes, int64_t peer, int tag) = 0;
  virtual void post_recv(void* buf, int64_t bytes, int64_t peer, int tag) = 0;
  /// Whether post_recv_any works; the largest tag a message may carry.
  virtual bool any_tag() const { return false; }
  virtual int max_tag() const { return 32767; }  // the MPI standard's guaranteed minimum
  /// Receives the next message from `peer`, whatever its tag; a larger message than `bytes`
  /// is reported truncated by take_arrivals instead of raising.
  virtual void post_recv_any(void* buf, int64_t bytes, int64_t peer) {
    (void)buf, (void)bytes, (void)peer;
    throw Error(ErrorCode::kInternal, "piper internal error: post_recv_any on " + name());
  }
  /// The arrivals of the post_recv_any receives of the batch test_all() completed, in posting
  /// order (once: the list is emptied).
  virtual std::vector<Arrival> take_arrivals() { return {}; }
  /// True once every message of the batch completed (the batch is then empty). Throws
  /// piper::Error: kUsage when a message was larger than its receive buffer, kPeer when the
  /// transport reports a failure; the message starts with the rank (the executor prefixes the
  /// operation).
  virtual bool test_all() = 0;
  /// The messages of the batch that have not completed yet (after a false test_all()).
  virtual std::vector<Message> pending() const = 0;
  /// Cancels what is left of the batch (best effort; the transport is unusable afterwards).
  virtual void cancel_all() = 0;
  /// Lets the transport move queued messages while the caller waits on something else.
  virtual void progress() = 0;
  /// A transport that must wait blockingly (gloo's point-to-point work completes only inside
  /// wait()) completes the batch here, or throws kTimeout / kPeer naming `what`, and returns
  /// true; false (the default) lets the executor poll test_all() itself.
  virtual bool wait_all(const std::string& what, double deadline_monotonic_s,
                        double timeout_s) {
    (void)what, (void)deadline_monotonic_s, (void)timeout_s;
    return false;
  }
  /// Device transports (NCCL, host-staged): the stream the batch is ordered on; a device
  /// transport's test_all() returns true once the batch is enqueued on it (stream order then
  /// completes it), so the executor's wait does not synchronise with the device.
  virtual void set_stream(uintptr_t stream) { (void)stream; }
  /// Whether a batch can be captured in a CUDA graph (NCCL: its groups are stream work; the
  /// host-staged transport waits for the device on the host, which a graph cannot hold).
  virtual bool graph_capturable() const { return false; }
  /// Releases the transport's resources (collective for NCCL); later posts raise kUsage.
  virtual void close(const std::string& what, double timeout_s) { (void)what, (void)timeout_s; }
};

}  // namespace piper::runtime
