"""Rank-side cases for the torch integration (run by tests/launch.py under mpirun/torchrun)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

import piper_comm.torch as pt

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]


# Each case sets up and destroys torch.distributed's default group. Under mpirun the cases of
# one rank count share a job (tests/batch.py), each with a group of its own (_setup); under
# torchrun a second group in the same process is not reliable (gloo), so there every case has
# its own job. Cases of this module share jobs with each other only: fill_from_mpi leaves
# torch's variables in the process's environment.
BATCH = "mpirun"

_FROM_MPI = False  # this process's torch variables were set by fill_from_mpi


def _setup(local_size: int | None = None):
    """Sets torch.distributed's default group up (backend "piper"), PIPER_LOCAL_SIZE set to
    local_size first when given (a case that shares a job with others gives it). The variables
    an earlier case's fill_from_mpi set in this process (RANK, MASTER_PORT, ...) are cleared
    first, so that every group has a rendezvous of its own, on a new port."""
    global _FROM_MPI
    if local_size is not None:
        os.environ["PIPER_LOCAL_SIZE"] = str(local_size)
    if not dist.is_initialized():
        if _FROM_MPI:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT"):
                os.environ.pop(key, None)
        _FROM_MPI = pt.fill_from_mpi()
        dist.init_process_group("piper")
    return dist.get_rank(), dist.get_world_size()


def _splits(rng, P, pattern):
    """Send split sizes of every rank, [P, P]; the same matrix on every rank."""
    if pattern == "random":
        m = rng.integers(0, 5, size=(P, P))
        m[rng.random((P, P)) < 0.3] = 0
    elif pattern == "to_one":  # every rank sends everything to rank P-1
        m = np.zeros((P, P), dtype=np.int64)
        m[:, P - 1] = rng.integers(1, 6, size=P)
    else:  # "none": equal split, split sizes passed as None
        m = np.full((P, P), 3)
    return m


def _random(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen).to(dtype)


def side_by_side(seed: int = 0, local_size: int | None = None) -> int:
    """dist.all_to_all_single and dist.all_to_all on the "piper" group vs a gloo group:
    bitwise equal for random split sizes (zeros, None, one receiver), every dtype."""
    rank, P = _setup(local_size)
    gloo = dist.new_group(backend="gloo")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    checked = 0
    for pattern in ("random", "to_one", "none"):
        for dtype in DTYPES:
            m = _splits(rng, P, pattern)
            send, recv = m[rank].tolist(), m[:, rank].tolist()
            for trailing in ((), (3,)):
                x = _random((sum(send), *trailing), dtype, gen)
                a = torch.full((sum(recv), *trailing), 7).to(dtype)
                b = torch.zeros_like(a)
                ss, rs = (None, None) if pattern == "none" else (send, recv)
                dist.all_to_all_single(a, x, rs, ss)
                dist.all_to_all_single(b, x, rs, ss, group=gloo)
                assert torch.equal(a, b), (pattern, dtype, trailing)
                w = dist.all_to_all_single(a, x, rs, ss, async_op=True)
                w.wait()
                assert w.is_completed() and torch.equal(a, b)
                checked += 1
            # list form: shapes differ per peer; compare with gloo's single on the same data
            ins = [_random((send[j], 2), dtype, gen) for j in range(P)]
            outs = [torch.empty((recv[i], 2), dtype=dtype) for i in range(P)]
            dist.all_to_all(outs, ins)
            ref = torch.empty((sum(recv), 2), dtype=dtype)
            dist.all_to_all_single(ref, torch.cat(ins), recv, send, group=gloo)
            assert torch.equal(torch.cat(outs), ref), (pattern, dtype, "list")
            checked += 1
    # Piper's own entry point on the default group gives the same bytes as well.
    m = _splits(rng, P, "random")
    x = torch.randn(int(m[rank].sum()), 4, generator=gen)
    a = torch.empty(int(m[:, rank].sum()), 4)
    b = torch.empty_like(a)
    pt.all_to_all_single(a, x, m[:, rank].tolist(), m[rank].tolist())
    dist.all_to_all_single(b, x, m[:, rank].tolist(), m[rank].tolist(), group=gloo)
    assert torch.equal(a, b)
    # every other collective is delegated and works
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == P * (P - 1) / 2
    g = [torch.zeros(1) for _ in range(P)]
    dist.all_gather(g, torch.tensor([float(rank)]))
    assert [v.item() for v in g] == list(range(P))
    t = torch.tensor([float(rank)])
    dist.broadcast(t, src=P - 1)
    assert t.item() == P - 1
    dist.barrier()
    assert dist.get_backend() == "piper"
    dist.destroy_process_group()
    return checked + 1


def gradcheck(seed: int = 0, local_size: int | None = None) -> int:
    """torch.autograd.gradcheck in float64 through AllToAll and all_to_all_single.

    Each rank checks f(x) = A2A^-1(w * A2A(x)): the rows come back to their owner, so this
    rank's output depends on this rank's input only and a per-rank gradcheck is exact. Every
    rank holds the same number of rows, so all ranks make the same number of calls."""
    rank, P = _setup(local_size)
    rng = np.random.default_rng(seed)
    m = np.zeros((P, P), dtype=np.int64)
    for r in range(P):  # 6 rows per rank, split randomly (zeros allowed)
        m[r] = np.bincount(rng.integers(0, P, size=6), minlength=P)
    send, recv = m[rank].tolist(), m[:, rank].tolist()
    w = torch.linspace(0.5, 1.5, sum(recv) * 2, dtype=torch.float64).reshape(-1, 2) + rank

    def via_function(x):
        y = pt.AllToAll.apply(x, send, recv, None)
        return pt.AllToAll.apply(y * w, recv, send, None)

    def via_single(x):
        y = pt.all_to_all_single(torch.empty(sum(recv), 2, dtype=x.dtype), x, recv, send)
        return pt.all_to_all_single(torch.empty_like(x), y * w, send, recv)

    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    ok = torch.autograd.gradcheck(via_function, (x,), check_batched_grad=False)
    ok &= torch.autograd.gradcheck(via_single, (x,), check_batched_grad=False)
    # exchanged recv splits (None) give the same result
    y1 = pt.AllToAll.apply(x, send, None, None)
    assert pt.AllToAll.last_recv == recv
    assert torch.equal(y1, pt.AllToAll.apply(x, send, recv, None))
    dist.destroy_process_group()
    return int(ok)


BAD_CASES = ("split_len", "split_sum", "mismatch", "output_rows", "dtype", "noncontig",
             "not_divisible", "list_len")


def bad_inputs(local_size: int | None = None) -> dict[str, str]:
    """Every bad call of BAD_CASES in turn; each must raise a RuntimeError on every rank, and
    the group must still work afterwards. Returns {case: error text}."""
    rank, P = _setup(local_size)
    x = torch.arange(4 * P, dtype=torch.float32).reshape(2 * P, 2)
    out = torch.empty_like(x)
    ss = [2] * P
    errors = {}
    for case in BAD_CASES:
        try:
            if case == "split_len":
                dist.all_to_all_single(out, x, [2] * P, [2] * (P + 1))
            elif case == "split_sum":
                dist.all_to_all_single(out, x, [2] * P, [3] * P if rank == 0 else ss)
            elif case == "mismatch":  # rank 0 expects one row too many from rank 1
                osz = [2] * P
                if rank == 0:
                    osz[1], osz[0] = 3, 1
                dist.all_to_all_single(out, x, osz, ss)
            elif case == "output_rows":
                dist.all_to_all_single(torch.empty(2 * P + (rank == 0), 2), x, None, None)
            elif case == "dtype":  # torch's wrapper checks dtypes itself; Piper's entry point
                pt.all_to_all_single(out.double() if rank == P - 1 else out, x)
            elif case == "noncontig":
                dist.all_to_all_single(out, x.t().contiguous().t() if rank == 0 else x)
            elif case == "not_divisible":
                dist.all_to_all_single(torch.empty(2 * P + 1, 2), torch.empty(2 * P + 1, 2))
            elif case == "list_len":
                dist.all_to_all([torch.empty(1)] * P, [torch.empty(1)] * (P + (rank == 1)))
            else:
                raise AssertionError(case)
        except RuntimeError as e:
            errors[case] = f"{type(e).__name__}: {e}"
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)  # still usable, and the calls are still in step
        assert torch.equal(y.reshape(P, 2, 2)[rank], x.reshape(P, 2, 2)[rank])
    dist.destroy_process_group()
    return errors


def local_torch_check() -> str:
    """torch's Python wrapper raises ValueError on the one rank with mixed dtypes before the
    backend is reached; the others must not hang: they raise a DistBackendError (timeout)."""
    rank, P = _setup()
    x = torch.zeros(2 * P, 2)
    try:
        dist.all_to_all_single(x.double() if rank == P - 1 else torch.empty_like(x), x)
    except (ValueError, dist.DistBackendError) as e:
        return type(e).__name__
    raise AssertionError("no error")


def host_staged() -> dict:
    """The host-staged delegate (CUDA tensors over gloo where NCCL cannot serve the ranks),
    with every tensor treated as a device tensor so that it runs on CPU: a ring of
    isend/irecv waited with a timeout; an all_reduce whose result reaches the caller's tensor
    only when the Work completes; an all_gather polled with is_completed() whose input,
    changed after the call, is not written back; a future; a receive from any source. And
    dist.all_gather_into_tensor / reduce_scatter_tensor on the "piper" group itself."""
    import time
    from datetime import timedelta

    from piper_comm.torch.backend import _HostStaged

    rank, P = _setup()
    staged = _HostStaged(dist.new_group(backend="gloo"), staged=lambda t: True)
    mine = torch.full((5,), float(rank + 1))
    got = torch.zeros(5)
    send = staged.send([mine], (rank + 1) % P, 7)
    recv = staged.recv([got], (rank - 1) % P, 7)
    assert recv.wait(timedelta(seconds=30)) and send.wait(timedelta(seconds=30))
    assert torch.equal(got, torch.full((5,), float((rank - 1) % P + 1))), got
    assert torch.equal(mine, torch.full((5,), float(rank + 1))), "the send buffer changed"
    x = torch.full((3,), float(rank + 1))
    work = staged.allreduce([x])
    before = x.clone()
    work.wait()
    assert torch.equal(before, torch.full((3,), float(rank + 1))), "staged before wait()"
    assert torch.equal(x, torch.full((3,), float(P * (P + 1) // 2))), x
    assert work.is_completed()
    inp, outs = torch.full((2,), float(rank)), [torch.zeros(2) for _ in range(P)]
    work = staged.allgather([outs], [inp])
    inp.fill_(-1.0)
    deadline = time.monotonic() + 30
    while not work.is_completed():
        assert time.monotonic() < deadline, "is_completed() never turned True"
        time.sleep(0.001)
    assert all(torch.equal(outs[r], torch.full((2,), float(r))) for r in range(P)), outs
    assert torch.equal(inp, torch.full((2,), -1.0)), "an input was written back"
    y = torch.ones(3)
    assert staged.allreduce([y]).get_future().wait()[0] is y
    assert torch.equal(y, torch.full((3,), float(P))), y
    source = None
    if rank == 0:
        buf = torch.zeros(1)
        w = staged.recv_anysource([buf], 9)
        w.wait()
        source = w._source_rank()
        assert buf.item() == float(source)
    elif rank == 1:
        staged.send([torch.ones(1)], 0, 9).wait()
    # the group's own all_gather_into_tensor / reduce_scatter_tensor (delegated to gloo)
    out = torch.zeros(2 * P)
    dist.all_gather_into_tensor(out, torch.full((2,), float(rank)))
    assert torch.equal(out, torch.arange(P, dtype=torch.float32).repeat_interleave(2)), out
    part = torch.zeros(2)
    dist.reduce_scatter_tensor(part, torch.ones(2 * P))
    assert torch.equal(part, torch.full((2,), float(P))), part
    dist.destroy_process_group()
    return {"received": got[0].item(), "source": source}


def cuda_delegate_disagreement(values: list, subgroup: list | None = None) -> str:
    """Rank r sets PIPER_TORCH_CUDA_DELEGATE to values[r] (None: unset) and creates the
    "piper" group (the default group; with ``subgroup``, a default "gloo" group and then
    new_group(subgroup, backend="piper"), whose transport is gloo's, not MPI_COMM_WORLD):
    the error every rank raises, "type: message" (or "ok"; "not a member" outside it)."""
    global _FROM_MPI
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    if values[rank] is None:
        os.environ.pop("PIPER_TORCH_CUDA_DELEGATE", None)
    else:
        os.environ["PIPER_TORCH_CUDA_DELEGATE"] = values[rank]
    try:
        if subgroup is None:
            _setup()
        else:
            _FROM_MPI = pt.fill_from_mpi()
            dist.init_process_group("gloo")
            dist.new_group(subgroup, backend="piper")
    except Exception as e:  # noqa: BLE001 (the error is the result)
        return f"{type(e).__name__}: {e}"
    finally:
        if subgroup is not None:
            dist.destroy_process_group()
    if subgroup is None:
        dist.destroy_process_group()
    return "ok" if subgroup is None or rank in subgroup else "not a member"
