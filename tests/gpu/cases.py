"""Rank side of the multi-process GPU tests (tests/gpu/test_cuda_context.py), run under mpirun:
every rank of one node on the same CUDA device."""

import os

import numpy as np


def _node_channel():
    """(comm, rank, size, channel): every rank of the job on one node. Local rank 0 creates the
    channel, the others open it after it (the order NodeChannel needs)."""
    from mpi4py import MPI

    from piper_comm import _C

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    prefix = comm.bcast(f"/piper-gputest.{os.getpid()}" if rank == 0 else None)
    ranks = list(range(size))
    ch = _C.NodeChannel(prefix, 0, ranks, size, True) if rank == 0 else None
    comm.Barrier()
    if rank:
        ch = _C.NodeChannel(prefix, rank, ranks, size, False)
    comm.Barrier()
    if rank == 0:
        ch.unlink()
    return comm, rank, size, ch


def ipc_segment_round_trip(rows: int) -> str:
    import torch

    from piper_comm import _C

    _, rank, size, ch = _node_channel()
    torch.cuda.set_device(0)
    ctx = _C.CudaContext.create(ch, size, rank, 0, 60.0)
    ctx.stream = torch.cuda.current_stream().cuda_stream
    for step, nbytes in enumerate([rows * 16, rows * 16 * 9]):  # the second call grows it
        block = torch.full((nbytes,), (rank * 37 + step) % 251, dtype=torch.uint8, device="cuda")
        ctx.ensure_segment(size * nbytes, f"round trip {step}", 60.0)
        assert ctx.segment_bytes >= size * nbytes
        ctx.copy(block.data_ptr(), nbytes, ctx.segment_ptr, ctx.segment_bytes,
                 [0], [rank * nbytes], [nbytes])
        ctx.fence(f"round trip {step} (blocks packed)", 60.0)
        out = torch.empty(size * nbytes, dtype=torch.uint8, device="cuda")
        ctx.copy(ctx.segment_ptr, ctx.segment_bytes, out.data_ptr(), out.numel(),
                 [0], [0], [size * nbytes])
        torch.cuda.current_stream().synchronize()
        want = np.repeat([(r * 37 + step) % 251 for r in range(size)], nbytes).astype(np.uint8)
        np.testing.assert_array_equal(out.cpu().numpy(), want)
        ctx.fence(f"round trip {step} (segment read)", 60.0)
    ctx.close("round trip close", 60.0)
    ch.close()
    return "ok"


def pattern(src: int, dst: int, n: int) -> np.ndarray:
    return ((src * 31 + dst * 7 + np.arange(n)) & 0xFF).astype(np.uint8)


def halo_one_node_cuda(seed: int) -> int:
    """The real executor's HALO over the CUDA context on one node: three calls with uneven
    counts (zeros among them; the second grows the segment), each checked bitwise against the
    bytes every rank sent. Returns the number of calls checked."""
    import torch

    from piper_comm import _C

    comm, rank, size, ch = _node_channel()
    torch.cuda.set_device(0)
    ex = _C.CudaNodeExecutor(ch, size, rank, 0, 60.0)
    stream = torch.cuda.current_stream()
    rng = np.random.default_rng(seed)
    for call, scale in enumerate([1000, 300_000, 50]):
        S = rng.integers(0, scale, size=(size, size))
        S[rng.random((size, size)) < 0.25] = 0
        send = np.concatenate([pattern(rank, d, S[rank, d]) for d in range(size)])
        want = np.concatenate([pattern(s, rank, S[s, rank]) for s in range(size)])
        send_dev = torch.from_numpy(send).cuda()
        recv_dev = torch.full((want.size,), 0xEE, dtype=torch.uint8, device="cuda")
        ex.alltoallv(send_dev.data_ptr(), send.size, recv_dev.data_ptr(), want.size,
                     S[rank].tolist(), S[:, rank].tolist(), stream.cuda_stream, call + 1, 60.0)
        stream.synchronize()
        np.testing.assert_array_equal(recv_dev.cpu().numpy(), want)
    ex.close(60.0)
    comm.Barrier()
    ch.close()
    return 3
