"""all_to_all(v) with async_op=True: results, errors, timeouts and close() on several ranks."""

import pytest

from tests.launch import run_mpi, run_torchrun

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize(("nprocs", "local_size"), [(2, None), (4, 2)], ids=["np2", "np4-ls2"])
def test_in_flight_ops_equal_sync_results(nprocs, local_size):
    run = run_mpi(nprocs, "comm.async_cases:in_flight", {"local_size": local_size}, timeout=120)
    assert all(r["result"] > 50 for r in run.ranks)


def test_errors_raise_from_wait_on_every_rank():
    run = run_mpi(3, "comm.async_cases:errors", {"local_size": 2}, timeout=120)
    assert {r["result"]["cases"] for r in run.ranks} == {3}


def test_wait_timeout_and_close_with_a_missing_peer():
    timeout = 3.0
    run = run_mpi(3, "comm.async_cases:peer_never_joins", {"timeout": timeout},
                  env={"PIPER_TIMEOUT": str(timeout)}, timeout=120, expect_ok=False)
    # Rank 2 skipped the op; ranks 0 and 1 checked the errors and that close() returned.
    for r in range(2):
        res = run.ranks[r]
        assert res is not None and res["status"] == "ok", run.report()
        assert res["result"]["took"] <= timeout + 5, run.report()


def test_close_with_pending_ops_completes_them():
    run = run_mpi(4, "comm.async_cases:close_pending", {"local_size": 2}, timeout=120)
    assert all(r["result"] == 8 for r in run.ranks)


def test_thread_level_below_multiple_is_refused():
    run = run_mpi(2, "comm.async_cases:thread_level",
                  env={"MPI4PY_RC_THREAD_LEVEL": "serialized"}, timeout=120)
    assert all(r["result"]["level"] < 3 for r in run.ranks)


def test_torchrun_transport():
    run = run_torchrun(2, "comm.async_cases:torch_transport", env={"PIPER_BACKEND": "torch"},
                       timeout=120)
    assert all(r["result"] > 10 for r in run.ranks)


def test_completed_buffers_are_released():
    run = run_mpi(2, "comm.async_cases:buffers_released", {"local_size": 2}, timeout=120)
    assert all(r["result"] == 3 for r in run.ranks)
