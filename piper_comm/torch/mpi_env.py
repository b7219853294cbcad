"""torch.distributed's env:// rendezvous under mpirun / srun: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT filled in from MPI, so that an unchanged
`dist.init_process_group("piper")` works under an MPI launcher as it does under torchrun.
Variables already set are kept (torchrun, Slurm scripts that export them)."""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from .. import envs
from ..bootstrap import _detect


def fill_from_mpi() -> bool:
    """Fills the variables when launched by MPI and RANK is unset; returns whether it did.

    Call it on every rank before dist.init_process_group() in a job that mpirun/srun
    started: it is collective over MPI's COMM_WORLD (one all-gather of each rank's host name,
    through a transport it closes again). Costs one MPI start-up if mpi4py was not yet
    initialised, plus that all-gather. Under torchrun, or with RANK set, it returns False
    at once without communicating."""
    if "RANK" in os.environ or _detect() != "mpi":
        return False
    from mpi4py import MPI

    from ..transport import MpiTransport
    from ..validate import exchange

    timeout = envs.timeout()
    transport = MpiTransport(MPI.COMM_WORLD, timeout)
    rank, size = transport.rank, transport.size
    port = 0
    if rank == 0 and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port now; the TCPStore binds it right after
            s.bind(("", 0))
            port = s.getsockname()[1]
    host = socket.gethostname().encode()[:200].ljust(200, b"\0")
    row = np.concatenate([[port, len(socket.gethostname().encode()[:200])],
                          np.frombuffer(host, dtype=np.int64)])
    table = exchange(transport, row.astype(np.int64), 32200, "mpi rendezvous",
                     time.monotonic() + timeout, timeout)
    transport.close()
    names = [r[2:].tobytes()[:int(r[1])].decode() for r in table]
    local = [r for r in range(size) if names[r] == names[rank]]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local.index(rank)),
                      LOCAL_WORLD_SIZE=str(len(local)))
    os.environ.setdefault("MASTER_ADDR", names[0])
    os.environ.setdefault("MASTER_PORT", str(int(table[0, 0])))
    return True
