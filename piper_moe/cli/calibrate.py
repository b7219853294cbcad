"""Measure this machine and write a platform YAML that ``piper_moe.resource_model`` accepts.

    mpirun -np N python -m piper_moe.cli.calibrate --out my-host.yaml [--base cpu-host]
        [--name my-host] [--skip-a2a] [--quick] [--repeats 3]
        [--model tiny-moe --micro-batch 4 --seq-len 64]

Measures (every rank runs, all at once, so ranks sharing cores measure what each gets; rank 0
writes the file):
- GEMM throughput of torch.matmul in bf16 and in fp32 (``DTYPES``) over shapes with the smallest
  dimension from 8 to 2048, and with ``--model`` the model's own GEMMs at the job's micro-batch
  (its attention and FFN projections on micro_batch * seq_len rows, an expert's on its share of
  the routed rows); the bf16 points fitted to ``rate(d) = peak * max_efficiency * d / (d +
  half_dim)`` by least squares on 1/rate = 1/A + (half_dim/A) * (1/d) give ``peak_flops`` and
  the curve, the fp32 points on the same curve (half_dim fixed) give ``peak_flops_fp32``;
- with ``--model``, the attention core (causal ``scaled_dot_product_attention``, forward and
  backward) at the model's shape in both dtypes: ``attention_flops`` and ``attention_backward``
  (bf16), ``attention_flops_fp32`` and ``attention_backward_fp32`` (their rates depend on the
  sequence length and, on CPUs, differ by dtype; without ``--model`` they are kept from
  ``--base``);
- on CPU the host time per framework operation (``op_overhead``): forward and backward of
  Piper's tiny-moe model shrunk to width 16 (its arithmetic negligible) divided by the aten
  operations it dispatched (``piper_moe.resource_model.ops``); 0 on a CUDA device (the host's
  dispatch runs ahead of the kernels there; not modelled);
- copy bandwidth (``clone`` of a 64 MiB buffer: bytes copied per second) and memory bandwidth
  (bytes read + written per second);
- all-to-all time through piper_comm, flat and HALO, for per-peer blocks of 1 KiB to 1 MiB, timed
  exactly as ``python -m piper_comm.bench`` times them (its ``measure``: preallocated send and
  recv buffers, ``warmup`` calls, a barrier, the mean of ``iters`` back-to-back calls, max over
  ranks), median of ``repeats`` such measurements; on several nodes of several ranks, the same
  again on each node's own communicator (all nodes at once); fitted to the alpha-beta models of
  ``piper_moe.resource_model.comm`` by non-negative least squares on relative residuals (each row
  divided by its measured time, so a 1 ms row weighs as much as a 100 ms one). The rows are the
  terms of ``piper_comm.cost.traffic_uniform`` (the one model of the algorithms the executor runs):
  flat [(g-1), (g-1)*b, (n-g), (n-g)*b, 0, 0] and HALO [0, 0, (N-1), (n-g)*b, 2, m + g*b] (two
  node barriers, then the proxied messages and the copies into and out of the node segment),
  unknowns (alpha_intra, 1/beta_intra, alpha_inter, 1/beta_inter, barrier_latency,
  1/copy_bandwidth), b = bytes per peer, m = n*b, N = n/g nodes. The node's own timings (n = g:
  flat's intra messages, HALO's barriers and copies alone) are what separate the barrier from the
  two latencies; inside HALO a barrier waits for the node's slowest rank, so on a loaded or
  oversubscribed host it costs far more than a barrier alone. With one node only the intra level
  is measured, with one rank per node only the inter level (and HALO is flat there); the other
  level is kept from ``--base``. The copy term is collinear with the link bandwidths, so it is
  charged at the measured memcpy rate and subtracted from the HALO timings before the fit. The
  written file's links are what ``algorithm="auto"`` chooses with under ``PIPER_PLATFORM``.
  The all-to-alls move host (numpy) buffers, also where the GEMMs run on a CUDA device: on a
  GPU machine the links describe the host path, not NVLink through Piper's CUDA path.
``PIPER_LOCAL_SIZE=k`` (read by piper_comm) emulates nodes of k ranks on one host.

Numbers not measured (device memory, reserve, peak) are kept from ``--base``; the raw
measurements go under ``calibrated:`` in the output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from typing import Any

import numpy as np
import yaml

from piper_comm.cost import traffic_uniform
from piper_moe.resource_model.spec import load_platform

log = logging.getLogger("piper")

GEMM_DIMS = (8, 32, 128, 512, 2048)
DTYPES = ("bf16", "fp32")  # the compute dtypes measured: 16-bit (peak_flops) and fp32
A2A_BLOCKS = (1024, 4096, 16384, 65536, 262144, 1048576)


def _timeit(fn, iters: int, warmup: int = 2, sync=None) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device(device: str | None) -> tuple[str, Any]:
    """(device, its synchronize or None)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.cuda.synchronize if device.startswith("cuda") else None


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def measure_gemm(dims=GEMM_DIMS, width: int = 1024, iters: int = 5, device: str | None = None,
                 shapes: list[tuple[int, int, int]] = (), dtype: str = "bf16"
                 ) -> list[dict[str, float]]:
    """Throughput (FLOP/s) of [d, width] x [width, width] products for each d in ``dims``, then
    of each (m, n, k) in ``shapes`` ([m, k] x [k, n]), in ``dtype`` ("bf16" or "fp32")."""
    import torch

    device, sync = _device(device)
    dtype = _dtype(dtype)
    out = []
    for m, n, k in [(d, width, width) for d in dims] + list(shapes):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _timeit(lambda a=a, b=b: torch.matmul(a, b), iters, sync=sync)
        out.append({"m": m, "n": n, "k": k, "seconds": t, "flops_per_s": 2.0 * m * n * k / t})
    return out


def model_gemm_shapes(model, micro_batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """The distinct (m, n, k) of one micro-batch's forward GEMMs of ``model`` on one rank at
    EP = TP = 1: every dense and attention projection on micro_batch * seq_len rows, each
    routed expert's on its even share of the routed rows (resource_model.params' linears)."""
    from piper_moe.resource_model.params import dense_layer_linears, moe_layer_linears

    tokens = micro_batch * seq_len
    shapes = set()
    linears = list(dense_layer_linears(model)) if model.num_dense_layers else []
    if model.num_moe_layers:
        linears += moe_layer_linears(model)
    for lin in linears:
        rows = (max(1, tokens * model.moe.top_k // model.moe.num_experts)
                if lin.shard == "expert" else tokens)
        shapes.add((rows, lin.d_out, lin.d_in))
    return sorted(shapes)


def measure_attention(batch: int, heads: int, seq: int, head_dim: int, iters: int = 5,
                      device: str | None = None, dtype: str = "bf16") -> dict[str, Any]:
    """Causal scaled_dot_product_attention on [batch, heads, seq, head_dim] in ``dtype``:
    forward FLOP/s (2 * b * h * s^2 * 2d / 2 FLOPs: causal, q.k and p.v) and the backward's
    time as a multiple of the forward's."""
    import torch
    import torch.nn.functional as F

    device, sync = _device(device)
    dtype = _dtype(dtype)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    t_fwd = _timeit(forward, iters, sync=sync)
    t_both = _timeit(lambda: forward().backward(grad), iters, sync=sync)
    flops = 2.0 * batch * heads * seq * seq * 2 * head_dim / 2
    return {"shape": [batch, heads, seq, head_dim], "forward_s": t_fwd,
            "backward_s": max(t_both - t_fwd, 0.0), "flops_per_s": flops / t_fwd,
            "backward_ratio": max(t_both - t_fwd, 0.0) / t_fwd}


def measure_op_overhead(iters: int = 5) -> dict[str, Any]:
    """Host seconds per framework operation: one micro-batch (1 x 8 tokens) forward and
    backward through Piper's tiny-moe model shrunk to width 16, whose arithmetic is negligible,
    divided by the aten operations it dispatched (counted by a TorchDispatchMode)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from piper_moe.resource_model import load_model
    from piper_moe.transformer import Stage

    spec = load_model("tiny-moe")
    narrow = dataclasses.replace(
        spec, hidden=16, vocab=32, dense_ffn=16,
        attention=dataclasses.replace(spec.attention, num_heads=2, num_kv_heads=1, head_dim=8),
        moe=dataclasses.replace(spec.moe, expert_ffn=8, shared_expert_ffn=8))
    stage = Stage(narrow, range(narrow.num_layers), first=True, last=True)
    tokens = torch.randint(0, narrow.vocab, (1, 8))
    target = torch.randint(0, narrow.vocab, (8,))

    def step():
        F.cross_entropy(stage(tokens).flatten(0, 1), target).backward()

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    step()
    with Count():
        step()
    t = _timeit(step, iters)
    return {"ops": Count.ops, "seconds": t, "op_overhead": t / Count.ops}


def fit_gemm(points: list[dict[str, float]], half_dim: float | None = None
             ) -> tuple[float, float]:
    """(A, half_dim) of rate(d) = A * d / (d + half_dim), d = min(m, n, k), by least squares on
    1/rate = 1/A + (half_dim/A)/d; with ``half_dim`` given, A alone on that curve. Where the
    points resolve no such curve (the rate does not rise towards an asymptote as d grows: a
    negative intercept or slope, as noise on a few short timings gives), half_dim is 0 and A
    the best measured rate; ``half_dim=0`` given also returns the best measured rate, so a
    second dtype fitted on the first's curve is treated alike."""
    d = np.array([min(p["m"], p["n"], p["k"]) for p in points], dtype=float)
    inv_rate = 1.0 / np.array([p["flops_per_s"] for p in points], dtype=float)
    if half_dim == 0:
        return float(1.0 / inv_rate.min()), 0.0
    if half_dim is not None:
        x = 1.0 + half_dim / d
        return float(x @ x / (x @ inv_rate)), float(half_dim)
    x = np.stack([np.ones_like(d), 1.0 / d], axis=1)
    (c0, c1), *_ = np.linalg.lstsq(x, inv_rate, rcond=None)
    if c0 <= 0 or c1 < 0:
        return float(1.0 / inv_rate.min()), 0.0
    return float(1.0 / c0), float(c1 / c0)


def measure_copy(nbytes: int = 64 * 2**20, iters: int = 5,
                 device: str | None = None) -> dict[str, float]:
    """Copy bandwidth (bytes copied/s) and memory bandwidth (bytes read+written/s)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), iters, sync=sync)
    return {"bytes": nbytes, "seconds": t, "copy_bandwidth": nbytes / t,
            "memory_bandwidth": 2 * nbytes / t}


# Weight of a node's own timing against one of the job's in fit_a2a. The model cannot fit both
# layouts exactly on an oversubscribed host (a barrier inside the job's HALO also waits for the
# proxies' network messages); at 1.0 the job's HALO came out 1.6x fast at 1 KiB (8 ranks as
# 2 x 4 on 2 cores) and auto chose it, at 0.1 within 20% and flat is chosen, as measured.
NODE_ROWS_WEIGHT = 0.1


def a2a_rows(algorithm: str, n: int, g: int, block: float) -> list[float]:
    """The terms of one timing, in ``piper_comm.cost.Traffic``'s order (msgs_intra,
    bytes_intra, msgs_inter, bytes_inter, barriers, copy_bytes): ``traffic_uniform`` of ``n``
    ranks in nodes of ``g`` sending ``block`` bytes to every rank."""
    t = traffic_uniform(n * block, n, g)[algorithm]
    return [float(getattr(t, f.name)) for f in dataclasses.fields(t)]


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y|| over c >= 0, by trying every support (x has at most a few columns)."""
    k = x.shape[1]
    best, best_res = np.zeros(k), float(np.sum(y * y))
    for mask in range(1, 2**k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        c = np.zeros(k)
        c[cols] = sol
        res = float(np.sum((x @ c - y) ** 2))
        if res < best_res - 1e-30 * max(best_res, 1.0):
            best, best_res = c, res
    return best


def fit_a2a(points: list[dict[str, Any]], n: int, g: int,
            copy_bandwidth: float | None = None) -> dict[str, float]:
    """Non-negative least-squares alpha/beta per level, and the node barrier's latency, from
    all-to-all timings, on relative residuals (see module docstring). A point is timed on the
    job's ``n`` ranks in nodes of ``g``, or on the layout its "ranks" and "ranks_per_node"
    give (one node's own communicator: what separates the barrier from the network latency).
    Returns latency_<level> and bandwidth_<level> for each level the run exercises (intra when
    g > 1, inter when n > g) and latency_barrier when HALO's barriers can be told apart from
    the latencies: always on one node, else only with one node's own timings (without them
    the barrier is charged at the intra latency, as the files of earlier calibrations were).
    HALO's copies are charged at the measured ``copy_bandwidth`` (required when a HALO timing
    has copies) and removed from the timings first."""
    x = np.array([a2a_rows(p["algorithm"], p.get("ranks", n), p.get("ranks_per_node", g),
                           p["block"]) for p in points], dtype=float)
    t = np.array([p["seconds"] for p in points], dtype=float)
    y = t.copy()
    if np.any(x[:, 5] > 0):
        if not copy_bandwidth:
            raise ValueError(f"fit_a2a: {n} ranks in nodes of {g} need the measured "
                             f"copy_bandwidth to remove HALO's copies")
        y -= x[:, 5] / copy_bandwidth
    barrier = bool(np.any(x[:, 4] > 0)) and (n == g or any("ranks" in p for p in points))
    if not barrier:  # charged at the intra latency
        x[:, 0] += x[:, 4]
    levels = [lv for lv, used in (("intra", g > 1), ("inter", n > g)) if used]
    cols = [j for lv in levels for j in ((0, 1) if lv == "intra" else (2, 3))]
    cols += [4] if barrier else []
    # Relative residuals; the job's own rows weigh NODE_ROWS_WEIGHT^-1 more than a node's (its
    # layout is the one auto prices; the node's rows only tell the barrier from the latencies).
    w = np.array([NODE_ROWS_WEIGHT if "ranks" in p else 1.0 for p in points]) / t
    sol = dict(zip(cols, _nnls(x[:, cols] * w[:, None], y * w), strict=True))
    out: dict[str, float] = {}
    for lv in levels:
        a, inv_b = (sol[0], sol[1]) if lv == "intra" else (sol[2], sol[3])
        out[f"latency_{lv}"] = float(a)
        out[f"bandwidth_{lv}"] = 1.0 / float(inv_b) if inv_b > 0 else float("inf")
    if barrier:
        out["latency_barrier"] = float(sol[4])
    return out


def measure_a2a(comm, blocks=A2A_BLOCKS, iters: int = 20, warmup: int = 5,
                repeats: int = 3) -> list[dict[str, Any]]:
    """All-to-all seconds per (algorithm, bytes per peer), timed by ``piper_comm.bench.measure``
    (the benchmark's own loop, max over ranks) on preallocated buffers; median of ``repeats``.

    The repeats are rounds over every (size, algorithm), not back-to-back per size: a transient
    disturbance of the host (another job, a page-fault storm) then spoils one sample of
    several sizes, which the median rejects, instead of every sample of one size. One
    throw-away round of the first size goes first (the first timed exchange of a process
    pays one-time costs: segment mapping, MPI connection set-up)."""
    from mpi4py import MPI

    from piper_comm.bench import measure

    world = MPI.COMM_WORLD
    cases = []
    for block in blocks:
        send = np.zeros(comm.size * block, dtype=np.uint8)
        recv = np.empty_like(send)
        for algorithm in ("halo", "flat"):
            def run(a=algorithm, s=send, r=recv):
                comm.all_to_all(s, recv=r, algorithm=a)
            cases.append((algorithm, block, run))
    for _, _, run in cases[:2]:
        measure(run, world, warmup, iters)
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_, _, run) in enumerate(cases):
            samples[i].append(measure(run, world, warmup, iters))
    return [{"algorithm": a, "block": b, "seconds": float(statistics.median(s)),
             "samples": [float(x) for x in s]} for (a, b, _), s in zip(cases, samples)]


def measure_node_a2a(comm, blocks=A2A_BLOCKS, **timing) -> list[dict[str, Any]]:
    """``measure_a2a`` on each node's own communicator (all nodes at once; max over every rank),
    its points marked with that layout ("ranks" = "ranks_per_node" = the node's size): HALO
    there is its two barriers and copies without a network message, which ``fit_a2a`` needs to
    tell the node barrier from the network latency. Collective over the job."""
    from mpi4py import MPI

    import piper_comm as pc

    node = MPI.COMM_WORLD.Split(comm.node, comm.rank)
    node_comm = pc.init("mpi", group=node, node_ids=[0] * node.Get_size())
    try:
        points = measure_a2a(node_comm, blocks, **timing)
    finally:
        node_comm.close()
        node.Free()
    return [{**p, "ranks": comm.local_size, "ranks_per_node": comm.local_size} for p in points]


def build_platform(base_name: str, name: str, gemm_points: dict[str, list], copy, a2a_fit,
                   attention: dict[str, dict] | None = None,
                   op: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML mapping of the calibrated platform. gemm_points and attention are keyed by
    dtype (``DTYPES``; measure_gemm's and measure_attention's results): "bf16" must be there,
    "fp32" may be (else peak_flops_fp32 and the fp32 attention figures are the base's, the
    fp32 GEMM rate then the base's fp32 peak at the new efficiency);
    attention None keeps the base's attention figures, op (measure_op_overhead's result) None
    its op_overhead."""
    base = load_platform(base_name)
    data = dataclasses.asdict(base)
    rate, half = fit_gemm(gemm_points["bf16"])
    rates = {2: rate}
    if "fp32" in gemm_points:  # the same curve, its own asymptote
        rates[4] = fit_gemm(gemm_points["fp32"], half)[0]
    # One efficiency for both: the dtype closest to its base peak sets it (a CPU without bf16
    # units reaches a small fraction of the bf16 peak, not of the fp32 one), each peak is then
    # its measured asymptote over it, so peak * max_efficiency is the measured rate of each.
    efficiency = min(1.0, max(r / base.peak(e) for e, r in rates.items()))
    data.update(name=name, source=f"python -m piper_moe.cli.calibrate (base {base.name})",
                peak_flops=rate / efficiency, copy_bandwidth=copy["copy_bandwidth"],
                hbm_bandwidth=copy["memory_bandwidth"])
    if 4 in rates:
        data["peak_flops_fp32"] = rates[4] / efficiency
    data["gemm"].update(max_efficiency=efficiency, half_dim=half)
    for level in ("intra", "inter"):
        if f"latency_{level}" not in a2a_fit:
            continue
        bandwidth = a2a_fit[f"bandwidth_{level}"]
        if not np.isfinite(bandwidth):  # 1/beta at its bound 0: the level's time is flat in size
            log.warning("calibrate: %s level fitted with latency only (1/bandwidth = 0: no "
                        "size dependence resolved over the measured blocks)", level)
        data[level] = {"latency": a2a_fit[f"latency_{level}"], "bandwidth": bandwidth}
    if "latency_barrier" in a2a_fit:
        data["barrier_latency"] = a2a_fit["latency_barrier"]
    elif "latency_intra" in a2a_fit:  # fitted as one intra latency (PlatformSpec: None)
        data["barrier_latency"] = None
    data["calibrated"] = {"gemm": gemm_points, "copy": copy, "a2a_fit": a2a_fit or {}}
    if attention is not None:
        data["calibrated"]["attention"] = attention
        for dtype, measured in attention.items():
            suffix = "_fp32" if dtype == "fp32" else ""
            data["attention_flops" + suffix] = measured["flops_per_s"]
            if measured["backward_ratio"] > 0:
                data["attention_backward" + suffix] = measured["backward_ratio"]
            else:  # forward and forward + backward timed alike: noise; the base's factor stays
                log.warning("calibrate: the %s attention backward did not time above its "
                            "forward (%s): attention_backward%s kept from the base", dtype,
                            measured, suffix)
    if op is not None:
        data["op_overhead"] = op["op_overhead"]
        data["calibrated"]["op_overhead"] = op
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piper_moe.cli.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="platform YAML to write")
    parser.add_argument("--base", default="cpu-host", help="platform whose other numbers to keep")
    parser.add_argument("--name", default=None, help="platform name (default: --out stem)")
    parser.add_argument("--skip-a2a", action="store_true", help="GEMM and copy only")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--repeats", type=int, default=3,
                        help="all-to-all measurements per size and algorithm (median taken)")
    parser.add_argument("--model", default=None,
                        help="the job's model: its GEMMs join the fit, its attention shape is "
                             "timed (default: generic shapes)")
    parser.add_argument("--micro-batch", type=int, default=4, help="with --model: sequences")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="with --model: tokens per sequence (default: the model's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    iters = 3 if args.quick else 10

    comm = None
    if not args.skip_a2a:
        try:
            import piper_comm as pc
        except ImportError as exc:
            raise SystemExit(
                f"calibrate: cannot import piper_comm ({exc}); build it (see README) or pass "
                "--skip-a2a to measure GEMM and copy only") from exc
        comm = pc.init()
    rank = comm.rank if comm else 0

    shapes: list[tuple[int, int, int]] = []
    attention = None  # the attention core at the model's own shape only: its rate depends on it
    if args.model:
        from piper_moe.resource_model import load_model

        model = load_model(args.model)
        seq = args.seq_len or model.seq_len
        shapes = model_gemm_shapes(model, args.micro_batch, seq)
        a = model.attention
        attention = {dtype: measure_attention(args.micro_batch, a.num_heads, seq,
                                              (a.qk_head_dim + a.v_dim) // 2, iters=iters,
                                              dtype=dtype) for dtype in DTYPES}
    gemm_points = {dtype: measure_gemm(GEMM_DIMS[:3] if args.quick else GEMM_DIMS, iters=iters,
                                       shapes=shapes, dtype=dtype) for dtype in DTYPES}
    copy = measure_copy(16 * 2**20 if args.quick else 64 * 2**20, iters=iters)
    device, _ = _device(None)
    op = measure_op_overhead(iters) if device == "cpu" else {
        "op_overhead": 0.0, "note": "a CUDA device: host dispatch overlaps the kernels"}
    a2a_points: list[dict[str, Any]] = []
    a2a_fit: dict[str, float] = {}
    if comm is not None and comm.size > 1:
        blocks = A2A_BLOCKS[::2] if args.quick else A2A_BLOCKS
        timing = {"iters": 5 if args.quick else 20, "warmup": 2 if args.quick else 5,
                  "repeats": 1 if args.quick else args.repeats}
        a2a_points = measure_a2a(comm, blocks, **timing)
        if comm.num_nodes > 1 and comm.local_size > 1:
            a2a_points += measure_node_a2a(comm, blocks, **timing)
        a2a_fit = fit_a2a(a2a_points, comm.size, comm.local_size, copy["copy_bandwidth"])
        a2a_fit["ranks"], a2a_fit["ranks_per_node"] = comm.size, comm.local_size
    elif comm is not None:
        log.warning("calibrate: one rank, no all-to-all to measure; links kept from --base")

    if rank == 0:
        name = args.name or args.out.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        data = build_platform(args.base, name, gemm_points, copy, a2a_fit, attention, op)
        data["calibrated"]["a2a"] = a2a_points
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# written by python -m piper_moe.cli.calibrate\n")
            yaml.safe_dump(data, f, sort_keys=False)
        rate, half = fit_gemm(gemm_points["bf16"])
        rate32 = fit_gemm(gemm_points["fp32"], half)[0]
        seen = ("attention " + ", ".join(
            f"{dtype} {m['flops_per_s'] / 1e9:.1f} GFLOP/s forward, backward "
            f"{m['backward_ratio']:.1f}x" for dtype, m in attention.items())
            if attention else "attention not timed (no --model)")
        log.info("calibrate: GEMM asymptote bf16 %.1f, fp32 %.1f GFLOP/s, half at d=%.0f; copy "
                 "%.2f GB/s; %s; %.2f us per framework operation; a2a fit %s -> %s (Piper's "
                 "algorithm=\"auto\" chooses with its links under PIPER_PLATFORM=%s)",
                 rate / 1e9, rate32 / 1e9, half, copy["copy_bandwidth"] / 1e9, seen,
                 op["op_overhead"] * 1e6, a2a_fit, args.out, args.out)
    if comm is not None:
        comm.barrier()
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
