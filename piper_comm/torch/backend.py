"""The "piper" torch.distributed backend: `dist.init_process_group("piper")`.

A Python ProcessGroup whose all_to_all_single / all_to_all run on Piper (HALO or flat, chosen
per call) for CPU and CUDA tensors; every other collective (all_reduce, broadcast, all_gather,
reduce_scatter, barrier, send/recv, ...) is delegated to a gloo backend (CPU tensors) or an
nccl backend (CUDA tensors) built on the same store. With PIPER_TORCH_CUDA_DELEGATE=gloo (the
default under PIPER_INTER=mpi: a machine whose NCCL cannot serve these ranks) CUDA tensors go
to gloo too, staged through host copies and synchronous: a fallback that works anywhere, not a
fast path.

Piper's collectives run when called: `async_op=True` returns a Work that is already complete
on the host side. For CUDA tensors the data moves in order on the caller's current stream
(torch.cuda.current_stream()), so later work on that stream sees the result, as after
work.wait() on nccl's Work; another stream must wait on it (stream.wait_stream).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo, _create_work_from_future
from torch.futures import Future

from .. import envs
from ..bootstrap import _detect, connect
from ..errors import PiperPeerError, PiperTimeoutError, PiperUsageError
from ..transport import MpiTransport, TorchTransport


class PiperDistTimeoutError(PiperTimeoutError, dist.DistBackendError):
    """A Piper wait timed out inside torch.distributed (caught as DistBackendError too)."""


class PiperDistPeerError(PiperPeerError, dist.DistBackendError):
    """A peer died inside torch.distributed (caught as DistBackendError too)."""


def _done_work(result: list[torch.Tensor]) -> dist.Work:
    """The Work of a collective that already ran. A C++ Work around a completed future:
    torch's dispatcher hands it on unchanged, so wait() returns at once and is_completed() is
    True on what dist.all_to_all_single(..., async_op=True) returns (a Python dist.Work
    subclass would be wrapped there, and its is_completed() would stay False)."""
    fut: Future = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


def _as_dist_error(e: Exception) -> Exception:
    if isinstance(e, PiperTimeoutError):
        return PiperDistTimeoutError(str(e))
    if isinstance(e, PiperPeerError):
        return PiperDistPeerError(str(e))
    return e


def _timeout_s(timeout: timedelta) -> float:
    """Seconds every wait of a "piper" group (Piper's calls and its delegates') may last:
    PIPER_TIMEOUT when set, else the timeout the script gave init_process_group / new_group,
    else PIPER_TIMEOUT's default (300 s). torch passes its 30-minute default when the script
    gave none, so that value counts as none."""
    from torch.distributed.constants import default_pg_timeout

    if envs.is_set("PIPER_TIMEOUT") or timeout == default_pg_timeout:
        return envs.timeout()
    return timeout.total_seconds()


class PiperProcessGroup(dist.ProcessGroup):
    """Created by torch.distributed for backend "piper" (one per group). Attributes:
    piper_communicator (the Communicator behind all-to-all), gloo (the delegate backend)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta,
                 global_ranks: list[int] | None = None):
        super().__init__(rank, size)
        seconds = _timeout_s(timeout)
        self._store, self._timeout = store, timedelta(seconds=seconds)
        self.gloo = ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size,
                                     self._timeout)
        self._nccl = None
        try:
            self._cuda_delegate = envs.torch_cuda_delegate()  # nccl | gloo
        except PiperUsageError as e:  # raised on every rank once connected (below)
            self._cuda_delegate = e
        whole_world = global_ranks is None or list(global_ranks) == list(range(size))
        transport = None
        if _detect() == "mpi" and whole_world:
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_size() == size and MPI.COMM_WORLD.Get_rank() == rank:
                transport = MpiTransport(MPI.COMM_WORLD, seconds)
        if transport is None:
            transport = TorchTransport(backend=self.gloo)
        self.piper_communicator = connect(transport, timeout=seconds)
        self._agree_on_cuda_delegate()

    def _agree_on_cuda_delegate(self) -> None:
        """Every rank must delegate CUDA collectives alike: ranks on nccl and ranks on gloo
        would each wait in a different backend until the timeout. One equal-split all-to-all
        of one int64 per rank (collective); PiperUsageError on every rank, naming the ranks of
        each side, when PIPER_TORCH_CUDA_DELEGATE (or PIPER_INTER, its default) differs or is
        invalid on some rank (an invalid or differing PIPER_INTER already raised on every rank
        in connect)."""
        import numpy as np

        names = (*envs.CUDA_DELEGATES, "an invalid PIPER_TORCH_CUDA_DELEGATE")
        own = self._cuda_delegate
        code = names.index(own) if isinstance(own, str) else 2
        seen = self.piper_communicator.all_to_all(np.full(self.size(), code,
                                                          dtype=np.int64)).tolist()
        if len(set(seen)) > 1 or code == 2:
            self.piper_communicator.close()
            sides = "; ".join(f"{name} on ranks {[r for r, c in enumerate(seen) if c == i]}"
                              for i, name in enumerate(names) if i in seen)
            raise PiperUsageError(
                f"piper torch backend: rank {self.rank()}: the ranks cannot agree on where "
                f"CUDA collectives go ({sides}){f': {own}' if code == 2 else ''}: set "
                f"PIPER_TORCH_CUDA_DELEGATE to nccl or gloo (or PIPER_INTER, whose 'mpi' "
                f"makes it gloo) alike on every rank")

    def getBackendName(self) -> str:
        return "piper"

    @property
    def nccl(self):
        """The CUDA delegate, built on first use (NCCL communicators initialise lazily)."""
        if self._nccl is None:
            from torch._C._distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self._nccl = ProcessGroupNCCL(dist.PrefixStore("nccl/", self._store), self.rank(),
                                          self.size(), opts)
        return self._nccl

    def _delegate(self, tensors: Any):
        """gloo for CPU tensors; for CUDA tensors nccl, or gloo through host copies
        (PIPER_TORCH_CUDA_DELEGATE; the first tensor found in the arguments decides)."""
        t = _first_tensor(tensors)
        if not (t is not None and t.is_cuda):
            return self.gloo
        return _HostStaged(self.gloo) if self._cuda_delegate == "gloo" else self.nccl

    # -- Piper's collectives
    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor,
                      output_split_sizes: list[int], input_split_sizes: list[int],
                      opts: Any = None) -> dist.Work:
        from .functional import _single

        try:
            _single(self.piper_communicator, output, input, output_split_sizes,
                    input_split_sizes, "all_to_all_single")
        except (PiperTimeoutError, PiperPeerError) as e:
            raise _as_dist_error(e) from e
        return _done_work([output])

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> dist.Work:
        """What dist.all_to_all_single calls on the group: without it torch's C++ method would
        call alltoall_base and wrap its Work in one whose is_completed() never turns True."""
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist.Work:
        from .functional import _list

        try:
            _list(self.piper_communicator, output_tensors, input_tensors)
        except (PiperTimeoutError, PiperPeerError) as e:
            raise _as_dist_error(e) from e
        return _done_work(output_tensors)

    def shutdown(self) -> None:
        self.piper_communicator.close()
        self.gloo.shutdown()
        if self._nccl is not None:  # its watchdog and proxy threads must not outlive the group
            self._nccl.shutdown()

    def abort(self) -> None:
        self.piper_communicator.close()
        self.gloo.abort()
        if self._nccl is not None:
            self._nccl.abort()


def _map_tensors(value: Any, fn) -> Any:
    """value with every tensor t inside its lists and tuples replaced by fn(t)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor inside value's lists and tuples (depth first), or None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


class _HostStaged:
    """A delegate for CUDA tensors over gloo: each call copies its CUDA tensors to host
    tensors (synchronously, at the call) and runs gloo's method on those; the results reach
    the CUDA tensors when the Work completes (wait(), is_completed(), its future). Outputs are
    the tensors of the first argument in every delegated call (in-place ones included: all
    reduce, broadcast, recv), none for send. Two copies per tensor and host waits: the
    fallback where NCCL cannot serve the ranks. staged: which tensors to stage (CUDA tensors;
    a test passes another predicate to run this on CPU)."""

    def __init__(self, gloo: Any, staged=lambda t: t.is_cuda):
        self._gloo, self._staged = gloo, staged

    def __getattr__(self, name: str):
        method = getattr(self._gloo, name)

        def staged(*args, **kwargs):
            outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

            def to_host(t: torch.Tensor, keep: list | None) -> torch.Tensor:
                if not self._staged(t):
                    return t
                host = t.detach().to("cpu", copy=True)
                if keep is not None:
                    keep.append((t, host))
                return host

            first = outputs if name != "send" else None
            host_args = [_map_tensors(a, lambda t, k=(first if i == 0 else None): to_host(t, k))
                         for i, a in enumerate(args)]
            host_kwargs = {k: _map_tensors(v, lambda t: to_host(t, None))
                           for k, v in kwargs.items()}
            return _StagedWork(method(*host_args, **host_kwargs), outputs)

        return staged


class _StagedWork(dist.Work):
    """gloo's Work of a staged call, with the copy of its outputs back to their CUDA tensors
    once gloo completed: at wait() (with or without a timeout), at the first is_completed()
    that sees it done, or through get_future(). Returned as is by dist.isend/irecv and the
    async collectives; the rest of the Work API (source rank, exception) is gloo's."""

    def __init__(self, inner: dist.Work, outputs: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self._inner, self._outputs = inner, outputs

    def _copy_back(self) -> None:
        for dev, host in self._outputs:
            dev.detach().copy_(host)
        self._outputs = []

    def is_completed(self) -> bool:
        if not self._inner.is_completed():
            return False
        self._copy_back()
        return True

    def is_success(self) -> bool:
        return self._inner.is_success()

    def exception(self):
        return self._inner.exception()

    def source_rank(self) -> int:
        return self._inner.source_rank()

    def _source_rank(self) -> int:
        return self._inner._source_rank()

    def wait(self, timeout: timedelta | None = None) -> bool:
        if timeout is None:
            self._inner.wait()
        else:
            self._inner.wait(timeout)
        self._copy_back()
        return True

    def get_future(self) -> Future:
        devices = [dev for dev, _ in self._outputs]

        def done(fut: Future) -> list[torch.Tensor]:
            fut.value()  # raises gloo's error, if any
            self._copy_back()
            return devices

        return self._inner.get_future().then(done)


def _delegated(name: str, target: str | None = None):
    """A PiperProcessGroup method `name` that calls the delegate's `target` (default: name)
    with the same arguments; the first tensor among them picks the delegate."""

    def method(self, *args, **kwargs):
        return getattr(self._delegate((args, tuple(kwargs.values()))), target or name)(
            *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Delegated to gloo (CPU tensors) or nccl (CUDA tensors): {name}."
    return method


for _name in ("allreduce", "allreduce_coalesced", "broadcast", "allgather", "_allgather_base",
              "allgather_coalesced", "allgather_into_tensor_coalesced", "gather", "scatter",
              "reduce", "reduce_scatter", "_reduce_scatter_base",
              "reduce_scatter_tensor_coalesced", "send", "recv", "recv_anysource"):
    setattr(PiperProcessGroup, _name, _delegated(_name))
# the names torch >= 2.13 calls for dist.all_gather_into_tensor / reduce_scatter_tensor
PiperProcessGroup.all_gather_single = _delegated("all_gather_single", "_allgather_base")
PiperProcessGroup.reduce_scatter_single = _delegated("reduce_scatter_single",
                                                     "_reduce_scatter_base")


def _barrier(self, opts: Any = None) -> dist.Work:
    return self.gloo.barrier(opts) if opts is not None else self.gloo.barrier()


def _monitored_barrier(self, *args, **kwargs):
    return self.gloo.monitored_barrier(*args, **kwargs)


PiperProcessGroup.barrier = _barrier
PiperProcessGroup.monitored_barrier = _monitored_barrier


def create(opts: Any, backend_options: Any = None) -> PiperProcessGroup:
    """The creator registered with torch.distributed (extended API)."""
    return PiperProcessGroup(opts.store, opts.group_rank, opts.group_size, opts.timeout,
                             list(opts.global_ranks_in_group or []) or None)


def register() -> None:
    """Registers backend "piper" with torch.distributed (idempotent)."""
    if "PIPER" not in dist.Backend._plugins:
        dist.Backend.register_backend("piper", create, extended_api=True,
                                      devices=["cpu", "cuda"])
