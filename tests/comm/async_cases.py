"""Rank-side cases of tests/comm/test_async.py: all_to_all(v) with async_op=True.

Payloads come from cases._block (a pure function of seed, call, source and destination), so
every rank checks what it received byte for byte without a reference from its peers.
"""

from __future__ import annotations

import time

import numpy as np

import piper_comm as pc
from tests.comm.cases import _block, _bytes, _itemsize, _make, skip_and_stay

KINDS_DTYPES = [("numpy", "float32"), ("numpy", "int64"), ("torch", "float32"),
                ("torch", "int64")]


class _Call:
    """One all_to_all_v: its send array, recv buffer and expected bytes on this rank."""

    def __init__(self, comm, C: np.ndarray, kind: str, dtype: str, seed: int, call: int,
                 use_recv: bool):
        P, me = comm.size, comm.rank
        self.C, self.call, self.kind = C, call, kind
        row_bytes = _itemsize(kind, dtype) * 2
        raw = np.concatenate([_block(seed, call, me, j, int(C[me, j]), row_bytes, False)
                              for j in range(P)])
        self.send = _make(kind, dtype, (2,), raw)
        self.expect = np.concatenate([_block(seed, call, i, me, int(C[i, me]), row_bytes, False)
                                      for i in range(P)])
        total = int(C[:, me].sum())
        self.recv = _make(kind, dtype, (2,), np.zeros(total * row_bytes, np.uint8)) \
            if use_recv else None
        self.where = f"rank {me}: {kind} {dtype} call={call}"

    def issue(self, comm, async_op: bool):
        me = comm.rank
        return comm.all_to_all_v(self.send, list(self.C[me]), recv=self.recv,
                                 recv_counts=list(self.C[:, me]) if self.call % 2 else None,
                                 async_op=async_op)

    def check(self, comm, result) -> np.ndarray:
        out, counts = result
        assert counts == [int(c) for c in self.C[:, comm.rank]], f"{self.where}: {counts}"
        assert type(out) is type(self.send), self.where
        got = _bytes(out)
        assert np.array_equal(got, self.expect), f"{self.where}: payload differs"
        if self.recv is not None and got.size:
            assert np.shares_memory(got, _bytes(self.recv)), f"{self.where}: not a view"
        return got


def _counts(P: int, seed: int, call: int) -> np.ndarray:
    rng = np.random.default_rng([seed, call, 11])
    return rng.integers(0, 5, size=(P, P)) * (rng.random((P, P)) > 0.3)  # zeros included


def in_flight(local_size: int | None = None, seed: int = 5, rounds: int = 6,
              torch_ops: bool = True) -> int:
    """Several async ops in flight, interleaved with sync ops (all_to_all_v, all_to_all,
    barrier and, through piper_comm.torch, the internal _run), waited in a random order that
    differs between ranks; every result equals the synchronous result bit for bit."""
    comm = pc.init(local_size=local_size)
    checked = _in_flight(comm, seed, rounds, torch_ops)
    comm.close()
    return checked


def _in_flight(comm, seed: int = 5, rounds: int = 6, torch_ops: bool = True) -> int:
    P, me = comm.size, comm.rank
    order_rng = np.random.default_rng([seed, me])  # each rank waits in its own order
    call, checked = 0, 0
    for r in range(rounds):
        calls, works = [], []
        for k in range(4):
            call += 1
            kind, dtype = KINDS_DTYPES[(r + k) % len(KINDS_DTYPES)]
            c = _Call(comm, _counts(P, seed, call), kind, dtype, seed, call, use_recv=k % 2)
            calls.append(c)
            works.append(c.issue(comm, async_op=True))
            if k == 1:  # a synchronous all_to_all_v while two ops are pending: queued behind
                call += 1
                s = _Call(comm, _counts(P, seed, call), "numpy", "int64", seed, call, False)
                s.check(comm, s.issue(comm, async_op=False))
                checked += 1
            if k == 2:
                comm.barrier()
        # Equal split, async and sync, while the v-ops may still be pending.
        x = np.arange(P * 3 * 2, dtype=np.float32).reshape(P * 3, 2) + 1000 * me + r
        ref = np.concatenate([np.arange(P * 3 * 2, dtype=np.float32).reshape(P * 3, 2)
                              [me * 3:(me + 1) * 3] + 1000 * i + r for i in range(P)])
        w_eq = comm.all_to_all(x, async_op=True)
        assert np.array_equal(comm.all_to_all(x), ref), f"rank {me}: sync all_to_all"
        if torch_ops and r % 2 == 0:  # the torch layer's comm._run goes through the queue too
            import torch

            from piper_comm.torch import all_to_all_single

            t = torch.from_numpy(x.copy())
            out = torch.empty_like(t)
            all_to_all_single(out, t, group=comm)
            assert np.array_equal(out.numpy(), ref), f"rank {me}: all_to_all_single"
            checked += 1
        results = {}
        for i in order_rng.permutation(len(works)):
            results[int(i)] = works[i].wait()
            assert works[i].is_completed()
        assert np.array_equal(w_eq.wait(), ref), f"rank {me}: async all_to_all"
        checked += 2
        # The same calls again, synchronously: identical bytes.
        for i, c in enumerate(calls):
            async_bytes = c.check(comm, results[i]).copy()
            sync_bytes = c.check(comm, c.issue(comm, async_op=False))
            assert np.array_equal(async_bytes, sync_bytes), f"{c.where}: async != sync"
            checked += 2
        # wait() again returns the same result; the first wait already completed it.
        assert works[0].wait()[1] == results[0][1]
    return checked


def errors(local_size: int | None = None) -> dict:
    """Bad input in an async op raises the same PiperUsageError from wait() on every rank;
    the communicator stays usable, and ops queued behind the bad one still complete."""
    comm = pc.init(local_size=local_size)
    P, me = comm.size, comm.rank
    ok = np.arange(P * 2 * 3, dtype=np.float32).reshape(P * 2, 3)
    counts = [2] * P
    seen = []
    # rank 1 expects 3 rows from rank 0, which sends 2 (found by the metadata exchange)
    bad = comm.all_to_all_v(ok, counts, recv_counts=[3 if me == 1 else 2, *[2] * (P - 1)],
                            async_op=True)
    after = comm.all_to_all_v(ok, counts, async_op=True)
    rows = comm.all_to_all(ok[: 2 * P - 1] if me == 0 else ok, async_op=True)
    for work, text in ((bad, "count mismatch"), (rows, "not divisible")):
        try:
            work.wait()
        except pc.PiperUsageError as e:
            msg = str(e)
            assert text in msg and "rank" in msg, f"rank {me}: {text!r} not in {msg!r}"
            assert work.what.split(" #")[0] in msg, f"rank {me}: op not named in {msg!r}"
            assert work.is_completed()
            seen.append(msg)
        else:
            raise AssertionError(f"rank {me}: no PiperUsageError ({text})")
    out, got = after.wait()
    assert got == counts and out.shape == (2 * P, 3)
    # An unknown algorithm, caught locally on rank 0 only, is still raised on every rank.
    work = comm.all_to_all(ok, algorithm="bogus" if me == 0 else "auto", async_op=True)
    try:
        work.wait()
        raise AssertionError(f"rank {me}: no error for algorithm='bogus'")
    except pc.PiperUsageError as e:
        assert "unknown algorithm" in str(e), str(e)
    comm.barrier()
    comm.close()
    try:
        comm.all_to_all(ok, async_op=True)
        raise AssertionError("async op on a closed communicator")
    except pc.PiperUsageError as e:
        assert "closed" in str(e)
    return {"cases": len(seen) + 1}


def peer_never_joins(local_size: int | None = None, timeout: float = 3.0) -> dict:
    """The last rank skips an async op. Elsewhere: wait(0.3) raises PiperTimeoutError naming
    the op while it is still running; close() with that op pending returns once the op hit its
    own deadline (PIPER_TIMEOUT); wait() then re-raises that PiperTimeoutError; later calls
    fail fast (the communicator is unusable)."""
    comm = pc.init(local_size=local_size, timeout=timeout)
    P, me = comm.size, comm.rank
    x = np.ones((P * 4, 2), dtype=np.float32)
    comm.all_to_all(x, async_op=True).wait()  # all_to_all #1: the thread is running
    if me == P - 1:
        return skip_and_stay(comm)
    work = comm.all_to_all(x, async_op=True)  # all_to_all #2
    queued = comm.all_to_all_v(x, [4] * P, async_op=True)  # behind it, never starts
    t0 = time.monotonic()
    try:
        work.wait(timeout=0.3)
        raise AssertionError(f"rank {me}: wait(0.3) returned")
    except pc.PiperTimeoutError as e:
        msg = str(e)
        assert "all_to_all #2" in msg and f"rank {me}" in msg and "wait(timeout=0.3)" in msg, msg
    waited = time.monotonic() - t0
    assert waited < 2.0, f"wait(0.3) took {waited:.1f} s"
    assert not work.is_completed()
    comm.close()  # pending work: drained, bounded by the op's own deadline
    took = time.monotonic() - t0
    assert took <= timeout + 5, f"close took {took:.1f} s"
    assert work.is_completed() and queued.is_completed()
    try:
        work.wait()
        raise AssertionError(f"rank {me}: no PiperTimeoutError from wait()")
    except pc.PiperTimeoutError as e:
        msg = str(e)
        assert "all_to_all #2" in msg and f"rank {me}" in msg and str(P - 1) in msg, msg
    try:
        queued.wait()
        raise AssertionError(f"rank {me}: the op queued behind a failure completed")
    except pc.PiperError as e:
        assert "all_to_all_v #3" in str(e) and "unusable" in str(e), str(e)
    # tests/worker.py lets every rank report before this rank's exit ends the job
    return {"hard_exit": 0, "hard_exit_after_all": True, "took": took}


def close_pending(local_size: int | None = None, seed: int = 9) -> int:
    """close() with several ops pending on every rank: they complete, results stay valid."""
    comm = pc.init(local_size=local_size)
    P = comm.size
    calls = [_Call(comm, _counts(P, seed, i), "numpy", ("float32", "int64")[i % 2], seed, i,
                   use_recv=i % 3 == 0) for i in range(8)]  # numpy: no torch import (seconds)
    works = [c.issue(comm, async_op=True) for c in calls]
    t0 = time.monotonic()
    comm.close()
    assert time.monotonic() - t0 < 20
    for c, w in zip(calls, works, strict=True):
        assert w.is_completed()
        c.check(comm, w.wait())
    return len(works)


def thread_level() -> dict:
    """Under MPI initialised below MPI_THREAD_MULTIPLE, async_op=True raises a clear
    PiperUsageError on every rank; synchronous calls still work."""
    from mpi4py import MPI

    comm = pc.init()
    P = comm.size
    level = MPI.Query_thread()
    x = np.arange(P * 2, dtype=np.int64)
    try:
        comm.all_to_all(x, async_op=True)
        raise AssertionError(f"async_op=True accepted at thread level {level}")
    except pc.PiperUsageError as e:
        assert "MPI_THREAD_MULTIPLE" in str(e) and "all_to_all" in str(e), str(e)
    out = comm.all_to_all(x)  # the refused call consumed no sequence number
    assert out.shape == x.shape
    comm.close()
    return {"level": level}


def torch_transport(local_size: int | None = None) -> int:
    """Under torchrun (TorchTransport over gloo): async ops on the progress thread while the
    main thread runs a gloo collective on the same process group."""
    import torch
    import torch.distributed as dist

    comm = pc.init(local_size=local_size)
    assert comm._transport.name == "torch", comm._transport.name
    n = _in_flight(comm, rounds=2)
    P, me = comm.size, comm.rank
    calls = [_Call(comm, _counts(P, 21, i), kind, dtype, 21, i, use_recv=i % 2)
             for i, (kind, dtype) in enumerate(KINDS_DTYPES)]
    works = [c.issue(comm, async_op=True) for c in calls]
    t = torch.full((4,), float(me + 1))
    dist.all_reduce(t)  # concurrently with the progress thread's point-to-point
    assert float(t[0]) == P * (P + 1) / 2
    for c, w in zip(reversed(calls), reversed(works), strict=True):
        c.check(comm, w.wait())
        n += 1
    comm.close()
    return n


def buffers_released(local_size: int | None = None) -> int:
    """Once an async call completed and the caller dropped its Work and buffers, nothing of
    Piper keeps them (the progress thread used to hold the last operation's send, recv and
    result until the next operation: a training step's last buffers lived into the next
    step). Returns the number of buffers checked."""
    import gc
    import weakref

    import torch

    comm = pc.init(local_size=local_size)
    P = comm.size
    send = torch.arange(4 * P, dtype=torch.float32)
    recv = torch.empty(4 * P, dtype=torch.float32)
    refs = [weakref.ref(send), weakref.ref(recv)]
    work = comm.all_to_all_v(send, [4] * P, recv=recv, recv_counts=[4] * P, async_op=True)
    out, _ = work.wait()
    refs.append(weakref.ref(out))
    del send, recv, out, work
    gc.collect()
    time.sleep(0.05)  # the progress thread finishes its loop iteration
    alive = [i for i, r in enumerate(refs) if r() is not None]
    comm.barrier()
    assert not alive, f"rank {comm.rank}: buffers {alive} (send, recv, result) still alive"
    return len(refs)
