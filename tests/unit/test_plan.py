"""csrc/plan in one process: the HALO plan of every rank, executed by a simulator, must
deliver exactly what MPI_Alltoallv would, for random topologies and counts."""

import numpy as np
import pytest

from piper_comm import _C


def _simulate_halo(node_of, S):
    """Runs every rank's plan: pack into node segments, proxies' messages, local copies."""
    P = len(node_of)
    topo = _C.Topology(np.asarray(node_of, dtype=np.int64))
    rng = np.random.default_rng(0)
    sends = [rng.integers(0, 256, size=int(S[r].sum()), dtype=np.uint8) for r in range(P)]
    recvs = [np.zeros(int(S[:, r].sum()), dtype=np.uint8) for r in range(P)]
    plans, segments = {}, {}
    for r in range(P):
        n = node_of[r]
        locals_ = list(topo.node_ranks(n))
        plans[r] = _C.plan_halo(topo, r, S[locals_].reshape(-1), S[:, r])
        segments.setdefault(n, np.zeros(plans[r].segment_bytes, dtype=np.uint8))
        assert plans[r].segment_bytes == S[locals_].sum()
    for r in range(P):
        seg = segments[node_of[r]]
        _C.copy_blocks(sends[r].ctypes.data, sends[r].nbytes, seg.ctypes.data, seg.nbytes,
                       plans[r].pack)
    # Match every proxy send with exactly one receive of the same size.
    inbox = {}
    for r in range(P):
        seg = segments[node_of[r]]
        for d, off, ln in zip(plans[r].sends.peer, plans[r].sends.off, plans[r].sends.len):
            assert (r, d) not in inbox
            inbox[(r, d)] = seg[off:off + ln].copy()
    for r in range(P):
        p = plans[r]
        staging = np.zeros(p.staging_bytes, dtype=np.uint8)
        for src, off, ln, staged in zip(p.recvs.peer, p.recvs.off, p.recvs.len, p.recv_staged):
            msg = inbox.pop((src, r))
            assert msg.size == ln
            (staging if staged else recvs[r])[off:off + ln] = msg
        seg = segments[node_of[r]]
        _C.copy_blocks(seg.ctypes.data, seg.nbytes, recvs[r].ctypes.data, recvs[r].nbytes,
                       p.local)
        if len(p.unpack):
            _C.copy_blocks(staging.ctypes.data, staging.nbytes, recvs[r].ctypes.data,
                           recvs[r].nbytes, p.unpack)
    assert not inbox, f"messages nobody received: {list(inbox)}"
    return sends, recvs


def _reference(sends, S):
    P = len(sends)
    displ = [np.concatenate([[0], np.cumsum(S[r])]) for r in range(P)]
    return [np.concatenate([sends[i][displ[i][r]:displ[i][r + 1]] for i in range(P)])
            if S[:, r].sum() else np.zeros(0, np.uint8) for r in range(P)]


LAYOUTS = {
    "one-node": [0, 0, 0, 0],
    "uniform": [0, 0, 1, 1, 2, 2],
    "uneven": [0, 0, 0, 1, 1, 2],
    "singletons": [0, 1, 2, 3, 4],
    "interleaved": [0, 1, 0, 1, 2, 2, 0],
    "big-small": [0, 0, 0, 0, 0, 1],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(5))
def test_halo_plan_delivers_alltoallv(layout, seed):
    node_of = LAYOUTS[layout]
    P = len(node_of)
    rng = np.random.default_rng(seed)
    S = rng.integers(0, 40, size=(P, P)) * (rng.random((P, P)) > 0.3)
    if seed == 1:
        S[:] = 0
    if seed == 2:
        S[:] = 0
        S[:, P - 1] = rng.integers(1, 50, size=P)
    sends, recvs = _simulate_halo(node_of, S)
    for r, (got, want) in enumerate(zip(recvs, _reference(sends, S))):
        assert np.array_equal(got, want), f"rank {r}"


def test_halo_messages_per_rank_is_nodes_minus_one():
    """The point of HALO: with N equal nodes each rank sends N-1 network messages."""
    node_of = [n for n in range(4) for _ in range(4)]
    topo = _C.Topology(np.asarray(node_of, dtype=np.int64))
    S = np.ones((16, 16), dtype=np.int64)
    for r in range(16):
        locals_ = list(topo.node_ranks(node_of[r]))
        p = _C.plan_halo(topo, r, S[locals_].reshape(-1), S[:, r])
        assert len(p.sends) == 3 and len(p.recvs) == 3
        assert set(p.sends.peer) == {d for d in range(16)
                                     if node_of[d] != node_of[r] and d % 4 == r % 4}
    flat = _C.plan_flat(0, S[0], S[:, 0])
    assert len(flat.sends) == 15


def test_flat_plan_offsets():
    p = _C.plan_flat(1, np.array([3, 0, 2]), np.array([1, 4, 0]))
    assert list(p.sends.peer) == [2, 0] and list(p.sends.off) == [3, 0]
    assert list(p.recvs.peer) == [0] and list(p.recvs.off) == [0] and list(p.recvs.len) == [1]
    assert list(p.self_copy.len) == [] and p.self_copy.bytes == 0


def test_halo_plan_rejects_count_disagreement():
    topo = _C.Topology(np.array([0, 0], dtype=np.int64))
    S = np.array([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="expects"):
        _C.plan_halo(topo, 0, S.reshape(-1), np.array([1, 9]))


def test_topology_and_proxy():
    t = _C.Topology(np.array([0, 0, 0, 1, 1], dtype=np.int64))
    assert t.num_nodes == 2 and not t.uniform and t.contiguous(0)
    assert [t.proxy(1, d) for d in range(5)] == [3, 4, 3, 3, 4]
    assert [t.proxy(0, d) for d in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="no ranks"):
        _C.Topology(np.array([0, 2], dtype=np.int64))


def test_copy_blocks_refuses_out_of_bounds():
    a, b = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    p = _C.plan_flat(0, np.array([8]), np.array([9]))  # self block of 8 into a 9-byte slot
    _C.copy_blocks(a.ctypes.data, 8, b.ctypes.data, 8, p.self_copy)
    bad = _C.plan_flat(0, np.array([9]), np.array([9]))
    with pytest.raises(Exception, match="exceeds buffers"):
        _C.copy_blocks(a.ctypes.data, 8, b.ctypes.data, 8, bad.self_copy)
