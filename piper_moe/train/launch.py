"""Process set-up and teardown of a training job: torch.distributed from any launcher, and a
clean exit.

    rank, world = launch()   # first thing on every rank (mpirun, srun, torchrun, or alone)
    ...
    finish(code)             # last thing: explicit teardown, then C exit() (see its docstring)
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

log = logging.getLogger("piper.moe")


def launch() -> tuple[int, int]:
    """Initialises torch.distributed when the job has several ranks (mpirun, srun, torchrun);
    returns (rank, world). One process: nothing to initialise."""
    import torch.distributed as dist

    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                        "SLURM_NTASKS"))
    if "WORLD_SIZE" not in os.environ and not mpi:
        return 0, 1
    import piper_comm.torch  # registers the "piper" backend

    piper_comm.torch.fill_from_mpi()  # under mpirun/srun: RANK, MASTER_ADDR, ... (collective)

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        from datetime import timedelta

        from piper_comm import envs

        # every gloo wait (gradient all-reduce, barriers) is bounded by PIPER_TIMEOUT too
        dist.init_process_group("piper", timeout=timedelta(seconds=envs.timeout()))
        # Tear the groups down before the interpreter does: gloo's threads must not be
        # destroyed while running at exit ("terminate called without an active exception").
        atexit.register(_shutdown)
    return dist.get_rank(), dist.get_world_size()


def _shutdown() -> None:
    import torch.distributed as dist

    from ..runtime.mesh import close_all

    if dist.is_initialized():
        try:  # no rank tears its connections down while a peer still uses them
            dist.barrier()
        except Exception as e:  # after a failure (timeout, dead peer) the groups are broken
            log.warning("piper_moe: teardown without a final barrier: %s", e)
        close_all()
        dist.destroy_process_group()


def finish(code: int = 0) -> None:
    """Ends a training process with exit status `code`; does not return. Call it last, on
    every rank.

    Collective: a barrier over the default group, then the process groups, the communicators
    the meshes built (and their progress threads) and MPI are torn down, and the process
    leaves through C's exit(): the C and C++ exit handlers run (MPI's among them), Python's
    finalisation does not. Why neither a normal exit nor os._exit: docs/performance.md, "Exit
    of a training job"."""
    sys.stdout.flush()
    sys.stderr.flush()
    _shutdown()
    if "mpi4py" in sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    logging.shutdown()
    _leave(code)


def _leave(code: int) -> None:
    """C's exit(code): the C and C++ exit handlers run (MPI's among them), Python's
    finalisation does not. PyDLL keeps the GIL held, so a handler that touches a Python object
    still can."""
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.PyDLL(None).exit(int(code))
