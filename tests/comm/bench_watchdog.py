"""Rank-side script of test_bench_watchdog_ends_a_rank_stuck_in_mpi: rank 0 waits in
MPI_Barrier, which rank 1 never joins, under the benchmark's watchdog (-T 2)."""

import time

from mpi4py import MPI

from piper_comm.bench import Watchdog

world = MPI.COMM_WORLD
if world.rank == 0:
    Watchdog(2.0, "rank 0", world).arm("flat at 1 KiB")
    world.Barrier()
    print("the barrier returned", flush=True)
else:
    time.sleep(60)
