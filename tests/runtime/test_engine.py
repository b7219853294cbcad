"""The pipeline engine computes the gradients of the unpipelined model under every schedule,
with and without data parallelism (mpirun; toy float64 model, see tests/runtime/cases.py)."""

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi

CASES = [  # (ranks, pp, dp, vpp, schedule, micro-batches)
    (2, 2, 1, 1, "gpipe", 3), (2, 2, 1, 1, "1f1b", 3), (2, 2, 1, 1, "zb-h1", 3),
    (2, 2, 1, 2, "interleaved", 4), (4, 2, 2, 1, "1f1b", 2), (4, 2, 2, 1, "zb-h1", 2),
    (4, 4, 1, 1, "zb-h1", 5), (4, 2, 2, 2, "interleaved", 2),
]


@pytest.mark.parametrize(("nprocs", "pp", "dp", "vpp", "schedule", "M"), CASES,
                         ids=[f"np{c[0]}-pp{c[1]}-dp{c[2]}-{c[4]}" + (f"-vpp{c[3]}" if c[3] > 1
                              else "") for c in CASES])
def test_engine_equals_unpipelined(nprocs, pp, dp, vpp, schedule, M):
    run = run_mpi(nprocs, "runtime.cases:engine_matches_reference",
                  {"pp": pp, "dp": dp, "vpp": vpp, "schedule": schedule, "num_micro": M})
    # every rank compared every parameter of its chunks (first/last chunks have 3-4)
    assert all(r["result"] >= 2 * vpp for r in run.ranks)


def test_pipeline_innermost_order():
    """order "pp,ep,edp": pipeline neighbours are consecutive ranks, replicas far apart."""
    run = run_mpi(4, "runtime.cases:engine_matches_reference",
                  {"pp": 2, "dp": 2, "vpp": 1, "schedule": "1f1b", "num_micro": 2,
                   "order": "pp,ep,edp"})
    assert all(r["result"] >= 2 for r in run.ranks)


@pytest.mark.own_job  # rank 1 never joins: the job's groups are broken afterwards
def test_trainer_collectives_over_mesh_groups_are_bounded_and_named():
    """A data-parallel peer that never joins: the mesh's groups time out after PIPER_TIMEOUT
    (new_group would take gloo's 30 minutes), and the trainer's bounded waits name the
    operation, its ranks, its bytes and this rank."""
    run = run_mpi(2, "runtime.cases:dp_peer_skips_all_reduce", env={"PIPER_TIMEOUT": "3"},
                  timeout=120)
    res = run.ranks[0]["result"]
    assert res["plain"] != "no error" and 2.5 < res["plain_s"] < 30, res
    assert res["bounded"].startswith("piper_moe: rank 0: the expert gradient all-reduce over "
                                     "ranks [0, 1] (16 B) did not complete within 3 s"), res
    assert 2.5 < res["bounded_s"] < 30, res
    assert res["barrier"].startswith("piper_moe: rank 0: a checkpoint barrier over the 2 ranks "
                                     "of the job did not complete within 3 s"), res
    assert 2.5 < res["barrier_s"] < 30, res


def test_stuck_peer_times_out_with_a_clear_error():
    run = run_mpi(2, "runtime.cases:peer_never_sends", env={"PIPER_TIMEOUT": "3"}, timeout=120)
    res = run.ranks[1]["result"]
    msg = res["message"]
    assert "rank 1" in msg and "receive of the activation of micro-batch 0" in msg
    assert "from stage 0 on rank 0" in msg and "[2, 5, 8]" in msg and "PIPER_TIMEOUT" in msg
    assert 2.5 < res["seconds"] < 30
