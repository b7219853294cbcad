"""piper_comm.cost: the closed-form uniform case is predict() on the uniform matrix."""

import dataclasses

import numpy as np
import pytest

from piper_comm import cost

# Distinct powers of ten, so that a term charged at the wrong rate shows.
LINKS = cost.Links(alpha_intra=1e-6, beta_intra=1e9, alpha_inter=1e-5, beta_inter=1e8,
                   alpha_barrier=3e-6, beta_copy=1e10)


@pytest.mark.parametrize(("n", "g"), [(2, 1), (4, 1), (2, 2), (4, 4), (4, 2), (8, 2), (8, 4),
                                      (16, 4), (24, 8), (64, 8)])
@pytest.mark.parametrize("m", [0.0, 8e3, 8e6, 3.5e9])
@pytest.mark.parametrize("placement", ["blocked", "round_robin"])
def test_uniform_closed_form_is_predict_of_uniform_matrix(n, g, m, placement):
    nodes = n // g
    node_of = (np.repeat(np.arange(nodes), g) if placement == "blocked"
               else np.arange(n) % nodes)
    matrix = np.full((n, n), m / n)
    per_rank = cost.traffic(matrix, node_of)
    closed = cost.traffic_uniform(m, n, g)
    for algo in ("flat", "halo"):
        for f in dataclasses.fields(cost.Traffic):
            got = np.asarray(getattr(per_rank[algo], f.name), dtype=float)
            want = getattr(closed[algo], f.name)
            assert got == pytest.approx(np.full(got.shape, want), rel=1e-12, abs=0), (algo, f)
    t = cost.predict(matrix, node_of, LINKS)
    u = cost.predict_uniform(m, n, g, LINKS)
    assert u == pytest.approx(t, rel=1e-12, abs=1e-18)


def test_uniform_by_hand():
    # 8 ranks, 4 per node (2 nodes), 8 MB per rank -> b = 1 MB per rank
    t = cost.predict_uniform(8e6, 8, 4, LINKS)
    assert t["flat"] == pytest.approx(3 * (1e-6 + 1e6 / 1e9) + 4 * (1e-5 + 1e6 / 1e8))
    # 2 barriers, pack m, one message of g*b to the other node, copy out g*b
    assert t["halo"] == pytest.approx(2 * 3e-6 + 8e6 / 1e10 + (1e-5 + 4e6 / 1e8) + 4e6 / 1e10)
    # one node: no messages, only the barriers and the two copies
    one = cost.predict_uniform(8e6, 4, 4, LINKS)
    assert one["halo"] == pytest.approx(2 * 3e-6 + 2 * 8e6 / 1e10)
    # one-rank nodes: the executor runs flat
    solo = cost.predict_uniform(8e6, 4, 1, LINKS)
    assert solo["halo"] == solo["flat"] == pytest.approx(3 * (1e-5 + 2e6 / 1e8))
    assert cost.predict_uniform(8e6, 1, 1, LINKS) == {"flat": 0.0, "halo": 0.0}
    with pytest.raises(ValueError, match=r"ranks per node \(5\)"):
        cost.traffic_uniform(8e6, 4, 5)


def test_uneven_nodes_spread_messages_over_proxies():
    # nodes of 3 ranks and 1: node 0's one aggregated message (3 blocks, for rank 3) is spread
    # over its 3 ranks; rank 3 sends node 0's 3 ranks one block each and waits in no barrier
    node_of = np.array([0, 0, 0, 1])
    tr = cost.traffic(np.full((4, 4), 100.0), node_of)["halo"]
    assert tr.msgs_inter == pytest.approx([1 / 3, 1 / 3, 1 / 3, 3])
    assert tr.bytes_inter == pytest.approx([100, 100, 100, 300])
    assert list(tr.barriers) == [2, 2, 2, 0]
    assert tr.copy_bytes == pytest.approx([700, 700, 700, 500])
