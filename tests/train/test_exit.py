"""A finished training job exits with status 0 under mpirun (piper_moe.train.launch.finish).

Regression: finish() used to leave through os._exit after MPI_Finalize. MPICH's hydra then
SIGKILLed the ranks that had finalised but not yet exited as soon as one rank exited, so a
successful run ended "killed by signal 9" (about 1 training test in 30 in CI; most launches of
this case with delay > 0). Several launches, because the race is timing-dependent."""

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("delay", [0.0, 0.1])
def test_finished_job_exits_cleanly(delay):
    """delay: rank r waits r * delay s between MPI_Finalize and its exit (with os._exit, 10 of
    12 bare-mpi4py jobs lost a rank that way)."""
    for _ in range(3):
        run = run_mpi(4, "train.train_cases:staggered_exit", {"delay": delay},
                      env={"PIPER_LOCAL_SIZE": "2"}, mpi_args=("-print-all-exitcodes",))
        assert [r["result"] for r in run.ranks] == [0, 1, 2, 3], run.report()
