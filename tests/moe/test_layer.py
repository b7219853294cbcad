"""The expert-parallel MoE layer equals the EP=1 reference under every layout (mpirun)."""

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi

# (ranks, local size, node ids): one-rank nodes, two nodes of two, and nodes that are not
# contiguous rank ranges (ranks 0 and 3 on node 1), where the dedup gateways are not rank + k.
LAYOUTS = [(2, 1, None), (4, 1, None), (4, 2, None), (4, None, [1, 0, 0, 1]), (8, 1, None),
           (8, 2, None), (8, 4, None)]


@pytest.mark.parametrize(("nprocs", "local_size", "node_ids"), LAYOUTS,
                         ids=["np2-ls1", "np4-ls1", "np4-ls2", "np4-nodes1001", "np8-ls1",
                              "np8-ls2", "np8-ls4"])
def test_exact_vs_reference(nprocs, local_size, node_ids):
    run = run_mpi(nprocs, "moe.cases:exactness", {"local_size": local_size,
                                                   "node_ids": node_ids})
    assert all(r["result"] == 6 * 3 + 1 for r in run.ranks)


def test_gradcheck_ep2():
    """Two one-rank nodes, so the dedup path crosses nodes too."""
    run = run_mpi(2, "moe.cases:gradcheck", {"local_size": 1})
    assert all(r["result"] == 2 for r in run.ranks)
