// Topology: which node each rank lives on. Pure C++, no I/O.
#pragma once

#include <cstdint>
#include <vector>

namespace piper::plan {

/// Ranks grouped into nodes. A node's ranks are ordered by global rank; a rank's position in
/// that order is its local rank. Nodes may differ in size and need not be contiguous ranges.
class Topology {
 public:
  /// node_of[r] = node index of rank r; node indices must be 0..num_nodes-1, each used.
  explicit Topology(const std::vector<int64_t>& node_of);

  int64_t size() const { return static_cast<int64_t>(node_of_.size()); }
  int64_t num_nodes() const { return static_cast<int64_t>(node_ranks_.size()); }
  int64_t node_of(int64_t rank) const { return node_of_[rank]; }
  int64_t local_of(int64_t rank) const { return local_of_[rank]; }
  int64_t node_size(int64_t node) const { return static_cast<int64_t>(node_ranks_[node].size()); }
  const std::vector<int64_t>& node_ranks(int64_t node) const { return node_ranks_[node]; }
  /// True when every node holds a contiguous, increasing range of global ranks.
  bool contiguous(int64_t node) const { return contiguous_[node]; }
  /// True when all nodes have the same number of ranks.
  bool uniform() const;

  /// The rank of node `src_node` that forwards HALO traffic to rank `dst`: the one whose local
  /// index is dst's local index modulo src_node's size (the same-local-rank "rail" peer when
  /// nodes are equal).
  int64_t proxy(int64_t src_node, int64_t dst) const;

 private:
  std::vector<int64_t> node_of_, local_of_;
  std::vector<std::vector<int64_t>> node_ranks_;
  std::vector<bool> contiguous_;
};

}  // namespace piper::plan
