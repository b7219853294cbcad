"""How much of an async all-to-all hides behind compute (CPU hosts).

    mpirun -n 2 .venv/bin/python bench/async_overlap.py
    mpirun -genv PIPER_LOCAL_SIZE 2 -n 4 .venv/bin/python bench/async_overlap.py

Per repetition (--inner back-to-back calls between barriers, per call), max over ranks,
median over repetitions:
    T_comm  all_to_all of --mib MiB per rank, alone (synchronous call)
    T_comp  a loop of torch matmuls alone, sized to last about T_comm
    T_both  all_to_all(async_op=True), the same compute, then work.wait()
    hidden  (T_comm + T_comp - T_both) / T_comm: 1 = all communication hidden, 0 = none
            (negative: running both costs more than running them one after the other);
    bound   min(T_comm, T_comp) / T_comm, the most that can hide behind this compute.
Only rank 0 prints. Compute uses --threads torch threads per rank (default 1: the ranks,
their progress threads and the matmuls share the host's cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import piper_comm as pc


def _max_over_ranks(comm: pc.Communicator, value: float) -> float:
    mine = np.full((comm.size, 1), value, dtype=np.float64)
    return float(comm.all_to_all(mine).max())


def _compute(a: torch.Tensor, b: torch.Tensor, iters: int, sleep_s: float = 0.0) -> None:
    if sleep_s:  # --compute sleep: work that leaves the CPU idle (a GPU kernel, a slow peer)
        time.sleep(iters * sleep_s)
        return
    for _ in range(iters):
        torch.mm(a, b, out=b)
        b.mul_(1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=4.0, help="MiB each rank sends in total")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repetition")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dim", type=int, default=256, help="matmul size (dim x dim)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--algo", default="auto")
    ap.add_argument("--compute", choices=("matmul", "sleep"), default="matmul",
                    help="sleep: idle-CPU stand-in for compute (the upper bound of hiding)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    comm = pc.init()
    P = comm.size
    n = int(args.mib * (1 << 20)) // 4 // P * P
    send = np.random.default_rng(comm.rank).random(n, dtype=np.float32)
    recv = np.empty_like(send)
    a = torch.rand(args.dim, args.dim) / args.dim
    b = torch.rand(args.dim, args.dim)

    def timed(fn) -> float:
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.inner):
            fn()
        return _max_over_ranks(comm, (time.perf_counter() - t0) / args.inner)

    def comm_only() -> None:
        comm.all_to_all(send, recv, algorithm=args.algo)

    # Size the compute to about T_comm (same on every rank: the max is shared).
    for _ in range(args.warmup):
        comm_only()
    t_comm0 = statistics.median(timed(comm_only) for _ in range(5))
    t_mm = statistics.median(timed(lambda: _compute(a, b, 10)) for _ in range(3)) / 10
    iters = max(1, round(t_comm0 / t_mm))
    sleep_s = t_mm if args.compute == "sleep" else 0.0

    def both() -> None:
        work = comm.all_to_all(send, recv, algorithm=args.algo, async_op=True)
        _compute(a, b, iters, sleep_s)
        work.wait()

    both()  # starts the progress thread
    rows = {"comm": [], "comp": [], "both": []}
    for _ in range(args.reps):  # interleaved, so that drifts hit all three alike
        rows["comm"].append(timed(comm_only))
        rows["comp"].append(timed(lambda: _compute(a, b, iters, sleep_s)))
        rows["both"].append(timed(both))
    t_comm, t_comp, t_both = (statistics.median(rows[k]) for k in ("comm", "comp", "both"))
    hidden = (t_comm + t_comp - t_both) / t_comm
    if comm.rank == 0:
        print(f"# async_overlap: {P} ranks, {comm.num_nodes} node(s) of {comm.local_size}, "
              f"{args.mib:g} MiB per rank, algorithm {comm.last_algorithm}, "
              f"compute {iters} x {'matmul ' + str(args.dim) + '^2' if not sleep_s else 'sleep'}"
              f", torch threads {args.threads}, transport {comm._transport.name}, "
              f"{os.cpu_count()} cpus, median of {args.reps} x {args.inner} calls")
        print(f"# {'ranks':>5} {'local':>5} {'T_comm ms':>10} {'T_comp ms':>10} "
              f"{'T_both ms':>10} {'hidden':>7} {'bound':>6}")
        print(f"  {P:>5} {comm.local_size:>5} {1e3 * t_comm:>10.2f} {1e3 * t_comp:>10.2f} "
              f"{1e3 * t_both:>10.2f} {hidden:>7.2f} {min(t_comm, t_comp) / t_comm:>6.2f}")
    comm.close()


if __name__ == "__main__":
    main()
