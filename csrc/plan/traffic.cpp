#include "plan/traffic.hpp"

namespace piper::plan {

std::vector<double> a2a_traffic(const Topology& topo, const double* S) {
  const int64_t P = topo.size(), N = topo.num_nodes();
  std::vector<double> out(2 * kNumTerms * P, 0.0);
  auto at = [&](int64_t algo, int64_t term, int64_t rank) -> double& {
    return out[(algo * kNumTerms + term) * P + rank];
  };
  bool multi = false;
  for (int64_t n = 0; n < N; ++n) multi = multi || topo.node_size(n) > 1;
  // flat: every non-empty block for another rank is a message on its level.
  for (int64_t r = 0; r < P; ++r) {
    for (int64_t d = 0; d < P; ++d) {
      if (d == r) continue;
      const bool same = topo.node_of(r) == topo.node_of(d);
      at(0, same ? kMsgsIntra : kMsgsInter, r) += S[r * P + d] > 0;
      at(0, same ? kBytesIntra : kBytesInter, r) += S[r * P + d];
    }
  }
  if (!multi) {  // one-rank nodes: the executor runs the flat schedule
    for (int64_t t = 0; t < kNumTerms; ++t)
      for (int64_t r = 0; r < P; ++r) at(1, t, r) = at(0, t, r);
    return out;
  }
  // HALO: a node's aggregated messages to remote ranks, spread evenly over its ranks.
  std::vector<double> node_msgs(N, 0.0), node_bytes(N, 0.0), from_node(N * P, 0.0);
  for (int64_t r = 0; r < P; ++r)
    for (int64_t d = 0; d < P; ++d) from_node[topo.node_of(r) * P + d] += S[r * P + d];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < P; ++d) {
      if (topo.node_of(d) == n) continue;
      node_msgs[n] += from_node[n * P + d] > 0;
      node_bytes[n] += from_node[n * P + d];
    }
    node_msgs[n] /= static_cast<double>(topo.node_size(n));
    node_bytes[n] /= static_cast<double>(topo.node_size(n));
  }
  for (int64_t r = 0; r < P; ++r) {
    const int64_t n = topo.node_of(r);
    at(1, kMsgsInter, r) = node_msgs[n];
    at(1, kBytesInter, r) = node_bytes[n];
    at(1, kBarriers, r) = topo.node_size(n) > 1 ? 2.0 : 0.0;
    double copies = 0.0;  // pack everything it sends, copy out what its node's ranks sent it
    for (int64_t d = 0; d < P; ++d) copies += S[r * P + d];
    for (int64_t s : topo.node_ranks(n)) copies += S[s * P + r];
    at(1, kCopyBytes, r) = copies;
  }
  return out;
}

}  // namespace piper::plan
