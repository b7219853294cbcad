"""Point-to-point transports under the inter-node stage: MPI (mpi4py) and torch.distributed.

Both move raw uint8 numpy buffers without copying and are polled, never waited on blindly:
`wait_all` bounds every wait by a deadline and watches peers that run on this host, so a
missing peer raises PiperTimeoutError and a dead one PiperPeerError, each naming the operation,
this rank, the peers still pending and their sizes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PiperPeerError, PiperTimeoutError, PiperUsageError


@dataclass
class Pending:
    """One posted message: what to name in an error if it never completes."""

    request: Any
    kind: str   # "send" | "recv"
    peer: int   # world rank
    nbytes: int


def alive(pid: int) -> bool:
    """False once the process is gone or a zombie (dead, not yet reaped by its launcher)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


class Transport:
    """Base: rank/size, peer liveness and the polling loop. Subclasses post and test."""

    name = "base"

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.pids: list[int] = []        # pid of every rank (filled by set_peers)
        self.same_host: list[bool] = []  # whether a rank runs on this host

    def set_peers(self, pids: list[int], hosts: list[str]) -> None:
        me = hosts[self.rank]
        self.pids, self.same_host = pids, [h == me for h in hosts]

    def dead_peers(self, peers) -> list[int]:
        """Peers on this host whose process is gone."""
        if not self.pids:
            return []
        return [p for p in peers if self.same_host[p] and not alive(self.pids[p])]

    # -- subclass interface
    def isend(self, buf: np.ndarray, peer: int, tag: int) -> Any: ...
    def irecv(self, buf: np.ndarray, peer: int, tag: int) -> Any: ...
    def test(self, request: Any) -> bool: ...
    def cancel(self, request: Any) -> None: ...
    def progress(self) -> None:
        """Lets the transport move queued messages (called while other waits spin)."""

    def wait_all(self, pending: list[Pending], what: str, deadline: float, timeout: float) -> None:
        """Completes every posted message or raises before `deadline` (time.monotonic())."""
        todo = [p for p in pending if p.request is not None]
        if not todo or self.test_all([p.request for p in todo]):
            return
        start = time.monotonic()
        next_check = start + 0.1
        while True:
            # Oversubscribed hosts: let the peers we wait for run, but stay responsive; sleep
            # only once the wait is long (a straggler, not a message in flight).
            now = time.monotonic()
            if now - start < 0.02:
                os.sched_yield()
            else:
                time.sleep(2e-4)
            if self.test_all([p.request for p in todo]):
                return
            if now < next_check and now < deadline:
                continue
            todo = [p for p in todo if not self.test(p.request)]
            if not todo:
                return
            dead = self.dead_peers(sorted({p.peer for p in todo if p.peer >= 0}))
            if dead:
                self.abandon(todo)
                raise PiperPeerError(
                    f"piper: {what}: rank {self.rank} found that rank(s) {dead} (same host) "
                    f"died while {_describe(todo)} were pending")
            if now >= deadline:
                self.abandon(todo)
                raise PiperTimeoutError(
                    f"piper: {what}: rank {self.rank} timed out after {timeout:g} s waiting for "
                    f"peer(s) {sorted({p.peer for p in todo})}: {_describe(todo)} still pending "
                    f"(set PIPER_TIMEOUT to change the limit)")
            next_check = now + 0.1

    def test_all(self, requests: list) -> bool:
        return all(self.test(r) for r in requests)

    def abandon(self, todo: list[Pending]) -> None:
        """Cancels messages that will never complete, so that shutdown does not wait on them."""
        for p in todo:
            with contextlib.suppress(Exception):  # best effort on a failed communicator
                self.cancel(p.request)

    def close(self) -> None: ...
    def abort(self, code: int) -> None:
        os._exit(code)


def _describe(todo: list[Pending]) -> str:
    parts = [f"{p.kind} {p.nbytes} B {'to' if p.kind == 'send' else 'from'} rank {p.peer}"
             if p.peer >= 0 else p.kind for p in todo[:8]]
    more = f" and {len(todo) - 8} more" if len(todo) > 8 else ""
    return ", ".join(parts) + more


class MpiTransport(Transport):
    """mpi4py on a private duplicate of the launcher's communicator."""

    name = "mpi"

    def __init__(self, comm: Any, timeout: float):
        from mpi4py import MPI

        self.MPI = MPI
        super().__init__(comm.Get_rank(), comm.Get_size())
        # A private communicator, duplicated without blocking so that a missing rank is named.
        self.comm, request = comm.Idup()
        deadline = time.monotonic() + timeout
        self.wait_all([Pending(request, "dup", -1, 0)], "init (communicator duplication)",
                      deadline, timeout)
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)

    def isend(self, buf, peer, tag):
        return self.comm.Isend([buf, self.MPI.BYTE], dest=peer, tag=tag)

    def irecv(self, buf, peer, tag):
        return self.comm.Irecv([buf, self.MPI.BYTE], source=peer, tag=tag)

    def test(self, request) -> bool:
        try:
            return request.Test()
        except self.MPI.Exception as e:
            if e.Get_error_class() == self.MPI.ERR_TRUNCATE:
                raise PiperUsageError(f"piper: rank {self.rank}: a message was larger than its "
                                      f"receive buffer (counts disagree between ranks; run with "
                                      f"PIPER_CHECK=1 to find them): {e}") from e
            raise PiperPeerError(f"piper: MPI reported an error on rank {self.rank}: {e}") from e

    def cancel(self, request) -> None:
        request.Cancel()
        request.Free()

    def test_all(self, requests: list) -> bool:
        try:
            return self.MPI.Request.Testall(requests)
        except self.MPI.Exception:
            return all(self.test(r) for r in requests)  # names the failing message's error

    def progress(self) -> None:
        if self.comm is not None:
            self.comm.Iprobe(self.MPI.ANY_SOURCE, self.MPI.ANY_TAG)


    def close(self) -> None:
        if self.comm is not None and not self.MPI.Is_finalized():
            self.comm.Free()
        self.comm = None

    def abort(self, code: int) -> None:
        self.MPI.COMM_WORLD.Abort(code)


class TorchTransport(Transport):
    """torch.distributed point-to-point (gloo on CPU) on the default group, a given group, or
    directly on a c10d backend object (`backend`: ranks are the backend's own)."""

    name = "torch"

    def __init__(self, group: Any = None, backend: Any = None):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.group, self.backend = torch, dist, group, backend
        if backend is not None:
            super().__init__(backend.rank(), backend.size())
        else:
            super().__init__(dist.get_rank(group), dist.get_world_size(group))

    def _global(self, peer: int) -> int:
        return peer if self.group is None else self.dist.get_global_rank(self.group, peer)

    def isend(self, buf, peer, tag):
        t = self.torch.from_numpy(buf)
        if self.backend is not None:
            return self.backend.send([t], peer, tag)
        return self.dist.isend(t, self._global(peer), self.group, tag)

    def irecv(self, buf, peer, tag):
        t = self.torch.from_numpy(buf)
        if self.backend is not None:
            return self.backend.recv([t], peer, tag)
        return self.dist.irecv(t, self._global(peer), self.group, tag)

    def wait_all(self, pending: list[Pending], what: str, deadline: float, timeout: float) -> None:
        """gloo's point-to-point work never reports completion before wait() is called, so
        each message is waited on with the time left (gloo enforces it)."""
        from datetime import timedelta

        todo = [p for p in pending if p.request is not None]
        while todo:
            left = deadline - time.monotonic()
            try:
                todo[0].request.wait(timedelta(seconds=max(left, 1e-3)))
            except RuntimeError as e:
                dead = self.dead_peers(sorted({p.peer for p in todo}))
                if dead:
                    raise PiperPeerError(
                        f"piper: {what}: rank {self.rank} found that rank(s) {dead} (same host) "
                        f"died while {_describe(todo)} were pending ({e})") from e
                raise PiperTimeoutError(
                    f"piper: {what}: rank {self.rank} timed out after {timeout:g} s waiting for "
                    f"peer(s) {sorted({p.peer for p in todo})}: {_describe(todo)} still pending "
                    f"(set PIPER_TIMEOUT to change the limit): {e}") from e
            todo.pop(0)

    def test(self, request) -> bool:
        return request.is_completed()



class SingleTransport(Transport):
    """One process: there is nobody to talk to."""

    name = "single"

    def __init__(self):
        super().__init__(0, 1)

    def isend(self, buf, peer, tag):
        raise AssertionError("single-process transport has no peers")

    irecv = isend

    def test(self, request) -> bool:
        return True

