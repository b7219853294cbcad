// Schedules of the all-to-all(v) algorithms: who sends which bytes to whom, at which offsets.
// Pure C++: every function is a deterministic function of its inputs, so all ranks of a node
// derive the same layout from the same counts without talking. All sizes are in bytes.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/topology.hpp"

namespace piper::plan {

/// Local memory copies: copy len[i] bytes from src + src_off[i] to dst + dst_off[i].
struct CopyList {
  std::vector<int64_t> src_off, dst_off, len;
  void add(int64_t s, int64_t d, int64_t n) {
    if (n == 0) return;
    src_off.push_back(s);
    dst_off.push_back(d);
    len.push_back(n);
  }
  int64_t bytes() const;
};

/// Point-to-point messages: len[i] bytes at buffer offset off[i] to/from rank peer[i].
/// Zero-byte messages are never listed: both sides know the sizes and skip them.
struct MessageList {
  std::vector<int64_t> peer, off, len;
  void add(int64_t p, int64_t o, int64_t n) {
    if (n == 0) return;
    peer.push_back(p);
    off.push_back(o);
    len.push_back(n);
  }
};

/// Exclusive prefix sums: displacements of blocks stored back to back.
std::vector<int64_t> displacements(const std::vector<int64_t>& counts);

/// Flat schedule: every block goes straight from the send buffer to its destination's receive
/// buffer. Peers are listed in pairwise order (me+k, me-k for k = 1..P-1), so executing the
/// lists step by step is the "pairwise" algorithm and posting them all at once is "flat".
/// The block to self is a local copy.
struct FlatPlan {
  MessageList sends, recvs;  // offsets into the caller's send / receive buffers
  CopyList self;             // send buffer -> receive buffer
};
FlatPlan plan_flat(int64_t me, const std::vector<int64_t>& send_bytes,
                   const std::vector<int64_t>& recv_bytes);

/// HALO (hierarchical) schedule for rank `me` on node n.
///
/// All ranks of node n write their blocks into one node-shared segment laid out by destination
/// rank (global order) and, inside a destination, by source local rank. Then:
///   - a block for a rank of node n is copied out of the segment by its destination;
///   - the region of a remote destination d is one contiguous message, sent by d's proxy on
///     node n (Topology::proxy) straight from the segment;
///   - d receives one message per remote node, its blocks ordered by the source's local rank,
///     straight into the receive buffer when that node's ranks are a contiguous range, else
///     into a staging buffer that is then scattered.
///
/// node_send_bytes: L x P row-major, row l = bytes local rank l of node n sends to each rank.
/// recv_bytes: P, bytes `me` receives from each rank (must agree with the senders' counts).
struct HaloPlan {
  int64_t segment_bytes = 0;  // size of the node-shared segment this call needs
  int64_t staging_bytes = 0;  // private staging for messages that cannot land in place
  CopyList pack;              // send buffer -> segment (this rank's blocks)
  CopyList local;             // segment -> receive buffer (blocks from this node's ranks)
  MessageList sends;          // from the segment (this rank as proxy)
  MessageList recvs;          // into the receive buffer (off >= 0 in recv) ...
  std::vector<uint8_t> recv_staged;  // ... or, where 1, into the staging buffer
  CopyList unpack;            // staging -> receive buffer
  int64_t intra_bytes = 0;    // bytes this rank moves to peers of its node (excluding self)
};
HaloPlan plan_halo(const Topology& topo, int64_t me, const std::vector<int64_t>& node_send_bytes,
                   const std::vector<int64_t>& recv_bytes);

}  // namespace piper::plan
