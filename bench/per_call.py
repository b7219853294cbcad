"""Per-call overhead of Piper's all-to-all on one rank: what a call costs when nothing moves.

    python bench/per_call.py [--calls 20000]

One process (no launcher), 1 KiB numpy and torch arrays with `recv` given, default checks;
prints microseconds per call (median of 5 rounds) for all_to_all and all_to_all_v."""

import argparse
import statistics
import time

import numpy as np

import piper_comm as pc


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    comm = pc.init(backend="single")
    x = np.ones(256, np.float32)
    r = np.empty_like(x)
    rows = [("all_to_all numpy", lambda: comm.all_to_all(x, recv=r)),
             ("all_to_all_v numpy", lambda: comm.all_to_all_v(x, [256], recv=r,
                                                              recv_counts=[256]))]
    try:
        import torch

        t, tr = torch.ones(256), torch.empty(256)
        rows.append(("all_to_all torch", lambda: comm.all_to_all(t, recv=tr)))
    except ImportError:
        pass
    print(f"# piper {pc.build_info()['version']}, transport {comm.transport}, "
          f"{args.calls} calls x 5 rounds, median")
    for name, fn in rows:
        print(f"{name:24s} {per_call_us(fn, args.calls):8.2f} us per call")


if __name__ == "__main__":
    main()
