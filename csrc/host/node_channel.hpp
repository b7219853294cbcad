// NodeChannel: what the ranks of one node share for the intra-node stage of HALO on CPU hosts.
//
// One control segment (barrier, per-rank slots, the count rows of the current call) and one
// data segment that grows on demand. Both are POSIX shared memory created by local rank 0 with
// mode 0600 and unlinked as soon as every local rank has mapped them. Every wait is bounded by
// a deadline and watches the local peers' processes: a dead peer raises kPeer, a late one
// kTimeout, and both messages name the operation, this rank and the peers waited for.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "host/shm_segment.hpp"

namespace piper::host {

class NodeChannel {
 public:
  /// prefix: segment name prefix, unique to the job and node ("/piper-<job>-<pid>-n<node>").
  /// local_ranks: the global rank of each local rank. create: true on local rank 0, which
  /// must construct first; the others construct after it (the caller orders this, e.g. with an
  /// MPI barrier), then everybody calls ready(), then local rank 0 calls unlink().
  NodeChannel(std::string prefix, int64_t local_rank, std::vector<int64_t> local_ranks,
              int64_t world_size, bool create);
  ~NodeChannel();
  NodeChannel(const NodeChannel&) = delete;
  NodeChannel& operator=(const NodeChannel&) = delete;

  /// Removes the control segment's name once every local rank has mapped it.
  void unlink();
  /// Unmaps everything; idempotent.
  void close();

  /// A function called every ~200 us while a barrier waits: it drives the inter-node
  /// transport's progress engine (MPI may deliver an already "completed" send only while the
  /// sender keeps calling into MPI, so a rank blocked here must keep doing so).
  void set_progress(std::function<void()> progress) { progress_ = std::move(progress); }

  /// Waits until every local rank reaches the same barrier. `what` names the operation for
  /// errors ("all_to_all #12 (halo: blocks packed)"); timeout_s bounds the wait.
  void barrier(const std::string& what, double timeout_s);

  /// Publishes this rank's row of P int64 counts for a call of the given parity (seq % 2);
  /// rows(parity) returns all L rows (L x P, row-major) once a barrier has passed.
  void publish_row(int64_t parity, const int64_t* row);
  void read_rows(int64_t parity, int64_t* out) const;

  /// Makes the data segment at least `bytes` long. Collective over the node: every local rank
  /// must call it with the same value (they do: it comes from the shared rows). Returns true
  /// when the segment was replaced (earlier data pointers are then invalid).
  bool ensure_data(int64_t bytes, const std::string& what, double timeout_s);
  uint8_t* data() const { return data_.data(); }
  int64_t data_bytes() const { return static_cast<int64_t>(data_.bytes()); }

  /// Bytes of the area each local rank publishes for the others (the CUDA context's IPC
  /// handles, csrc/cuda/ipc_record.hpp). Local rank l's area: exchange(l); a rank writes only
  /// its own, and reads another's only after a barrier that followed the write.
  static constexpr int64_t kExchangeBytes = 512;
  uint8_t* exchange(int64_t l) const;

  int64_t local_rank() const { return local_rank_; }
  /// The global rank of local rank l.
  int64_t rank_of(int64_t l) const { return local_ranks_.at(l); }
  int64_t local_size() const { return static_cast<int64_t>(local_ranks_.size()); }

 private:
  struct Slot;
  struct Header;
  Header* header() const;
  Slot* slot(int64_t l) const;
  int64_t* row(int64_t parity, int64_t l) const;
  /// Throws kPeer if a local peer's process is gone.
  void check_peers(const std::string& what) const;
  [[noreturn]] void timeout(const std::string& what, double timeout_s, uint64_t epoch) const;

  std::string prefix_;
  int64_t local_rank_, world_size_;
  std::vector<int64_t> local_ranks_;
  ShmSegment control_, data_;
  uint64_t epoch_ = 0;     // barriers passed by this rank (all local ranks move in lockstep)
  uint64_t data_gen_ = 0;  // generation of the data segment
  std::function<void()> progress_;
};

}  // namespace piper::host
