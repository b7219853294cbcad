"""Communicator: the object `pc.init()` returns. Owns the transport, the topology, the node
segment, the call counter and the call queue; runs all_to_all / all_to_all_v (see
docs/architecture.md), synchronously or, with async_op=True, on the queue's C++ worker (see
work.py for the async contract)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _C, envs, validate
from . import arrays as A
from . import work as _work
from .cost import Links
from .errors import PiperError, PiperPeerError, PiperTimeoutError, PiperUsageError
from .transport import Transport
from .work import Work

log = logging.getLogger("piper")

def mpi_route(linked: str | bool | None, loaded: str, mpi_calls: str) -> tuple[bool, str]:
    """How an MPI transport's messages go: (True, "") when the C++ executor calls MPI itself
    (the extension was linked against ``linked``, the very library mpi4py loaded, and
    PIPER_MPI_CALLS is "cpp"); else (False, why MPI goes through mpi4py: a warning's text, ""
    when the user asked for it). Called once per communicator over MPI; pure."""
    if mpi_calls != "cpp":
        return False, ""
    if not linked:
        return False, ("piper_comm._C was built without MPI (an isolated build, such as pip "
                       "install without --no-build-isolation, cannot see mpi4py; or "
                       "PIPER_MPI=OFF); MPI is called through mpi4py instead, slower per call "
                       "(rebuild in this environment: pip install --no-build-isolation "
                       "--no-deps -e .)")
    if loaded.strip() == str(linked).strip():
        return True, ""
    return False, (f"mpi4py loaded another MPI ({loaded.splitlines()[0]}) than the one "
                   f"piper_comm._C was built against ({str(linked).splitlines()[0]}); MPI is "
                   f"called through mpi4py instead (rebuild Piper in this environment)")


_warned: set[str] = set()  # mpi_route's warnings given by this process (once each)


def _executor(transport: Transport, topology, segment):
    """The C++ executor (csrc/runtime) of this communicator: MPI called from C++ when the
    transport is MPI and the extension was built against the very MPI library mpi4py loaded,
    else the Python transport object called from C++ (torch.distributed/gloo, one process)."""
    channel = segment if isinstance(segment, _C.NodeChannel) else None
    same_host = [int(h) for h in transport.same_host]
    device = {"inter": envs.inter(), "nccl_library": envs.nccl_library()}  # for CUDA calls
    if transport.name == "mpi":
        cpp, why = mpi_route(_C.build_info().get("mpi_linked"),
                             transport.MPI.Get_library_version(), envs.mpi_calls())
        if cpp:
            return _C.Executor.over_mpi(topology, transport.comm.handle, channel, transport.pids,
                                        same_host, **device)
        if why and why not in _warned:
            _warned.add(why)
            log.warning("piper: rank %d: %s", transport.rank, why)
    return _C.Executor.over_python(topology, transport, channel, transport.pids, same_host,
                                   **device)


class Communicator:
    """All-to-all(v) over `size` ranks grouped into nodes.

    Attributes: rank, size, node, num_nodes, local_rank, local_size (ints);
    last_algorithm: "halo" | "flat" | "pairwise" after a call, None before ("halo" on a
    topology of one-rank nodes runs the flat schedule, which is what HALO reduces to there).
    Every rank must make the same sequence of collective calls (async ones included). Not
    thread-safe: one thread issues the calls (the progress thread is Piper's own).
    """

    def __init__(self, transport: Transport, node_of: Sequence[int], segment,
                 links: Links | None = None, timeout: float | None = None):
        self._transport = transport
        self._topology = _C.Topology(np.asarray(node_of, dtype=np.int64))
        self._node_of = np.asarray(node_of, dtype=np.int64)
        self.rank, self.size = transport.rank, transport.size
        self.node = int(self._node_of[self.rank])
        self.num_nodes = int(self._topology.num_nodes)
        self.local_rank = int(self._topology.local_of(self.rank))
        self.local_size = int(self._topology.node_size(self.node))
        self.timeout = timeout if timeout is not None else envs.timeout()
        self.last_algorithm: str | None = None
        # The environment is read once, as NCCL and MPI read theirs (see envs.py).
        self._forced_algorithm, self._check, self._debug = envs.algorithm(), envs.check(), \
            envs.debug()
        self._segment = segment
        segment.set_progress(transport.progress)
        self._executor = _executor(transport, self._topology, segment)
        self._calls = _C.CallQueue(self._executor)  # sync calls inline, async on its worker
        _work.drain_at_exit(self)
        self.links = links or Links()
        self._seq = 0
        self._failed: PiperError | None = None
        self._closed = False
        self._async_refused: str | None = None        # why async_op cannot run (thread level)

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, node={self.node}/"
                f"{self.num_nodes}, local_rank={self.local_rank}/{self.local_size}, "
                f"transport={self.transport})")

    @property
    def links(self) -> Links:
        """The link parameters algorithm="auto" prices each call with (piper_comm.cost): those
        of PIPER_PLATFORM when set at init, else cost.Links' defaults; `links.source` says
        which. Setting it takes effect from the next call (every rank must set the same)."""
        return self._links

    @links.setter
    def links(self, links: Links) -> None:
        self._links = links
        self._executor.set_links(links.coefficients)

    @property
    def node_of(self) -> tuple[int, ...]:
        """The node index of every rank, by rank: node_of[r] == node on rank r (nodes are
        numbered 0 .. num_nodes - 1; a node's ranks need not be contiguous)."""
        return tuple(int(n) for n in self._node_of)

    @property
    def check_counts(self) -> dict[str, int]:
        """How this communicator's calls were checked across ranks so far (PIPER_CHECK):
        {"header_rounds": header rounds before the data, "in_band": calls whose signature
        travelled with the data (no extra message), "agreement_rounds": rounds after a
        mismatch}."""
        return self._executor.check_counts

    @property
    def device(self) -> int | None:
        """The CUDA device this rank's CUDA calls run on, fixed by the first one (None before;
        a later call on another device is a PiperUsageError)."""
        d = self._executor.device if self._executor is not None else -1
        return d if d >= 0 else None

    @property
    def device_transport(self) -> str | None:
        """What CUDA calls' messages go through: "nccl 2.x.y" or "host-staged over mpi"
        (PIPER_INTER), None before the first CUDA call."""
        return (self._executor.device_transport or None) if self._executor is not None else None

    @property
    def transport(self) -> str:
        """What the executor sends through: "mpi" (MPI called from C++), or "python:mpi",
        "python:torch", "python:single" (a Python transport called from the C++ executor)."""
        return self._executor.transport_name

    # -- lifecycle
    def close(self) -> None:
        """Releases the node segment and the transport. Idempotent; a collective is not
        required, but every rank should close before the launcher's finalisation. Pending
        async operations are completed first (bounded: see work.py); wait() on their Work
        still returns their result or error afterwards."""
        if self._closed:
            return
        self._closed = True
        # Drain the queue: queued calls complete (or fail: each is bounded by PIPER_TIMEOUT,
        # and after a failure the rest fail at once); their Work keeps the result.
        if not self._calls.stop(self.timeout + 10.0):
            # Never unmap memory a call may still touch: leak it instead.
            log.warning("piper: close on rank %d: an async call is still running; the "
                        "segment and transport are left open", self.rank)
            return
        try:  # collective when a CUDA call ran: the node's IPC mappings, NCCL's communicator
            self._executor.close_device(f"close on rank {self.rank}", self.timeout)
        except PiperError as e:
            log.warning("piper: %s (the device plane is left to process exit)", e)
        self._calls = self._executor = None  # before the segment they point into is unmapped
        self._segment.close()
        self._transport.close()

    def _drain_at_exit(self) -> None:
        if not self._closed and not self._calls.stop(self.timeout + 10.0):
            log.warning("piper: rank %d: async calls were still running at exit", self.rank)

    def abort(self, code: int = 1) -> None:
        """Ends the whole job now (MPI_Abort under MPI): the way out after a peer failure."""
        self._transport.abort(code)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _begin(self, op: str) -> tuple[int, str]:
        """Numbers a call when it is issued (the issuing thread, in issue order)."""
        if self._closed:
            raise PiperUsageError(f"piper: {op} on rank {self.rank}: communicator is closed")
        self._check_usable(op)
        self._seq += 1
        return self._seq, f"{op} #{self._seq}"

    def _check_usable(self, what: str) -> None:
        if self._failed is not None:
            raise PiperError(f"piper: {what} on rank {self.rank}: communicator is unusable "
                             f"after an earlier failure: {self._failed}")

    def _start(self, what: str) -> float:
        """The deadline of a call that starts running now (queued calls start late)."""
        self._check_usable(what)
        return time.monotonic() + self.timeout

    def _check_async(self, what: str) -> None:
        """MPI must allow calls from several threads (the caller may use MPI meanwhile)."""
        if self._async_refused is None:
            self._async_refused = ""
            MPI = getattr(self._transport, "MPI", None) if self._transport.name == "mpi" \
                else None
            if MPI is not None and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
                names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE",
                         MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
                         MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED"}
                self._async_refused = (
                    f"MPI was initialised with {names.get(MPI.Query_thread(), 'a lower level')}"
                    f", but async_op=True calls MPI from a progress thread and needs "
                    f"MPI_THREAD_MULTIPLE (mpi4py's default; check mpi4py.rc.thread_level "
                    f"and MPI4PY_RC_THREAD_LEVEL), or call with async_op=False")
        if self._async_refused:
            raise PiperUsageError(f"piper: {what} on rank {self.rank}: {self._async_refused}")

    # -- collectives
    def barrier(self) -> None:
        """Returns once every rank has called barrier (bounded by PIPER_TIMEOUT)."""
        seq, what = self._begin("barrier")
        self._calls.drain()  # behind the async calls issued before it
        deadline = self._start(what)
        mine = np.array([seq], dtype=np.int64)
        self._guard(self._executor.allgather, mine, _C.header_tag(seq), what,
                    deadline - time.monotonic(), self.timeout)

    def all_to_all(self, send: Any, recv: Any = None, algorithm: str = "auto",
                   async_op: bool = False) -> Any:
        """Equal-split all-to-all.

        Arguments:
            send: array of shape [size * m, ...]; rows i*m .. (i+1)*m go to rank i.
            recv: optional array of shape [>= size * m, ...], same dtype and trailing shape
                (filled in place: no copy); allocated like `send` when None.
            algorithm: "auto" | "halo" | "flat" | "pairwise" (PIPER_ALGO overrides).
            async_op: return a Work at once; the call runs on the progress thread and
                work.wait() returns the result. send and recv must stay untouched until then
                (see piper_comm/work.py for the whole contract).
        Returns:
            recv's first size * m rows: block i (rows i*m .. (i+1)*m) came from rank i
            (or a Work whose wait() returns them). A recv given with more rows that cannot
            be sliced (an object with only __cuda_array_interface__) is returned whole.
        """
        return self._run(1, "all_to_all", send, None, recv, None, algorithm, async_op=async_op,
                         recv_only=True)

    def all_to_all_v(self, send: Any, send_counts: Sequence[int], recv: Any = None,
                     recv_counts: Sequence[int] | None = None,
                     algorithm: str = "auto", async_op: bool = False, *,
                     exact_recv: bool = False) -> tuple[Any, list[int]]:
        """All-to-all with per-rank counts: MPI_Alltoallv semantics on rows (dim 0).

        Arguments:
            send: array [sum(send_counts), ...]; the first send_counts[0] rows go to rank 0,
                the next send_counts[1] rows to rank 1, and so on.
            send_counts: `size` non-negative ints (rows per destination rank).
            recv: optional array [>= sum(recv_counts), ...] filled in place.
            recv_counts: optional `size` ints, rows expected from each rank; exchanged when
                None. When given they must match what the peers send (checked, PIPER_CHECK).
            async_op: return a Work at once (as all_to_all); the counts are read when the
                call runs, so they too must stay unchanged until wait() returns.
            exact_recv: recv must have exactly sum(recv_counts) rows, not at least
                (torch.distributed's rule; the torch functions use it).
        Returns:
            (recv rows ordered by source rank, recv_counts as a list of ints), or a Work whose
            wait() returns that tuple. A recv given with more rows that cannot be sliced (an
            object with only __cuda_array_interface__) is returned whole.
        """
        return self._run(2, "all_to_all_v", send, send_counts, recv, recv_counts, algorithm,
                         exact_recv=exact_recv, async_op=async_op)

    # -- implementation
    def _guard(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (PiperTimeoutError, PiperPeerError) as e:
            self._failed = e
            raise

    def _run(self, op: int, name: str, send, send_counts, recv, recv_counts, algorithm,
             exact_recv: bool = False, async_op: bool = False, recv_only: bool = False):
        """Issues one all-to-all(v) (op 1: equal split, 2: with counts); returns
        (recv, recv_counts), recv alone when recv_only, or a Work of that when async_op.
        exact_recv (torch.distributed semantics): recv must have exactly the rows that arrive
        (sum of recv_counts, or send's rows for the equal split). The whole call, from argument
        checks to the last byte, is C++ (csrc/python/call.hpp), on this thread or, async, on
        the communicator's worker."""
        if async_op:
            self._check_async(name)
        seq, what = self._begin(name)
        self._start(what)
        request = validate.ALGO_IDS.get(self._forced_algorithm or algorithm, -1)
        t0 = time.perf_counter() if self._debug else 0.0

        def finish(result):
            out, counts, algo = result
            self.last_algorithm = algo
            if self._debug:
                log.info("%s rank %d: %s, %d rows received, %.1f us since issue", what,
                         self.rank, algo, len(out), 1e6 * (time.perf_counter() - t0))
            return out if recv_only else (out, counts)

        new_rows = A.new_rows
        if async_op and recv is None and (stream := A.caller_stream(send)) is not None:
            def new_rows(like, rows, _stream=stream):  # on the worker thread
                return A.new_rows(like, rows, _stream)
        pending = self._guard(self._calls.call, op, send, send_counts, recv, recv_counts,
                              request, exact_recv, recv_only, self._check, seq, what,
                              self.timeout, new_rows, async_op)
        if not async_op:
            return finish(pending)
        calls = self._calls  # the Work may be waited for after close()
        return Work(what, self.rank, calls, pending,
                    lambda p: finish(self._guard(calls.result, p)))
