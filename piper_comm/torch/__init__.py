"""Piper for PyTorch: drop-in collectives, autograd functions and the "piper" backend.

Two ways in:

    import piper_comm.torch as pt                 # 1. call Piper directly
    out = pt.all_to_all_single(out, x, out_splits, in_splits)   # differentiable

    import piper_comm.torch                       # 2. an unchanged torch.distributed script
    dist.init_process_group("piper")              #    (torchrun or mpirun)

Importing this module registers the "piper" backend and, under mpirun/srun without RANK set,
fills torch's env:// variables from MPI (collective: every rank must import it).
"""

from __future__ import annotations

from .autograd import AllToAll, all_to_all_v
from .backend import PiperProcessGroup, register
from .functional import all_to_all, all_to_all_single
from .groups import resolve
from .mpi_env import fill_from_mpi

__all__ = ["AllToAll", "PiperProcessGroup", "all_to_all", "all_to_all_single", "all_to_all_v",
           "resolve"]

register()
fill_from_mpi()
