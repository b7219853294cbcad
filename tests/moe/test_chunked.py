"""Chunked pipelining of the MoE layer (pipeline_chunks) equals C = 1 bitwise (mpirun)."""

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [2, 4], ids=["ep2-ls2", "ep4-ls2"])
def test_chunks_exact(nprocs):
    run = run_mpi(nprocs, "moe.chunked_cases:exact", {"local_size": 2})
    # 2 token splits x 3 scenarios x C in (2, 3, 4)
    assert all(r["result"]["checks"] == 18 for r in run.ranks)


def test_auto_same_choice_and_exact():
    """Also: on the node-dedup path (EP=4 over 2 nodes) pipeline_chunks runs C = 1, logged."""
    run = run_mpi(4, "moe.chunked_cases:auto", {"local_size": 2})
    choices = {tuple(r["result"]["choices"]) for r in run.ranks}
    assert len(choices) == 1, choices
