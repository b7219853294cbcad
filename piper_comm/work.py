"""Asynchronous collectives: the `Work` handle and the per-communicator progress thread.

`comm.all_to_all(..., async_op=True)` (and all_to_all_v) returns a `Work` at once; the
operation runs on the communicator's progress thread, one operation at a time, in issue order
(collectives must be issued in the same order on every rank, and the queue keeps that order).

Who must call what:
    * the caller must not read or write `send`, `recv` (or the counts) until `wait()` returned;
      Piper reads and writes them from the progress thread meanwhile;
    * every rank must issue the same collectives in the same order, async or not; a synchronous
      call made while async work is pending is queued behind it (and waited for), so the order
      stays the one the program issued;
    * `wait()` returns what the synchronous call returns, or raises what it would have raised
      (PiperUsageError on every rank for bad input, PiperTimeoutError / PiperPeerError after
      which the communicator is unusable);
    * `comm.close()` drains the queue first (every queued operation is bounded by
      PIPER_TIMEOUT, and once one fails the rest fail at once), so it does not hang.

The thread is started on the first async call (daemon, named "piper-progress-r<rank>") and
stopped by close(). It waits as the synchronous calls do (transport.wait_all: sched_yield
polls for 20 ms, then 200 us sleeps; MPI and the C++ copies run without the GIL), so the
caller's Python keeps running; on a host with no idle core its polling competes with the
caller's compute for CPU (see bench/async_overlap.py for what overlaps).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .errors import PiperError, PiperTimeoutError

log = logging.getLogger("piper")


class Work:
    """Handle of one asynchronous collective.

    wait(timeout=None): blocks until the operation completed and returns its result (the
        synchronous call's return value), or re-raises its error. With `timeout` (seconds) it
        raises PiperTimeoutError naming the operation if it has not completed by then; the
        operation keeps running (its own limit is PIPER_TIMEOUT) and wait() may be called again.
    is_completed(): True once the operation finished, successfully or not (never blocks).
    """

    def __init__(self, what: str, rank: int):
        self.what, self.rank = what, rank
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = ("failed" if self._error is not None else "done") if self._done.is_set() \
            else "pending"
        return f"Work({self.what!r}, rank={self.rank}, {state})"

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise PiperTimeoutError(
                f"piper: {self.what}: rank {self.rank}: wait(timeout={timeout:g}) expired before "
                f"the operation completed (it is still running, bounded by PIPER_TIMEOUT; "
                f"wait() may be called again)")
        if self._error is not None:
            raise self._error
        return self._result


class ProgressThread:
    """Runs queued operations one at a time, in order, on a daemon thread.

    `pending` counts operations queued or running; the owner runs a synchronous call directly
    only when it is 0 (then the thread is idle and touches nothing). `on_crash(error)` is
    called if the loop itself dies (not when an operation raises: that goes to its Work).
    """

    def __init__(self, name: str, on_crash: Callable[[BaseException], None], drain_s: float):
        self.drain_s = drain_s  # how long stop() at exit waits for queued operations
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._on_crash = on_crash
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _live.add(self)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def submit(self, work: Work, fn: Callable[[], Any]) -> Work:
        with self._lock:
            if self._dead is not None:
                raise PiperError(f"piper: {work.what}: rank {work.rank}: the progress thread "
                                 f"died: {self._dead}") from self._dead
            self._pending += 1
        self._queue.put((work, fn))
        return work

    def _loop(self) -> None:
        item = None
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                work, fn = item
                try:
                    result, error = fn(), None
                except BaseException as e:  # the caller gets it from wait()
                    result, error = None, e
                with self._lock:
                    self._pending -= 1
                work._finish(result, error)
                # Drop this frame's references now: held until the next operation arrives,
                # they would keep the last one's buffers (send, recv, result) alive, e.g. from
                # one training step into the next.
                item = work = fn = result = error = None
        except BaseException as e:  # the loop itself broke: fail everything still queued
            self._crash(e, item)

    def _crash(self, error: BaseException, current) -> None:
        with self._lock:
            self._dead = error
        self._on_crash(error)
        items = [current] if current is not None else []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for it in items:
            if it is not None:
                work = it[0]
                work._finish(None, PiperError(f"piper: {work.what}: rank {work.rank}: the "
                                              f"progress thread died: {error}"))
        with self._lock:
            self._pending = 0

    def stop(self, timeout: float) -> bool:
        """Lets queued operations finish, then ends the thread. Returns False if it is still
        running after `timeout` seconds (an operation blocked past its own deadline)."""
        _live.discard(self)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        return not self._thread.is_alive()


# Threads still running at interpreter exit are drained before MPI finalises (mpi4py
# finalises after the atexit handlers), so that no operation is cut inside an MPI call.
_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for thread in list(_live):
        if not thread.stop(thread.drain_s):
            log.warning("piper: a progress thread was still running at exit")
