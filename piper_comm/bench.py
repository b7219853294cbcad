"""nccl-tests-style collective benchmark: Piper's all-to-all against MPI and torch gloo (CPU)
or torch NCCL (CUDA).

    mpirun -n 8 python -m piper_comm.bench --op alltoall -b 8 -e 64M -f 2 \\
        --algos halo,flat,mpi,gloo --local-size 4 --json r.json --plot r.png
    mpirun -n 4 python -m piper_comm.bench --device cuda --algos halo,flat,nccl --local-size 2

Definitions (nccl-tests doc/PERFORMANCE.md):
  size   bytes one rank sends in total (all n blocks); count = size / itemsize elements.
  time   per-rank mean of `iters` timed calls (after `warmup` calls and a barrier), then the
         MAX over ranks, in microseconds.
  algbw  size / time, in GB/s (1e9 bytes/s).
  busbw  algbw * (n-1)/n: of the data a rank sends, (n-1)/n crosses a link (its own block
         stays), so busbw is comparable to the link bandwidth whatever the rank count.
  #wrong elements that differ from the expected values, summed over ranks. Data is a pure
         function of (seed, src, dst, idx) written as raw bits, so every rank checks its
         receive buffer locally (once per size and algorithm, after timing, into a buffer
         first filled with a sentinel).
Algorithms: halo | flat | pairwise | auto: Piper `comm.all_to_all(send, recv=recv, algorithm=)`;
mpi: mpi4py `COMM_WORLD.Alltoall` (MPI.BYTE) on the same buffers; gloo: torch.distributed
`all_to_all_single` on tensors sharing those buffers; nccl (--device cuda): torch.distributed's
NCCL `all_to_all_single` on the same device tensors. With --device cuda every rank uses CUDA
device local_rank % device_count, the data is made on the host and copied over once per size,
and a timed loop ends with torch.cuda.synchronize() (the calls only enqueue work). SUMMARY
ratios are time(baseline) / time(piper): > 1 means Piper is faster. The exit code is 1 when
any #wrong > 0.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

import piper_comm as pc

PIPER_ALGOS = ("halo", "flat", "pairwise", "auto")
ALL_ALGOS = (*PIPER_ALGOS, "mpi", "gloo", "nccl")
HOST_ONLY, DEVICE_ONLY = ("mpi", "gloo"), ("nccl",)
DTYPES = ("float32", "float64", "float16", "int32", "int64", "int8", "uint8")
_K = 2654435761  # odd multiplier: idx -> idx * _K is a bijection mod 2**bits


# -- seed-derived data, checked bitwise through an unsigned view
def _uview(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.itemsize}"))


def _base(seed: int, src: int, dst: int) -> int:
    return (((seed * 1_000_003 + src) * 1_000_033 + dst) * 0x9E3779B97F4A7C15 >> 11) % 2**64


def _block(out: np.ndarray, ramp: np.ndarray, seed: int, src: int, dst: int) -> None:
    """out[idx] = (base(seed, src, dst) + idx * _K) mod 2**bits (out: unsigned view)."""
    np.add(ramp, ramp.dtype.type(_base(seed, src, dst) % 2 ** (8 * ramp.itemsize)), out=out,
           casting="unsafe")


def _ramp(m: int, itemsize: int) -> np.ndarray:
    wt = np.uint64 if itemsize == 8 else np.uint32
    return np.arange(m, dtype=wt) * wt(_K)


def a2a_fill(send: np.ndarray, seed: int, rank: int, n: int) -> None:
    su, m = _uview(send), send.size // n
    ramp = _ramp(m, send.itemsize)
    for dst in range(n):
        _block(su[dst * m:(dst + 1) * m], ramp, seed, rank, dst)


def a2a_wrong(recv: np.ndarray, seed: int, rank: int, n: int) -> int:
    ru, m = _uview(recv), recv.size // n
    ramp, want = _ramp(m, recv.itemsize), np.empty(m, ru.dtype)
    wrong = 0
    for src in range(n):
        _block(want, ramp, seed, src, rank)
        wrong += int(np.count_nonzero(ru[src * m:(src + 1) * m] != want))
    return wrong


@dataclass(frozen=True)
class OpSpec:
    """One collective, nccl-tests testColl style; the harness owns everything else."""
    name: str
    count: Callable[[int, int, int], int]  # (bytes, nranks, itemsize) -> elements a rank sends
    recv_count: Callable[[int, int], int]  # (send count, nranks) -> elements a rank receives
    bus_factor: Callable[[int], float]     # busbw = algbw * bus_factor(nranks)
    fill: Callable[[np.ndarray, int, int, int], None]   # (send, seed, rank, nranks)
    wrong: Callable[[np.ndarray, int, int, int], int]   # (recv, seed, rank, nranks)
    runner: Callable[[Ctx, str, np.ndarray, np.ndarray], Callable[[], None]]
    redop: str = "none"
    root: int = -1


@dataclass
class Ctx:
    comm: pc.Communicator
    world: MPI.Intracomm
    torch: object = None
    dist: object = None
    device: str = "cpu"  # "cpu", or "cuda:<i>": the runners get device tensors


def a2a_runner(ctx: Ctx, algo: str, send, recv) -> Callable[[], None]:
    """send, recv: numpy arrays (CPU) or torch device tensors (--device cuda)."""
    if algo in PIPER_ALGOS:
        return lambda: ctx.comm.all_to_all(send, recv=recv, algorithm=algo)
    if algo == "nccl":
        return lambda: ctx.dist.all_to_all_single(recv, send)
    if algo == "mpi":
        sb, rb = [send.view(np.uint8), MPI.BYTE], [recv.view(np.uint8), MPI.BYTE]
        return lambda: ctx.world.Alltoall(sb, rb)
    ti, to = ctx.torch.from_numpy(send), ctx.torch.from_numpy(recv)
    return lambda: ctx.dist.all_to_all_single(to, ti)


OPS = {"alltoall": OpSpec(
    "alltoall", count=lambda b, n, isz: b // isz // n * n, recv_count=lambda c, n: c,
    bus_factor=lambda n: (n - 1) / n, fill=a2a_fill, wrong=a2a_wrong, runner=a2a_runner)}


# -- helpers
def parse_size(s: str) -> int:
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:].upper(), 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def human(b: int) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:g} {unit}"
    return f"{b} B"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def init_gloo(ctx: Ctx, timeout: float) -> str | None:
    """Starts a gloo group on the MPI ranks; returns the reason when it cannot."""
    try:
        import torch
    except ImportError as e:
        return f"torch missing ({e})"
    torch.set_num_threads(1)
    init_group(ctx, "gloo", timeout)
    return None


def init_cuda(ctx: Ctx, algos: list[str], timeout: float) -> None:
    """Picks this rank's device (local rank modulo the devices) and, for the nccl baseline,
    starts torch.distributed's NCCL group on the MPI ranks."""
    import torch

    ctx.torch = torch
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dev = ctx.comm.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(dev)
    ctx.device = f"cuda:{dev}"
    if "nccl" in algos:
        init_group(ctx, "nccl", timeout)


def init_group(ctx: Ctx, backend: str, timeout: float) -> None:
    """A torch.distributed group of `backend` on the MPI ranks (rendezvous on rank 0's host)."""
    import torch
    import torch.distributed as dist

    w = ctx.world
    port = 0
    if w.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = w.bcast(port, root=0)
    hosts = w.allgather(socket.gethostname())
    if len(set(hosts)) == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        os.environ.update(MASTER_ADDR=hosts[0])
    os.environ["MASTER_PORT"] = str(port)
    kwargs = {"device_id": torch.device(ctx.device)} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method="env://", rank=w.rank, world_size=w.size,
                            timeout=datetime.timedelta(seconds=timeout), **kwargs)
    ctx.torch, ctx.dist = torch, dist


def measure(run: Callable[[], None], world: MPI.Intracomm, warmup: int, iters: int,
            sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        run()
    sync()
    world.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    sync()
    mine = (time.perf_counter() - t0) / iters
    return world.allreduce(mine, op=MPI.MAX)


def crossover(sizes: list[int], wins: list[bool]) -> str:
    if not any(wins):
        return "never"
    first = sizes[wins.index(True)]
    good = next((sizes[i] for i in range(len(wins)) if all(wins[i:])), None)
    tail = f", at every size from {human(good)}" if good is not None else ", not sustained"
    return f"first at {human(first)}{tail}"


def summary(rows: list[dict], algos: list[str]) -> tuple[list[str], dict]:
    t = {(r["algo"], r["size"]): r["time_us"] for r in rows}
    sizes = sorted({r["size"] for r in rows})
    pairs = [(p, b) for p in ("halo", "flat") for b in ("mpi", "gloo", "nccl")
             if {p, b} <= set(algos)]
    ratios = {f"{p}_vs_{b}": [t[b, s] / t[p, s] for s in sizes] for p, b in pairs}
    geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items() if v}
    if pairs:
        out = ["#", "# SUMMARY: time(baseline) / time(piper); > 1 = Piper faster",
               "# " + f"{'size':>10}" + "".join(f"{p + ' vs ' + b:>15}" for p, b in pairs)]
        for i, s in enumerate(sizes):
            out.append("# " + f"{s:>10}" + "".join(f"{ratios[f'{p}_vs_{b}'][i]:>15.3f}"
                                                   for p, b in pairs))
        out.append("# " + f"{'geomean':>10}" + "".join(f"{geo[k]:>15.3f}" for k in geo))
    else:
        out = ["#", f"# SUMMARY: no baseline among the algorithms ({','.join(algos)}): no "
               f"Piper/baseline ratios"]
    cross = {}
    for p, b in (("halo", "flat"), ("halo", "mpi"), ("halo", "gloo"), ("flat", "mpi"),
                 ("halo", "nccl"), ("flat", "nccl")):
        if {p, b} <= set(algos) and sizes:
            cross[f"{p}<{b}"] = crossover(sizes, [t[p, s] < t[b, s] for s in sizes])
            out.append(f"# crossover {p} beats {b}: {cross[f'{p}<{b}']}")
    auto = auto_summary(rows) if {"auto", "halo", "flat"} <= set(algos) else {}
    if auto:
        out.append("# auto: " + ", ".join(
            f"{human(s)} {c} {r:.2f}x" for s, c, r in zip(sizes, auto["chosen"], auto["ratio"]))
            + f"; geomean {auto['geomean']:.2f}x the faster of halo and flat")
    summ = {"sizes": sizes, "ratios": ratios, "geomean": geo, "crossover": cross}
    return out, {**summ, "auto": auto} if auto else summ


def auto_summary(rows: list[dict]) -> dict:
    """What algorithm="auto" ran at each size ("chosen") and its time over the faster of halo
    and flat measured in the same run ("ratio": 1.0 = it chose the faster one and paid nothing
    for choosing; noise moves single sizes by tens of percent on a loaded host)."""
    t = {(r["algo"], r["size"]): r for r in rows}
    sizes = sorted({r["size"] for r in rows})
    ratio = [t["auto", s]["time_us"] / min(t["halo", s]["time_us"], t["flat", s]["time_us"])
             for s in sizes]
    return {"chosen": [t["auto", s]["chosen"] for s in sizes], "ratio": ratio,
            "geomean": math.exp(sum(map(math.log, ratio)) / len(ratio)) if ratio else 1.0}


def plot(path: str, rows: list[dict], algos: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    t = {(r["algo"], r["size"]): r for r in rows}
    base = "nccl" if "nccl" in algos else "mpi"
    for k, algo in enumerate(algos):
        pts = sorted((r["size"], r["busbw"]) for r in rows if r["algo"] == algo)
        a1.plot(*zip(*pts), marker="o", ms=3, label=algo, color=f"C{k}")
        if base in algos and algo != base:
            a2.plot([s for s, _ in pts], [t[base, s]["time_us"] / t[algo, s]["time_us"]
                                          for s, _ in pts], marker="o", ms=3, label=algo,
                    color=f"C{k}")
    a1.set(xscale="log", yscale="log", ylabel="busbw (GB/s)", title=title)
    a2.axhline(1.0, color="gray", lw=0.8, ls="--")
    a2.set(xscale="log", yscale="log", xlabel="bytes a rank sends",
           ylabel=f"time({base}) / time(algo)  (>1 = faster than {base})")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_comm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="alltoall", choices=sorted(OPS))
    p.add_argument("-b", "--minbytes", default="8", type=parse_size)
    p.add_argument("-e", "--maxbytes", default="64M", type=parse_size)
    p.add_argument("-f", "--stepfactor", default=2, type=int)
    p.add_argument("-n", "--iters", default=20, type=int)
    p.add_argument("-w", "--warmup", default=5, type=int)
    p.add_argument("--algos", default="halo,flat,mpi,gloo")
    p.add_argument("--local-size", default=None, type=int,
                   help="ranks per emulated node (default PIPER_LOCAL_SIZE, else host names)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the buffers live (cuda: torch tensors on local_rank's device)")
    p.add_argument("-c", "--check", default=1, type=int, help="1: verify every size")
    p.add_argument("-J", "--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("-T", "--timeout", default=0, type=float,
                   help="seconds per size and algorithm (every call, check and barrier of it) "
                        "before the job is aborted with the rank, size and algorithm named; "
                        "also each Piper call's deadline (0: PIPER_TIMEOUT, default 300)")
    a = p.parse_args(argv)
    a.algos = [x for x in a.algos.split(",") if x]
    bad = [x for x in a.algos if x not in ALL_ALGOS]
    if bad or not a.algos or a.stepfactor < 2 or a.iters < 1 or a.minbytes > a.maxbytes:
        p.error(f"bad arguments (unknown algos {bad}; need -f >= 2, -n >= 1, -b <= -e)")
    wrong_place = [x for x in a.algos if x in (HOST_ONLY if a.device == "cuda" else DEVICE_ONLY)]
    if wrong_place:
        p.error(f"--algos {','.join(wrong_place)} cannot run with --device {a.device} "
                f"(host baselines: {', '.join(HOST_ONLY)}; CUDA baseline: nccl)")
    return a


class Watchdog:
    """Bounds one size and algorithm of the benchmark, MPI's own barriers and reductions and
    the device syncs included (none of which has a deadline, and a Python signal handler
    cannot run while the main thread waits inside one): a daemon thread that, once ``seconds``
    pass between arm() and disarm(), prints what this rank was measuring and every thread's
    stack, then aborts the job (MPI_Abort under MPI_THREAD_MULTIPLE, else this process exits
    and the launcher ends the others)."""

    def __init__(self, seconds: float, who: str, world: MPI.Comm):
        self.seconds, self.who, self.world = seconds, who, world
        self._cond = threading.Condition()
        self._what: str | None = None
        self._armed_at = 0.0
        threading.Thread(target=self._watch, name="piper-bench-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        with self._cond:
            self._what, self._armed_at = what, time.monotonic()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._what = None
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._what is None:
                    self._cond.wait()
                    continue
                left = self._armed_at + self.seconds - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                print(f"{self.who}: Test timeout: {self._what} did not finish within "
                      f"{self.seconds:g} s (-T); aborting the job", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                if MPI.Query_thread() == MPI.THREAD_MULTIPLE:
                    self.world.Abort(1)
                os._exit(1)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    world = MPI.COMM_WORLD
    comm = pc.init(local_size=a.local_size, timeout=a.timeout or None)
    ctx, op, n, me = Ctx(comm, world), OPS[a.op], world.size, world.rank
    P = print if me == 0 else (lambda *_, **__: None)

    watchdog = Watchdog(a.timeout or comm.timeout, f"{socket.gethostname()}: rank {me}", world)

    algos, notes = list(dict.fromkeys(a.algos)), []
    watchdog.arm("the baselines' set-up")
    if a.device == "cuda":
        init_cuda(ctx, algos, comm.timeout)
    sync = ctx.torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if "gloo" in algos:
        why = init_gloo(ctx, comm.timeout)
        if why:
            algos.remove("gloo")
            notes.append(f"# gloo skipped: {why}")
    watchdog.disarm()
    dtype = np.dtype(a.dtype)
    per = world.gather((comm.node, comm.local_rank, os.getpid(), socket.gethostname()))
    node_sizes = sorted(Counter(c[0] for c in per or []).items())
    info = pc.build_info()
    meta = {"op": a.op, "command": " ".join([sys.executable, "-m", "piper_comm.bench",
                                             *(argv if argv is not None else sys.argv[1:])]),
            "ranks": n, "nodes": comm.num_nodes, "node_sizes": [s for _, s in node_sizes],
            "host": socket.gethostname(), "cpu": cpu_model(), "mpi": info["mpi"],
            "piper_version": info["version"], "git": git_commit(), "dtype": a.dtype,
            "iters": a.iters, "warmup": a.warmup, "algos": algos, "device": ctx.device,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    sizes_ = [s for _, s in node_sizes]
    split = (f"{comm.num_nodes} x {sizes_[0]}" if len(set(sizes_)) == 1
             else f"{comm.num_nodes} nodes of sizes {sizes_}")
    meta["split"] = split
    P(f"# piper_comm.bench {a.op}: {meta['command']}")
    P(f"# nranks {n}  nodes {split}  host {meta['host']} ({meta['cpu']})")
    P(f"# MPI: {meta['mpi']}")
    if a.device == "cuda":
        meta["gpu"] = ctx.torch.cuda.get_device_name()
        P(f"# device: {meta['gpu']} (rank 0 on {ctx.device}); Piper's device transport is "
          "chosen at the first call (PIPER_INTER)")
    P(f"# piper {meta['piper_version']}  git {meta['git']}  date {meta['date']}")
    P(f"# minBytes {a.minbytes} maxBytes {a.maxbytes} step: {a.stepfactor}(factor) "
      f"warmup iters: {a.warmup} iters: {a.iters} dtype: {a.dtype} validation: {a.check} "
      f"algos: {','.join(algos)} PIPER_CHECK={os.environ.get('PIPER_CHECK', '1')}")
    if "auto" in algos:
        meta["auto_links"] = comm.links.source
        P(f"# auto: links from {meta['auto_links']} (PIPER_PLATFORM)")
    for r, (node, lr, pid, host) in enumerate(per or []):
        P(f"#  Rank {r:3d} Node {node:3d} Local {lr:3d} Pid {pid:7d} on {host}")
    for line in notes:
        P(line)

    sizes, s = [], a.minbytes
    while s <= a.maxbytes:
        sizes.append(s)
        s *= a.stepfactor
    rows = []
    for i, nbytes in enumerate(sizes):
        count = op.count(nbytes, n, dtype.itemsize)
        if count == 0:
            P(f"# size {nbytes} B skipped: rounds to 0 elements for {n} ranks of {a.dtype}")
            continue
        send = np.empty(count, dtype)
        recv = np.empty(op.recv_count(count, n), dtype)
        seed = 33 * i
        op.fill(send, seed, me, n)
        bufs = (send, recv)
        if a.device == "cuda":  # the same bits on the device; recv comes back to check it
            torch = ctx.torch
            bufs = (torch.from_numpy(send).to(ctx.device),
                    torch.from_numpy(recv).to(ctx.device))
        progress = []
        for algo in algos:
            watchdog.arm(f"{algo} at {human(count * dtype.itemsize)}")
            run = op.runner(ctx, algo, *bufs)
            sec = measure(run, world, a.warmup, a.iters, sync)
            chosen = comm.last_algorithm if algo in PIPER_ALGOS else algo
            wrong = 0
            if a.check:
                _uview(recv).fill(np.iinfo(_uview(recv).dtype).max)
                if a.device == "cuda":
                    bufs[1].copy_(ctx.torch.from_numpy(recv))
                run()
                if a.device == "cuda":
                    recv[...] = bufs[1].cpu().numpy()
                wrong = world.allreduce(op.wrong(recv, seed, me, n), op=MPI.SUM)
            watchdog.disarm()
            b = count * dtype.itemsize
            algbw = b / sec / 1e9
            rows.append({"algo": algo, "chosen": chosen, "size": b, "count": count,
                         "type": a.dtype, "time_us": sec * 1e6, "algbw": algbw,
                         "busbw": algbw * op.bus_factor(n), "wrong": wrong if a.check else -1})
            progress.append(f"{algo} {sec * 1e6:.1f}us" + (f" ({chosen})" if algo == "auto"
                                                             else ""))
        if me == 0:
            print(f"# [{i + 1}/{len(sizes)}] {human(count * dtype.itemsize)}: "
                  + "  ".join(progress), file=sys.stderr, flush=True)

    for algo in algos:
        mine = [r for r in rows if r["algo"] == algo]
        P("#")
        P(f"# Algorithm: {algo}" + (" (Piper)" if algo in PIPER_ALGOS else " (baseline)"))
        P(f"# {'size':>10} {'count':>12} {'type':>8} {'redop':>6} {'root':>5} "
          f"{'time':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>6}")
        P(f"# {'(B)':>10} {'(elements)':>12} {'':>8} {'':>6} {'':>5} "
          f"{'(us)':>10} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6}")
        for r in mine:
            w = "N/A" if r["wrong"] < 0 else r["wrong"]
            P(f"  {r['size']:>10} {r['count']:>12} {r['type']:>8} {op.redop:>6} {op.root:>5} "
              f"{r['time_us']:>10.2f} {r['algbw']:>7.3f} {r['busbw']:>7.3f} {w:>6}")
        avg = sum(r["busbw"] for r in mine) / max(1, len(mine))
        P(f"# Out of bounds values : {sum(max(0, r['wrong']) for r in mine)} "
          f"{'OK' if all(r['wrong'] <= 0 for r in mine) else 'FAILED'}")
        P(f"# Avg bus bandwidth    : {avg:.4f} ({algo})")
    lines, summ = summary(rows, algos)
    for line in lines:
        P(line)
    total_wrong = sum(max(0, r["wrong"]) for r in rows)
    P("#")
    P(f"# {'OK' if total_wrong == 0 else 'FAILED'}: {total_wrong} wrong elements in total")
    if me == 0 and a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summ},
                                           indent=1) + "\n")
    if me == 0 and a.plot and rows:
        plot(a.plot, rows, algos, f"{a.op}: {n} ranks, nodes {split}, {meta['cpu']}, "
                                  f"{a.dtype}")
    sys.stdout.flush()
    watchdog.arm("the closing barrier")
    world.Barrier()
    watchdog.disarm()
    if ctx.dist is not None:
        ctx.dist.destroy_process_group()
    comm.close()
    return 1 if total_wrong else 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception as e:
        print(f"{socket.gethostname()}: rank {MPI.COMM_WORLD.rank} pid {os.getpid()}: "
              f"bench failure: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)
    sys.exit(code)
