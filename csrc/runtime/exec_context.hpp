// ExecContext: every memory move and local synchronisation of an algorithm goes through here.
//
// The algorithms of executor.hpp describe data movement as copy lists (csrc/plan) and node
// fences; the context carries them out where the memory lives. HostContext (this file) does it
// on CPU memory: memcpy, the node's POSIX shared segment, a futex barrier. A CUDA context
// implements the same calls with kernels on a stream and IPC-mapped device memory, without
// touching the algorithms (the precedent is UCC's ec/cpu and ec/cuda executors).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "host/node_channel.hpp"
#include "plan/schedule.hpp"

namespace piper::runtime {

class ExecContext {
 public:
  virtual ~ExecContext() = default;
  /// Copies every block of `blocks` from src to dst (bounds checked against the sizes).
  virtual void copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
                    const plan::CopyList& blocks) = 0;
  /// Returns once every local rank of this node reached the same fence (bounded).
  virtual void fence(const std::string& what, double timeout_s) = 0;
  /// Publishes this rank's P counts for call `seq`; read_counts returns the node's L x P rows
  /// (row-major) once a fence has passed.
  virtual void publish_counts(int64_t seq, const std::vector<int64_t>& row) = 0;
  virtual std::vector<int64_t> read_counts(int64_t seq) const = 0;
  /// Makes the node segment at least `bytes` long (collective over the node).
  virtual void ensure_segment(int64_t bytes, const std::string& what, double timeout_s) = 0;
  virtual uint8_t* segment() const = 0;
  virtual int64_t segment_bytes() const = 0;
  /// This rank's private staging buffer of at least `bytes` bytes (kept between calls).
  virtual uint8_t* staging(int64_t bytes) = 0;
  virtual int64_t local_size() const = 0;
  /// The stream later work is ordered on (a cudaStream_t as an integer; host: ignored).
  virtual void set_stream(uintptr_t stream) { (void)stream; }
  /// Whether the stream is being captured into a CUDA graph (host: never).
  virtual bool capturing() const { return false; }
  /// Releases what the node shares, collectively (host: the channel's owner does it).
  virtual void close(const std::string& what, double timeout_s) { (void)what, (void)timeout_s; }
};

/// Host memory. channel: the node's shared memory, or nullptr on a node of one rank (then
/// the "segment" is private memory and fences return at once). The channel must outlive it.
class HostContext final : public ExecContext {
 public:
  HostContext(host::NodeChannel* channel, int64_t world_size);
  void copy(const uint8_t* src, int64_t src_bytes, uint8_t* dst, int64_t dst_bytes,
            const plan::CopyList& blocks) override;
  void fence(const std::string& what, double timeout_s) override;
  void publish_counts(int64_t seq, const std::vector<int64_t>& row) override;
  std::vector<int64_t> read_counts(int64_t seq) const override;
  void ensure_segment(int64_t bytes, const std::string& what, double timeout_s) override;
  uint8_t* segment() const override;
  int64_t segment_bytes() const override;
  uint8_t* staging(int64_t bytes) override;
  int64_t local_size() const override { return channel_ ? channel_->local_size() : 1; }

 private:
  host::NodeChannel* channel_;
  int64_t world_size_;
  std::vector<int64_t> private_counts_;           // L == 1: this rank's row
  std::vector<uint8_t> private_segment_, staging_;
};

}  // namespace piper::runtime
