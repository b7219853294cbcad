#include "plan/topology.hpp"

#include "common/error.hpp"

namespace piper::plan {

Topology::Topology(const std::vector<int64_t>& node_of) : node_of_(node_of), local_of_(node_of.size()) {
  int64_t num_nodes = 0;
  for (int64_t n : node_of) {
    if (n < 0) throw Error(ErrorCode::kUsage, fmt("piper: topology: negative node index ", n));
    num_nodes = std::max(num_nodes, n + 1);
  }
  node_ranks_.resize(num_nodes);
  for (int64_t r = 0; r < size(); ++r) {
    local_of_[r] = static_cast<int64_t>(node_ranks_[node_of_[r]].size());
    node_ranks_[node_of_[r]].push_back(r);
  }
  contiguous_.resize(num_nodes);
  for (int64_t n = 0; n < num_nodes; ++n) {
    if (node_ranks_[n].empty())
      throw Error(ErrorCode::kUsage, fmt("piper: topology: node ", n, " has no ranks"));
    const auto& rs = node_ranks_[n];
    contiguous_[n] = rs.back() - rs.front() + 1 == static_cast<int64_t>(rs.size());
  }
}

bool Topology::uniform() const {
  for (const auto& rs : node_ranks_)
    if (rs.size() != node_ranks_[0].size()) return false;
  return true;
}

int64_t Topology::proxy(int64_t src_node, int64_t dst) const {
  const auto& rs = node_ranks_[src_node];
  return rs[local_of_[dst] % static_cast<int64_t>(rs.size())];
}

}  // namespace piper::plan
