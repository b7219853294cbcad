"""The link check's MPI job: `rounds` equal-split MPI_Alltoall of `bytes` bytes per rank.

    mpiexec ... python bench/cluster/probe.py --bytes 1048576 --rounds 5

Rank 0 prints one JSON line: ranks, hosts (one per node, in rank order of first appearance),
ranks per host, bytes, rounds and `seconds`, the slowest rank's median time of one exchange
after the first (warm-up) round. Only mpi4py is imported, so the probe starts in well under a
second.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import numpy as np
from mpi4py import MPI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--rounds", type=int, default=5, help="exchanges, the first one a warm-up")
    a = p.parse_args()
    w = MPI.COMM_WORLD
    block = a.bytes // w.size
    send = np.full(block * w.size, w.rank % 251, dtype=np.uint8)
    recv = np.empty_like(send)
    times = []
    for _ in range(max(2, a.rounds)):
        w.Barrier()
        t0 = time.perf_counter()
        w.Alltoall([send, MPI.BYTE], [recv, MPI.BYTE])
        times.append(time.perf_counter() - t0)
    expect = np.repeat(np.arange(w.size) % 251, block).astype(np.uint8)
    wrong = w.allreduce(int(np.count_nonzero(recv != expect)), op=MPI.SUM)
    mine = statistics.median(times[1:])
    worst = w.allreduce(mine, op=MPI.MAX)
    hosts = w.gather(socket.gethostname())
    if w.rank == 0:
        names = list(dict.fromkeys(hosts))
        print(json.dumps({"ranks": w.size, "hosts": names,
                          "ppn": [hosts.count(h) for h in names], "bytes": block * w.size,
                          "rounds": max(2, a.rounds), "seconds": worst, "wrong": wrong,
                          "mpi": MPI.Get_library_version().splitlines()[0].strip()}),
              flush=True)


if __name__ == "__main__":
    main()
