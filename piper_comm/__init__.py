"""Piper collectives: topology-aware all-to-all(v) for numpy arrays and torch tensors.

    import piper_comm as pc
    comm = pc.init()                       # mpirun / torchrun / single process
    recv = comm.all_to_all(send)           # send: [size * m, ...]
    recv, counts = comm.all_to_all_v(send, send_counts)
"""

from __future__ import annotations

from . import _C
from .bootstrap import init
from .communicator import Communicator
from .errors import (
    PiperError,
    PiperPeerError,
    PiperSystemError,
    PiperTimeoutError,
    PiperUsageError,
)

__version__ = "0.1.0"

__all__ = [
    "Communicator",
    "PiperError",
    "PiperPeerError",
    "PiperSystemError",
    "PiperTimeoutError",
    "PiperUsageError",
    "build_info",
    "init",
]


def build_info() -> dict:
    """What this installation contains: version, CUDA backend, the MPI library mpi4py loads
    ("mpi") and the one the C++ executor was linked against ("mpi_linked", False when the
    extension was built without MPI), NCCL version."""
    info = {"version": __version__, **_C.build_info(), "nccl_version": None, "mpi": None}
    if info["mpi_linked"]:
        info["mpi_linked"] = info["mpi_linked"].splitlines()[0].strip()
    try:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception as e:  # mpi4py or the MPI library missing
        info["mpi"] = f"unavailable ({e})"
    return info
