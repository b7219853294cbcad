"""Piper for PyTorch: drop-in collectives, autograd functions and the "piper" backend.

Two ways in:

    import piper_comm.torch as pt                 # 1. call Piper directly
    out = pt.all_to_all_single(out, x, out_splits, in_splits)   # differentiable

    import piper_comm.torch                       # 2. a torch.distributed script
    piper_comm.torch.fill_from_mpi()              #    under mpirun/srun: RANK etc. from MPI
    dist.init_process_group("piper")              #    (torchrun sets them itself)

Importing this module registers the "piper" backend with torch.distributed and does nothing
else: no communication, no environment variables. fill_from_mpi() is the one collective step a
script launched by mpirun/srun adds before init_process_group (a no-op under torchrun or when
RANK is already set).
"""

from __future__ import annotations

from .autograd import AllToAll, all_to_all_v
from .backend import PiperProcessGroup, register
from .functional import all_to_all, all_to_all_single
from .groups import resolve
from .mpi_env import fill_from_mpi

__all__ = ["AllToAll", "PiperProcessGroup", "all_to_all", "all_to_all_single", "all_to_all_v",
           "fill_from_mpi", "resolve"]

register()
