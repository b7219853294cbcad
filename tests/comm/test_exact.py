"""Bitwise equality with a locally computed reference, every algorithm, dtype and layout."""

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi

# (ranks, local size or explicit node ids): 1..8 ranks, local sizes 1, 2, 4, uneven nodes
# (6 as 4+2, 8 as 3+3+2, 3 as 2+1, 5 as 2+2+1) and nodes that are not contiguous rank ranges.
LAYOUTS = [
    (1, None), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (4, 4), (5, 2),
    (6, 2), (6, 4), (8, 1), (8, 2), (8, 4), (8, 3),
]


@pytest.mark.parametrize(("nprocs", "local_size"), LAYOUTS,
                         ids=[f"np{n}-ls{ls}" for n, ls in LAYOUTS])
def test_exact_all_dtypes_algorithms_patterns(nprocs, local_size):
    run = run_mpi(nprocs, "comm.cases:exactness", {"local_size": local_size,
                                                    "full": nprocs in (1, 4, 6, 8)})
    assert all(r["result"] > 100 for r in run.ranks)  # sub-cases checked on every rank


@pytest.mark.parametrize("node_ids", [[0, 1, 0, 1, 2, 2], [1, 0, 0, 1, 1, 2, 0, 2]],
                         ids=["np6-interleaved", "np8-scattered"])
def test_exact_noncontiguous_nodes(node_ids):
    """Nodes whose ranks are not a contiguous range (round-robin placement): the staged path."""
    run = run_mpi(len(node_ids), "comm.cases:exactness",
                  {"node_ids": node_ids, "kinds": ["numpy"], "full": False})
    assert all(r["result"] > 50 for r in run.ranks)


@pytest.mark.parametrize("mpi_calls", ["cpp", "mpi4py"])
def test_exact_through_each_mpi_transport(mpi_calls):
    """The executor's MPI transport in C++ and, with PIPER_MPI_CALLS=mpi4py, the Python one."""
    run = run_mpi(4, "comm.cases:exactness", {"local_size": 2, "kinds": ["numpy"],
                                               "full": False, "expect_transport": mpi_calls},
                  env={"PIPER_MPI_CALLS": mpi_calls})
    assert all(r["result"] > 50 for r in run.ranks)


@pytest.mark.slow
@pytest.mark.parametrize(("nprocs", "local_size"), [(4, 2), (8, 4)])
def test_exact_64mib_per_rank(nprocs, local_size):
    run = run_mpi(nprocs, "comm.cases:big_blocks", {"local_size": local_size, "mib": 64},
                  timeout=600)
    assert all(r["result"] == 6 for r in run.ranks)
