"""Rank side of tests/gpu/test_comm_cuda.py: comm.all_to_all(_v) on CUDA memory, run under
mpirun with every rank on CUDA device local_rank % device_count (one device: all ranks share it;
NCCL needs NCCL_MULTI_RANK_GPU_ENABLE=1 for that, which the test sets).

Every CUDA result is compared bitwise with the same call on host memory through the same
communicator (the host plane, tested on its own elsewhere)."""

from __future__ import annotations

import numpy as np

import piper_comm as pc

# dtype name -> (numpy dtype for the bits, torch dtype name); the bits are random bytes
DTYPES = {
    "float32": ("u4", "float32"), "float64": ("u8", "float64"), "float16": ("u2", "float16"),
    "bfloat16": ("u2", "bfloat16"), "int8": ("u1", "int8"), "uint8": ("u1", "uint8"),
    "int32": ("u4", "int32"), "int64": ("u8", "int64"), "bool": ("u1", "bool"),
    "complex64": ("u8", "complex64"),
}


def _setup(local_size):
    import torch

    comm = pc.init(local_size=local_size)
    torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
    return comm, torch


def _counts(P: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """P x P rows (row = source): uneven with zeros, or everything to rank P-1."""
    if kind == "one_receiver":
        S = np.zeros((P, P), dtype=np.int64)
        S[:, P - 1] = rng.integers(1, 40, size=P)
        return S
    S = rng.integers(0, 40, size=(P, P))
    S[rng.random((P, P)) < 0.3] = 0
    return S


def _host_rows(torch, name: str, rows: int, trail: int, rng):
    bits, tname = DTYPES[name]
    raw = rng.integers(0, 256, size=rows * trail * np.dtype(bits).itemsize, dtype=np.uint8)
    if name == "bool":
        raw &= 1
    t = torch.from_numpy(raw).view(getattr(torch, tname))
    return t.reshape(rows, trail) if rows * trail else t.reshape(0, trail)


def _bits(torch, t) -> np.ndarray:
    return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


ALGORITHMS = ("halo", "flat", "pairwise", "auto")


def exact(local_size: int | None, seed: int) -> dict:
    """Under every algorithm, all_to_all_v and all_to_all of every dtype on CUDA tensors
    equal the host result, with and without recv, uneven counts with zeros and one rank
    receiving everything. Returns the number of checked calls per algorithm."""
    comm, torch = _setup(local_size)
    checked = {a: _exact(comm, torch, a, seed) for a in ALGORITHMS}
    _async_on_side_stream(comm, torch, seed)
    result = {"checked": checked, "device_transport": comm.device_transport}
    comm.close()
    return result


def _small_call(comm, torch) -> int:
    """One small all_to_all_v on CUDA tensors, checked against the host's; the rows received."""
    P, me = comm.size, comm.rank
    counts = [(me + d) % 3 for d in range(P)]
    x = torch.arange(sum(counts) * 4, dtype=torch.float32, device="cuda").reshape(-1, 4)
    out, rc = comm.all_to_all_v(x, counts)
    ref, _ = comm.all_to_all_v(x.cpu(), counts)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref), f"{comm.device_transport}: wrong result"
    return int(sum(rc))


def small(local_size: int | None) -> dict:
    """One small all_to_all_v on CUDA tensors (what compute-sanitizer watches)."""
    comm, torch = _setup(local_size)
    rows = _small_call(comm, torch)
    comm.close()
    return {"rows": rows}


def _async_on_side_stream(comm, torch, seed: int) -> None:
    """An async all_to_all_v without recv, issued on a side stream: the result equals the
    host's, and the recv that the worker thread allocated belongs to the caller's stream in
    torch's caching allocator (not the worker's default stream), so freeing it after use on
    that stream cannot hand its memory to other work too early."""
    P, me = comm.size, comm.rank
    S = _counts(P, np.random.default_rng(seed + 99), "uneven")
    host = _host_rows(torch, "float32", int(S[me].sum()), 3, np.random.default_rng(me))
    ref, _ = comm.all_to_all_v(host, S[me].tolist())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dev = host.cuda()
        out, _ = comm.all_to_all_v(dev, S[me].tolist(), async_op=True).wait()
        got = out.cpu()
    assert np.array_equal(_bits(torch, got), _bits(torch, ref)), "async on a side stream"
    if out.numel():
        ptr = out.data_ptr()
        seg = [g for g in torch.cuda.memory_snapshot()
               if g["address"] <= ptr < g["address"] + g["total_size"]]
        assert seg and seg[0]["stream"] == side.cuda_stream, (seg[:1], side.cuda_stream)


def _exact(comm, torch, algorithm: str, seed: int) -> int:
    P, me = comm.size, comm.rank
    rng = np.random.default_rng(seed)  # the same stream on every rank: the counts agree
    checked = 0
    for name in DTYPES:
        for kind in ("uneven", "one_receiver"):
            S = _counts(P, rng, kind)
            trail = int(rng.integers(1, 5))
            mine = np.random.default_rng(seed * 1000 + me * 17 + checked)
            host = _host_rows(torch, name, int(S[me].sum()), trail, mine)
            ref, rc = comm.all_to_all_v(host, S[me].tolist(), algorithm=algorithm)
            dev = host.cuda()
            out, rc_dev = comm.all_to_all_v(dev, S[me].tolist(), algorithm=algorithm)
            assert out.is_cuda and rc_dev == rc, (name, kind)
            assert np.array_equal(_bits(torch, out), _bits(torch, ref)), (name, kind, "v")
            given = torch.zeros_like(out)
            got, _ = comm.all_to_all_v(dev, S[me].tolist(), recv=given,
                                       recv_counts=S[:, me].tolist(), algorithm=algorithm)
            assert got.data_ptr() == given.data_ptr(), "recv given: filled in place"
            assert np.array_equal(_bits(torch, got), _bits(torch, ref)), (name, kind, "recv")
            checked += 1
        eq = _host_rows(torch, name, P * 3, 2, np.random.default_rng(seed + me))
        assert np.array_equal(_bits(torch, comm.all_to_all(eq.cuda(), algorithm=algorithm)),
                              _bits(torch, comm.all_to_all(eq, algorithm=algorithm))), name
        checked += 1
    return checked


def cupy_arrays(local_size: int | None) -> dict:
    """CuPy arrays (through __cuda_array_interface__, on CuPy's current stream)."""
    import cupy

    comm, _ = _setup(local_size)
    cupy.cuda.Device(comm.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
    P, me = comm.size, comm.rank
    rng = np.random.default_rng(7)
    S = _counts(P, rng, "uneven")
    host = np.random.default_rng(me).standard_normal((int(S[me].sum()), 3)).astype(np.float32)
    ref, _ = comm.all_to_all_v(host, S[me].tolist())
    out, _ = comm.all_to_all_v(cupy.asarray(host), S[me].tolist())
    assert isinstance(out, cupy.ndarray)
    assert np.array_equal(cupy.asnumpy(out).view(np.uint32), ref.view(np.uint32))
    recv = cupy.empty_like(cupy.asarray(ref))
    with cupy.cuda.Stream(non_blocking=True) as s:  # another current stream
        got, _ = comm.all_to_all_v(cupy.asarray(host), S[me].tolist(), recv=recv,
                                   recv_counts=S[:, me].tolist())
        s.synchronize()
    assert np.array_equal(cupy.asnumpy(got).view(np.uint32), ref.view(np.uint32))
    comm.close()
    return {"ok": True}


def graph_capture(local_size: int | None) -> dict:
    """An equal split captured in a CUDA graph and replayed with new data: the replay moves
    the new data (flat under capture; HALO asked for explicitly is refused with a clear
    error). Needs NCCL (the staged transport cannot be captured)."""
    comm, torch = _setup(local_size)
    P, me = comm.size, comm.rank
    send = torch.arange(P * 4 * 8, dtype=torch.float32, device="cuda").reshape(P * 4, 8)
    recv = torch.empty_like(send)
    comm.all_to_all(send, recv=recv, algorithm="flat")  # warm-up: builds the device plane
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        comm.all_to_all(send, recv=recv, algorithm="auto")
    captured_algo = comm.last_algorithm
    for step in range(3):
        send.copy_(torch.full_like(send, 0) + (me * 100 + step)
                   + torch.arange(send.numel(), device="cuda").reshape(send.shape) % 7)
        g.replay()
        torch.cuda.synchronize()
        host_ref = comm.all_to_all(send.cpu())
        assert torch.equal(recv.cpu(), host_ref), f"replay {step}"
    refused = ""
    g2 = torch.cuda.CUDAGraph()  # every layout of the test has nodes of several ranks
    try:
        with torch.cuda.stream(s), torch.cuda.graph(g2, stream=s):
            comm.all_to_all(send, recv=recv, algorithm="halo")
    except pc.PiperUsageError as e:
        refused = str(e)
    assert "cannot be captured" in refused, refused
    # a communicator's first CUDA call builds its device plane: refused under capture, on
    # every rank, before any device work
    fresh = pc.init(local_size=local_size)
    first = ""
    try:
        with torch.cuda.stream(s), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=s):
            fresh.all_to_all(send, recv=recv, algorithm="flat")
    except pc.PiperUsageError as e:
        first = str(e)
    assert "first CUDA call" in first and "cannot be captured" in first, first
    fresh.close()
    # NCCL's finalize waits until every graph that captured work on the communicator is gone
    del g, g2
    import gc

    gc.collect()
    torch.cuda.synchronize()
    comm.close()
    return {"captured": captured_algo, "refused": bool(refused)}


def device_watchdog(local_size: int | None) -> dict:
    """A peer that skips a call after the header round (PIPER_CHECK=0, equal split: nothing
    is exchanged on the host) leaves rank 0's NCCL kernel waiting on the device. The
    watchdog aborts the communicator after PIPER_TIMEOUT, so rank 0's device sync returns,
    and rank 0's next call raises PiperTimeoutError naming the group. Rank 1 sleeps past
    that and leaves without another call. Returns rank 0's seconds and message."""
    import contextlib
    import time

    from piper_comm import envs

    comm, torch = _setup(local_size)
    P, me = comm.size, comm.rank
    send = torch.ones(P * 2, 8, device="cuda")
    recv = torch.empty_like(send)
    comm.all_to_all(send, recv=recv, algorithm="flat")  # builds the device plane
    torch.cuda.synchronize()
    assert comm.device_transport.startswith("nccl"), comm.device_transport
    if me != 0:
        time.sleep(envs.timeout() + 8)
        return {}
    t0 = time.monotonic()
    comm.all_to_all(send, recv=recv, algorithm="flat")  # enqueued; rank 1 never posts
    with contextlib.suppress(RuntimeError):  # the aborted kernels may leave a stream error
        torch.cuda.synchronize()  # would wait for ever without the watchdog
    synced_s = time.monotonic() - t0
    message = ""
    try:
        comm.all_to_all(send, recv=recv, algorithm="flat")
    except pc.PiperTimeoutError as e:
        message = str(e)
    return {"synced_s": synced_s, "message": message}


def bad_input(local_size: int | None) -> dict:
    """CPU/GPU mixes raise the same PiperUsageError on every rank; a good call still works."""
    comm, torch = _setup(local_size)
    P, me = comm.size, comm.rank
    x = torch.ones(P * 2, 3, device="cuda")
    seen = {}
    cases = {
        "mixed": (lambda: comm.all_to_all(x, recv=torch.empty(P * 2, 3) if me == 0 else None),
                  "recv in host (CPU) memory"),
        "memory": (lambda: comm.all_to_all(x.cpu() if me == P - 1 else x),
                   "different memory"),
        "noncontig": (lambda: comm.all_to_all(x.t().contiguous().t() if me == 0 else x),
                      "not contiguous"),
    }
    if torch.cuda.device_count() > 1:
        other = (torch.cuda.current_device() + 1) % torch.cuda.device_count()
        cases["device"] = (lambda: comm.all_to_all(x, recv=torch.empty_like(x, device=other)
                                                   if me == 0 else None), "CUDA device")
    for name, (fn, words) in cases.items():
        try:
            fn()
        except pc.PiperUsageError as e:
            assert words in str(e) and "raised on every rank" in str(e), (name, str(e))
            seen[name] = True
        else:
            raise AssertionError(f"rank {me}: {name}: no PiperUsageError")
        assert comm.all_to_all(x).is_cuda  # the communicator is still usable
    comm.close()
    return {"cases": sorted(seen)}


def torch_backend(local_size: int | None) -> dict:
    """dist.all_to_all_single on CUDA tensors through backend "piper" (not delegated)."""
    import torch
    import torch.distributed as dist

    from tests.dist.cases import _setup as init_piper_backend

    init_piper_backend()  # as the CPU cases of the backend do
    pg = dist.distributed_c10d._get_default_group()
    # the PiperProcessGroup: the default group itself where torch takes the creator's
    # ProcessGroup as the group, else the group's backend for a device type
    comm = getattr(pg, "piper_communicator", None)
    for device in ("cuda", "cpu"):
        if comm is None:
            try:
                comm = pg._get_backend(torch.device(device)).piper_communicator
            except RuntimeError:
                continue
    assert comm is not None, "no Piper backend behind the default process group"
    torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
    P, me = dist.get_world_size(), dist.get_rank()
    x = (torch.arange(P * 3, dtype=torch.float32, device="cuda") + 100 * me).reshape(P * 3, 1)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    want = torch.cat([torch.arange(me * 3, me * 3 + 3, dtype=torch.float32) + 100 * s
                      for s in range(P)]).reshape(P * 3, 1)
    assert torch.equal(out.cpu(), want)
    used = comm.device_transport
    dist.destroy_process_group()
    return {"device_transport": used}


def nccl_gate(local_size: int | None) -> dict:
    """What the one-GPU check tries before it relies on NCCL (bench/gpu_check.sh, step
    nccl_gate, PIPER_INTER=nccl): one small all_to_all_v through Piper's NCCL transport, then
    torch's own NCCL group on the same ranks: an all_to_all_single and a send/recv ring. Each
    result is checked; the NCCL version torch reports is returned."""
    import torch
    import torch.distributed as dist

    import piper_comm.torch as pt

    comm, _ = _setup(local_size)
    P, me = comm.size, comm.rank
    _small_call(comm, torch)
    transport = comm.device_transport
    assert transport.startswith("nccl"), f"Piper's CUDA calls went through {transport}"
    device = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
    comm.close()
    pt.fill_from_mpi()
    from datetime import timedelta

    from piper_comm import envs

    dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=envs.timeout()))
    y = (torch.arange(P * 2, dtype=torch.float32, device=device) + 100 * me)
    got = torch.empty_like(y)
    dist.all_to_all_single(got, y)
    want = torch.cat([torch.arange(2 * me, 2 * me + 2, dtype=torch.float32) + 100 * s
                      for s in range(P)])
    assert torch.equal(got.cpu(), want), "torch's NCCL all_to_all_single: wrong result"
    ring = torch.empty(3, device=device)
    ops = [dist.P2POp(dist.isend, torch.full((3,), float(me), device=device), (me + 1) % P),
           dist.P2POp(dist.irecv, ring, (me - 1) % P)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    assert torch.equal(ring.cpu(), torch.full((3,), float((me - 1) % P))), "NCCL send/recv"
    dist.destroy_process_group()
    return {"piper": transport, "torch_nccl": ".".join(map(str, torch.cuda.nccl.version()))}
