"""Rank-side cases that misbehave on purpose, to test what tests/launch.py reports."""

import os
import signal
import time

from mpi4py import MPI


def rank_hangs(rank: int) -> int:
    """`rank` sleeps in a function whose name the stack dump must show; the others return."""
    if MPI.COMM_WORLD.Get_rank() == rank:
        hang_here_forever()
    return 0


def hang_here_forever() -> None:
    while True:
        time.sleep(1)


def rank_killed(rank: int) -> dict:
    """`rank` SIGKILLs itself; the others leave with status 1 a moment later."""
    if MPI.COMM_WORLD.Get_rank() == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    return {"hard_exit": 1}
