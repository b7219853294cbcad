#include "plan/schedule.hpp"

#include "common/error.hpp"

namespace piper::plan {

int64_t CopyList::bytes() const {
  int64_t total = 0;
  for (int64_t n : len) total += n;
  return total;
}

std::vector<int64_t> displacements(const std::vector<int64_t>& counts) {
  std::vector<int64_t> displs(counts.size());
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    displs[i] = acc;
    acc += counts[i];
  }
  return displs;
}

FlatPlan plan_flat(int64_t me, const std::vector<int64_t>& send_bytes,
                   const std::vector<int64_t>& recv_bytes) {
  const int64_t P = static_cast<int64_t>(send_bytes.size());
  PIPER_HOST_ASSERT(static_cast<int64_t>(recv_bytes.size()) == P && me >= 0 && me < P);
  const auto sdispl = displacements(send_bytes), rdispl = displacements(recv_bytes);
  FlatPlan plan;
  plan.self.add(sdispl[me], rdispl[me], send_bytes[me]);
  // Pairwise order: at step k send to me+k and receive from me-k, so that every step is a
  // permutation and no rank is hit by everyone at once.
  for (int64_t k = 1; k < P; ++k) {
    const int64_t to = (me + k) % P, from = (me - k + P) % P;
    plan.sends.add(to, sdispl[to], send_bytes[to]);
    plan.recvs.add(from, rdispl[from], recv_bytes[from]);
  }
  return plan;
}

HaloPlan plan_halo(const Topology& topo, int64_t me, const std::vector<int64_t>& node_send_bytes,
                   const std::vector<int64_t>& recv_bytes) {
  const int64_t P = topo.size();
  const int64_t n = topo.node_of(me), L = topo.node_size(n), me_l = topo.local_of(me);
  const auto& locals = topo.node_ranks(n);
  PIPER_HOST_ASSERT(static_cast<int64_t>(node_send_bytes.size()) == L * P);
  PIPER_HOST_ASSERT(static_cast<int64_t>(recv_bytes.size()) == P);
  auto S = [&](int64_t l, int64_t d) { return node_send_bytes[l * P + d]; };

  HaloPlan plan;
  // Segment layout: region of destination d, inside it the blocks of local ranks 0..L-1.
  std::vector<int64_t> region(P + 1, 0);
  for (int64_t d = 0; d < P; ++d) {
    int64_t sz = 0;
    for (int64_t l = 0; l < L; ++l) sz += S(l, d);
    region[d + 1] = region[d] + sz;
  }
  plan.segment_bytes = region[P];
  auto block_off = [&](int64_t d, int64_t l) {
    int64_t off = region[d];
    for (int64_t j = 0; j < l; ++j) off += S(j, d);
    return off;
  };

  // Pack: this rank's blocks, stored back to back in its send buffer, into the segment.
  int64_t soff = 0;
  for (int64_t d = 0; d < P; ++d) {
    plan.pack.add(soff, block_off(d, me_l), S(me_l, d));
    if (topo.node_of(d) == n && d != me) plan.intra_bytes += S(me_l, d);
    soff += S(me_l, d);
  }

  // Blocks from this node's ranks (including self) are copied out of the segment.
  const auto rdispl = displacements(recv_bytes);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t src = locals[l];
    if (S(l, me) != recv_bytes[src])
      throw Error(ErrorCode::kUsage,
                  fmt("piper: halo: rank ", src, " sends ", S(l, me), " B to rank ", me,
                      " but rank ", me, " expects ", recv_bytes[src], " B"));
    plan.local.add(block_off(me, l), rdispl[src], S(l, me));
  }

  // As proxy: the region of every remote destination whose proxy on this node is me.
  for (int64_t d = 0; d < P; ++d) {
    if (topo.node_of(d) != n && topo.proxy(n, d) == me)
      plan.sends.add(d, region[d], region[d + 1] - region[d]);
  }

  // From every remote node m: one message from m's proxy for me, blocks in m's local order.
  for (int64_t m = 0; m < topo.num_nodes(); ++m) {
    if (m == n) continue;
    const auto& srcs = topo.node_ranks(m);
    int64_t total = 0;
    for (int64_t s : srcs) total += recv_bytes[s];
    if (total == 0) continue;
    const int64_t peer = topo.proxy(m, me);
    if (topo.contiguous(m)) {
      plan.recvs.add(peer, rdispl[srcs.front()], total);
      plan.recv_staged.push_back(0);
    } else {
      plan.recvs.add(peer, plan.staging_bytes, total);
      plan.recv_staged.push_back(1);
      for (int64_t s : srcs) {
        plan.unpack.add(plan.staging_bytes, rdispl[s], recv_bytes[s]);
        plan.staging_bytes += recv_bytes[s];
      }
    }
  }
  return plan;
}

}  // namespace piper::plan
