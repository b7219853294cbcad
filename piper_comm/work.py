"""Asynchronous collectives: the `Work` handle of a call queued on the communicator's C++ worker.

`comm.all_to_all(..., async_op=True)` (and all_to_all_v) returns a `Work` at once; the call
runs on the communicator's C++ worker thread (csrc/python/call_queue.hpp), one call at a time,
in issue order (collectives must be issued in the same order on every rank, and the queue
keeps that order). The worker runs without the GIL: the caller's Python keeps running; on a
host with no idle core the worker's polling competes with the caller's compute for CPU (see
bench/async_overlap.py for what overlaps).

Who must call what:
    * the caller must not read or write `send`, `recv` (or the counts) until `wait()` returned;
      Piper reads and writes them from the worker meanwhile;
    * every rank must issue the same collectives in the same order, async or not; a synchronous
      call made while async work is pending waits until the queue drained, so the order stays
      the one the program issued;
    * `wait()` returns what the synchronous call returns, or raises what it would have raised
      (PiperUsageError on every rank for bad input, PiperTimeoutError / PiperPeerError after
      which the communicator is unusable: calls queued behind fail at once);
    * `comm.close()` drains the queue first (every queued call is bounded by PIPER_TIMEOUT),
      so it does not hang.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable
from typing import Any

from .errors import PiperTimeoutError

log = logging.getLogger("piper")

_UNSET = object()


class Work:
    """Handle of one asynchronous collective.

    wait(timeout=None): blocks (without the GIL) until the call completed and returns its
        result (the synchronous call's return value), or re-raises its error. With `timeout`
        (seconds) it raises PiperTimeoutError naming the call if it has not completed by then;
        the call keeps running (its own limit is PIPER_TIMEOUT) and wait() may be called again.
    is_completed(): True once the call finished, successfully or not (never blocks).
    """

    def __init__(self, what: str, rank: int, queue, pending, finish: Callable[[Any], Any]):
        """queue: the communicator's _C.CallQueue; pending: the call's _C.PendingCall;
        finish(pending) returns the call's result or raises its error (once)."""
        self.what, self.rank = what, rank
        self._queue, self._pending, self._finish = queue, pending, finish
        self._result: Any = _UNSET
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        state = ("failed" if self._error is not None else "done") if self.is_completed() \
            else "pending"
        return f"Work({self.what!r}, rank={self.rank}, {state})"

    def is_completed(self) -> bool:
        return self._pending is None or self._queue.done(self._pending)

    def wait(self, timeout: float | None = None) -> Any:
        if self._pending is not None:
            if not self._queue.wait(self._pending, -1.0 if timeout is None else timeout):
                raise PiperTimeoutError(
                    f"piper: {self.what}: rank {self.rank}: wait(timeout={timeout:g}) expired "
                    f"before the operation completed (it is still running, bounded by "
                    f"PIPER_TIMEOUT; wait() may be called again)")
            try:
                self._result = self._finish(self._pending)
            except BaseException as e:
                self._error = e
            self._pending = None  # the call's references (send, recv) go with it
        if self._error is not None:
            raise self._error
        return self._result


# Communicators whose queue may still run at interpreter exit are drained before MPI finalises
# (mpi4py finalises after the atexit handlers), so that no call is cut inside an MPI call.
_live: weakref.WeakSet = weakref.WeakSet()


def drain_at_exit(owner) -> None:
    """Calls owner._drain_at_exit() (bounded) when the interpreter exits."""
    _live.add(owner)


@atexit.register
def _drain_at_exit() -> None:
    for owner in list(_live):
        owner._drain_at_exit()
