"""pc.init() under each launcher: mpirun (the other tests), torchrun, srun, one process."""

import shutil

import numpy as np
import pytest

import piper_comm as pc
from tests.launch import run_torchrun


def test_single_process():
    comm = pc.init(backend="single")
    assert (comm.rank, comm.size, comm.num_nodes, comm.local_size) == (0, 1, 1, 1)
    x = np.arange(10, dtype=np.int16).reshape(5, 2)
    out, counts = comm.all_to_all_v(x, [5])
    assert counts == [5] and np.array_equal(out, x)
    assert np.array_equal(comm.all_to_all(x), x)
    comm.close()
    comm.close()  # idempotent


@pytest.mark.mpi
@pytest.mark.parametrize("local_size", [1, 2])
def test_torchrun_gloo(local_size):
    run = run_torchrun(4, "comm.cases:exactness", {"local_size": local_size, "full": False},
                       env={"PIPER_BACKEND": "torch"})
    assert all(r["result"] > 100 for r in run.ranks)


@pytest.mark.skipif(shutil.which("srun") is None,
                    reason="srun (Slurm) is not installed here; under srun pc.init() uses MPI "
                           "through PMI, the same path as mpirun")
def test_srun():  # pragma: no cover - needs a Slurm cluster
    import subprocess
    import sys

    out = subprocess.run(["srun", "-n", "2", sys.executable, "-c",
                          "import piper_comm as pc; c = pc.init(); print(c.size)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "2"]
