"""csrc/plan on its own, through its bindings (piper_comm._C), against small Python references
written from the headers' contracts (topology.hpp, traffic.hpp, schedule.hpp), not from the C++:

- Topology: node splitting (also uneven and non-contiguous nodes), local ranks, proxies;
- a2a_traffic: the per-rank terms of flat and HALO, with the matrix aggregated per node;
- plan_flat / plan_halo: over all ranks' plans, every (source, destination) block is moved
  exactly once, at the offsets the buffers' layouts give, and every message has one receiver.

tests/unit/test_plan.py runs HALO plans end to end (a simulator moving real bytes); the tests here
check the plans' structure, so that a plan that happens to deliver through a wrong route fails.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from piper_comm import _C, bootstrap
from piper_comm.errors import PiperError, PiperUsageError

# Node layouts: one node, equal nodes, uneven sizes (the last node smaller, or larger), one-rank
# nodes, nodes that are not contiguous rank ranges, one big node and a singleton.
LAYOUTS = {
    "one-node": [0, 0, 0, 0],
    "equal-2x3": [0, 0, 0, 1, 1, 1],
    "uneven-4+2": [0, 0, 0, 0, 1, 1],
    "uneven-3+3+2": [0, 0, 0, 1, 1, 1, 2, 2],
    "uneven-1+3": [0, 1, 1, 1],
    "singletons": [0, 1, 2, 3, 4],
    "interleaved": [0, 1, 0, 1, 2, 2, 0],
    "scattered": [1, 0, 0, 1, 1, 2, 0, 2],
    "big-small": [0, 0, 0, 0, 0, 1],
    "one-rank": [0],
}


def topo_of(node_of) -> _C.Topology:
    return _C.Topology(np.asarray(node_of, dtype=np.int64))


# -- Python references ---------------------------------------------------------------------

class RefTopology:
    """topology.hpp's contract: a node's ranks in global order; local rank = position there."""

    def __init__(self, node_of):
        self.node_of = list(node_of)
        self.num_nodes = max(self.node_of) + 1
        self.node_ranks = [[r for r, n in enumerate(self.node_of) if n == m]
                           for m in range(self.num_nodes)]
        self.local_of = [self.node_ranks[n].index(r) for r, n in enumerate(self.node_of)]

    def contiguous(self, n):
        rs = self.node_ranks[n]
        return rs == list(range(rs[0], rs[0] + len(rs)))

    def proxy(self, src_node, dst):
        rs = self.node_ranks[src_node]
        return rs[self.local_of[dst] % len(rs)]


def ref_traffic(node_of, S) -> np.ndarray:
    """traffic.hpp / piper_comm.cost's docstring: [2 (flat, halo), 6 terms, P] per rank."""
    t = RefTopology(node_of)
    P, N = len(node_of), t.num_nodes
    S = np.asarray(S, dtype=float)
    out = np.zeros((2, 6, P))
    same = np.equal.outer(node_of, node_of)
    off_diag = ~np.eye(P, dtype=bool)
    for r in range(P):
        intra, inter = off_diag[r] & same[r], off_diag[r] & ~same[r]
        out[0, 0, r] = np.count_nonzero(S[r, intra] > 0)
        out[0, 1, r] = S[r, intra].sum()
        out[0, 2, r] = np.count_nonzero(S[r, inter] > 0)
        out[0, 3, r] = S[r, inter].sum()
    if all(len(rs) == 1 for rs in t.node_ranks):
        out[1] = out[0]
        return out
    # The matrix aggregated per node: node_to_rank[m, d] = bytes all of node m's ranks send d.
    node_to_rank = np.zeros((N, P))
    for m in range(N):
        node_to_rank[m] = S[t.node_ranks[m]].sum(axis=0)
    for r in range(P):
        n = node_of[r]
        g = len(t.node_ranks[n])
        remote = [d for d in range(P) if node_of[d] != n]
        out[1, 2, r] = np.count_nonzero(node_to_rank[n, remote] > 0) / g
        out[1, 3, r] = node_to_rank[n, remote].sum() / g
        out[1, 4, r] = 2.0 if g > 1 else 0.0
        out[1, 5, r] = S[r].sum() + S[t.node_ranks[n], r].sum()
    return out


def random_matrix(P, seed, density=0.7, high=50):
    rng = np.random.default_rng(seed)
    return (rng.integers(1, high, size=(P, P)) * (rng.random((P, P)) < density)).astype(np.int64)


def displacements(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# -- Topology ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_topology_matches_reference(layout):
    node_of = LAYOUTS[layout]
    t, ref = topo_of(node_of), RefTopology(node_of)
    P = len(node_of)
    assert (t.size, t.num_nodes) == (P, ref.num_nodes)
    assert t.uniform == (len({len(rs) for rs in ref.node_ranks}) == 1)
    for n in range(ref.num_nodes):
        assert list(t.node_ranks(n)) == ref.node_ranks[n]
        assert t.node_size(n) == len(ref.node_ranks[n])
        assert t.contiguous(n) == ref.contiguous(n), n
    for r in range(P):
        assert (t.node_of(r), t.local_of(r)) == (node_of[r], ref.local_of[r]), r
        for n in range(ref.num_nodes):
            p = t.proxy(n, r)
            assert p == ref.proxy(n, r), (n, r)
            assert node_of[p] == n  # a proxy of node n lives on node n


@pytest.mark.parametrize(("P", "local_size"), [(6, 4), (8, 3), (5, 2), (3, 2), (7, 7), (4, 1),
                                               (4, 8)])
def test_node_splitting_by_local_size_uneven(P, local_size):
    """init(local_size=L) splits P ranks into nodes of L, the last one smaller: the sizes
    and the proxies' rails (local rank modulo the node size) with an uneven last node."""
    node_of = bootstrap.node_ids_from(["host"] * P, local_size)
    want = [min(local_size, P - k) for k in range(0, P, local_size)]
    t = topo_of(node_of)
    assert [t.node_size(n) for n in range(t.num_nodes)] == want
    assert all(t.contiguous(n) for n in range(t.num_nodes))
    assert t.uniform == (len(set(want)) == 1)
    for d in range(P):  # every node's proxy for d has d's local rank, wrapped by its size
        for n in range(t.num_nodes):
            assert t.local_of(t.proxy(n, d)) == t.local_of(d) % want[n]


def test_node_splitting_by_host_names():
    assert bootstrap.node_ids_from(["b", "a", "b", "c", "a"], None) == [0, 1, 0, 2, 1]
    t = topo_of([0, 1, 0, 2, 1])
    assert [list(t.node_ranks(n)) for n in range(3)] == [[0, 2], [1, 4], [3]]
    assert not t.contiguous(0) and not t.contiguous(1) and t.contiguous(2)


@pytest.mark.parametrize(("node_of", "match"), [([0, 2], "node 1 has no ranks"),
                                                ([1, 1], "node 0 has no ranks"),
                                                ([0, -1], "negative node index")])
def test_topology_refuses_bad_node_indices(node_of, match):
    with pytest.raises(PiperUsageError, match=match):
        topo_of(node_of)


# -- Traffic -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", ["random", "sparse", "empty", "one-receiver", "uniform"])
def test_traffic_matches_reference(layout, pattern):
    node_of = LAYOUTS[layout]
    P = len(node_of)
    S = {"random": random_matrix(P, 3), "sparse": random_matrix(P, 4, density=0.2),
         "empty": np.zeros((P, P), np.int64), "uniform": np.full((P, P), 7, np.int64),
         "one-receiver": np.outer(np.arange(1, P + 1), np.eye(P, dtype=np.int64)[P - 1])}[pattern]
    got = _C.a2a_traffic(topo_of(node_of), S.astype(float).reshape(-1))
    assert got.shape == (2, 6, P)
    np.testing.assert_allclose(got, ref_traffic(node_of, S), rtol=1e-15, atol=0)


def test_traffic_halo_aggregates_per_node():
    """Two nodes of 2: node 0 sends rank 2 (node 1) 10 B from each of its ranks, nothing to
    rank 3. HALO: one message (of 20 B) from node 0, charged half to each of its ranks; flat:
    one 10 B message from each; the self block is nobody's traffic."""
    S = np.zeros((4, 4))
    S[0, 2] = S[1, 2] = 10
    S[0, 0] = 5
    t = _C.a2a_traffic(topo_of([0, 0, 1, 1]), S.reshape(-1))
    flat, halo = t
    assert list(flat[2]) == [1, 1, 0, 0] and list(flat[3]) == [10, 10, 0, 0]
    assert list(halo[2]) == [0.5, 0.5, 0, 0] and list(halo[3]) == [10, 10, 0, 0]
    assert list(halo[4]) == [2, 2, 2, 2]
    # copies: pack its own row, copy out what its node's ranks sent it (rank 2's 20 B came by
    # network: not a copy)
    assert list(halo[5]) == [15 + 5, 10, 0, 0]


def test_traffic_singleton_nodes_are_flat():
    S = random_matrix(4, 9).astype(float)
    t = _C.a2a_traffic(topo_of([0, 1, 2, 3]), S.reshape(-1))
    np.testing.assert_array_equal(t[0], t[1])
    assert t[0][0].sum() == 0 and t[0][2].sum() == np.count_nonzero(S * (1 - np.eye(4)))


# -- Schedules: flat -----------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_flat_plans_cover_every_pair_exactly_once(P, seed):
    S = random_matrix(P, seed, density=0.6)
    if seed == 2:
        S[:] = 1  # every block present: every pair must appear
    plans = [_C.plan_flat(r, S[r], S[:, r]) for r in range(P)]
    sent, received = {}, {}
    for r, p in enumerate(plans):
        sdispl, rdispl = displacements(S[r]), displacements(S[:, r])
        for d, off, ln in zip(p.sends.peer, p.sends.off, p.sends.len):
            assert (r, d) not in sent, f"{r}->{d} sent twice"
            assert d != r and ln == S[r, d] > 0 and off == sdispl[d]
            sent[r, d] = ln
        for s, off, ln in zip(p.recvs.peer, p.recvs.off, p.recvs.len):
            assert (s, r) not in received, f"{s}->{r} received twice"
            assert s != r and ln == S[s, r] > 0 and off == rdispl[s]
            received[s, r] = ln
        # the self block is a copy, never a message
        want_self = [(sdispl[r], rdispl[r], S[r, r])] if S[r, r] else []
        assert list(zip(p.self_copy.src_off, p.self_copy.dst_off, p.self_copy.len)) == want_self
    every = {(s, d): int(S[s, d]) for s, d in itertools.product(range(P), repeat=2)
             if s != d and S[s, d]}
    assert sent == every and received == every


@pytest.mark.parametrize("P", [2, 3, 4, 7])
def test_flat_plan_is_pairwise_ordered(P):
    """Step k: every rank sends to me+k and receives from me-k, so each step is a
    permutation (no rank is hit by all at once)."""
    S = np.ones((P, P), np.int64)
    plans = [_C.plan_flat(r, S[r], S[:, r]) for r in range(P)]
    for r, p in enumerate(plans):
        assert list(p.sends.peer) == [(r + k) % P for k in range(1, P)]
        assert list(p.recvs.peer) == [(r - k) % P for k in range(1, P)]
    for k in range(P - 1):
        assert sorted(p.sends.peer[k] for p in plans) == list(range(P))


def test_flat_plan_refuses_mismatched_sizes():
    with pytest.raises(PiperError, match="assertion"):
        _C.plan_flat(0, np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(PiperError, match="assertion"):
        _C.plan_flat(2, np.array([1, 2]), np.array([1, 2]))


# -- Schedules: HALO -----------------------------------------------------------------------

def halo_plans(node_of, S):
    t = topo_of(node_of)
    ref = RefTopology(node_of)
    return ref, [_C.plan_halo(t, r, S[ref.node_ranks[node_of[r]]].reshape(-1), S[:, r])
                 for r in range(len(node_of))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_halo_plans_move_every_block_once(layout, seed):
    node_of = LAYOUTS[layout]
    P = len(node_of)
    S = random_matrix(P, seed + 10, density=0.5 if seed else 1.0)
    ref, plans = halo_plans(node_of, S)
    for n, ranks in enumerate(ref.node_ranks):
        # segment layout: region of destination d, inside it the blocks of local ranks 0..L-1
        seg = S[ranks].sum()
        region = displacements(S[ranks].sum(axis=0))
        block = {(ranks[i], d): region[d] + S[ranks[:i], d].sum()
                 for i in range(len(ranks)) for d in range(P)}
        covered = np.zeros(seg, dtype=int)
        for r in ranks:
            p = plans[r]
            assert p.segment_bytes == seg
            sdispl = displacements(S[r])
            # pack: each non-empty block of r once, from its send offset to its segment slot
            assert sorted(zip(p.pack.src_off, p.pack.dst_off, p.pack.len)) == sorted(
                (sdispl[d], block[r, d], S[r, d]) for d in range(P) if S[r, d])
            for off, ln in zip(p.pack.dst_off, p.pack.len):
                covered[off:off + ln] += 1
            # local: one block from each rank of the node (self included), to its recv offset
            rdispl = displacements(S[:, r])
            assert sorted(zip(p.local.src_off, p.local.dst_off, p.local.len)) == sorted(
                (block[s, r], rdispl[s], S[s, r]) for s in ranks if S[s, r])
            assert p.intra_bytes == sum(S[r, d] for d in ranks if d != r)
        assert (covered == 1).all(), f"node {n}: segment bytes packed {set(covered)} times"
    # proxies: the region of every remote destination with bytes, once, by the rail proxy
    sent = {}
    for r, p in enumerate(plans):
        n = node_of[r]
        region = displacements(S[ref.node_ranks[n]].sum(axis=0))
        for d, off, ln in zip(p.sends.peer, p.sends.off, p.sends.len):
            assert node_of[d] != n and ref.proxy(n, d) == r
            assert off == region[d]  # straight from d's region of the segment
            assert (n, d) not in sent, f"node {n}'s region for {d} sent twice"
            assert ln == S[ref.node_ranks[n], d].sum() > 0
            sent[n, d] = (r, ln)
    want = {(n, d): (ref.proxy(n, d), int(S[ref.node_ranks[n], d].sum()))
            for n in range(ref.num_nodes) for d in range(P)
            if node_of[d] != n and S[ref.node_ranks[n], d].sum()}
    assert sent == want
    # receives: one message per remote node with bytes, from its proxy, matching the send
    for r, p in enumerate(plans):
        got = {}
        for src, off, ln, staged in zip(p.recvs.peer, p.recvs.off, p.recvs.len,
                                        p.recv_staged):
            m = node_of[src]
            assert m != node_of[r] and m not in got
            got[m] = ln
            assert sent[m, r] == (src, ln)
            assert bool(staged) == (not ref.contiguous(m))
            if not staged:
                assert off == displacements(S[:, r])[ref.node_ranks[m][0]]
        assert got == {m: v[1] for (m, d), v in sent.items() if d == r}
        staged_srcs = [s for m in got if not ref.contiguous(m) for s in ref.node_ranks[m]
                       if S[s, r]]
        assert p.staging_bytes == sum(S[s, r] for m in got if not ref.contiguous(m)
                                      for s in ref.node_ranks[m])
        assert len(p.unpack) == len(staged_srcs)
        assert p.unpack.bytes == sum(S[s, r] for s in staged_srcs)


def test_halo_plan_on_one_rank_node_per_rank_sends_one_message_per_peer():
    S = np.full((4, 4), 3, np.int64)
    _, plans = halo_plans([0, 1, 2, 3], S)
    for r, p in enumerate(plans):
        assert sorted(p.sends.peer) == [d for d in range(4) if d != r]
        assert len(p.local) == 1 and p.staging_bytes == 0
