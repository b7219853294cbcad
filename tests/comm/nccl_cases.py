"""Piper's NCCL transport without a GPU (run by tests/comm/test_nccl_mock.py).

The device plane of emulated CUDA arrays (Executor.emulate_device_plane, _C.emulate_cuda_arrays:
CUDA-interface arrays over host memory) with its messages through csrc/cuda/nccl_transport.cpp
on a mock NCCL that moves host bytes over MPI (tests/comm/mock_nccl.c): the set-up round with
rank 0's unique id, the non-blocking communicator's join, one NCCL group per batch, close
through ncclCommFinalize, and the errors and deadlines when a rank fails or never joins.
"""

from __future__ import annotations

import os

import numpy as np

import piper_comm as pc
from piper_comm import _C

from .cases import NUMPY_DTYPES, FakeCudaArray

# The mock NCCL stays loaded in the process (Piper loads NCCL once): these cases share jobs only
# with each other.
BATCH = "mpirun"


def _comm_over_mock(local_size: int | None, library: str, fail: str = ""):
    os.environ["PIPER_MOCK_NCCL_FAIL"] = fail  # read by the mock when a communicator is made
    comm = pc.init(local_size=local_size)
    comm._executor.emulate_device_plane(comm._segment if comm.local_size > 1 else None,
                                        nccl_library=library)
    return comm


def _counts(rng: np.random.Generator, P: int, shape: str) -> np.ndarray:
    """A P x P send-count matrix: random with zeros, one rank receiving everything, or none."""
    if shape == "random":
        S = rng.integers(0, 5, size=(P, P))
        S[rng.random((P, P)) < 0.3] = 0
        return S
    S = np.zeros((P, P), np.int64)
    if shape == "one_receiver":
        S[:, rng.integers(P)] = rng.integers(1, 7, size=P)
    return S


def exact(local_size: int | None, library: str) -> dict:
    """Every algorithm on every dtype through the NCCL transport equals the host result bit
    for bit (random counts with zeros, one rank receiving everything, nothing at all); async
    calls in flight together; then close() finalizes the NCCL communicator."""
    comm = _comm_over_mock(local_size, library)
    P, me = comm.size, comm.rank
    _C.emulate_cuda_arrays(True)
    try:
        checked = 0
        for algo in ("halo", "flat", "pairwise", "auto"):
            for d, dtype in enumerate(NUMPY_DTYPES):
                rng = np.random.default_rng(1000 * d + len(algo))  # the same on every rank
                S = _counts(rng, P, ("random", "one_receiver", "none")[d % 3])
                mine = np.random.default_rng(me + 97 * d).integers(
                    0, 256, size=(int(S[me].sum()) * 3 * np.dtype(dtype).itemsize,), dtype=np.uint8)
                x = mine.view(dtype).reshape(-1, 3) if dtype != "bool" else \
                    (mine & 1).astype(bool).reshape(-1, 3)
                ref, rc = comm.all_to_all_v(x, S[me].tolist(), algorithm=algo)
                recv = np.zeros_like(ref)
                given = FakeCudaArray(recv)
                out, rc2 = comm.all_to_all_v(FakeCudaArray(x), S[me].tolist(), recv=given,
                                             algorithm=algo)
                assert out is given and list(rc2) == list(rc), (algo, dtype, rc, rc2)
                assert recv.tobytes() == ref.tobytes(), (algo, dtype, S.tolist())
                checked += 1
        # equal split, several calls in flight at once on the device plane
        xs = [np.arange(P * 4 * 2, dtype=np.int64).reshape(P * 4, 2) + 1000 * me + 10 ** 6 * i
              for i in range(3)]
        outs = [np.zeros_like(x) for x in xs]
        works = [comm.all_to_all(FakeCudaArray(x), recv=FakeCudaArray(o), algorithm=a,
                                 async_op=True)
                 for x, o, a in zip(xs, outs, ("halo", "flat", "pairwise"))]
        for w in works:
            w.wait()
        for x, o in zip(xs, outs):
            assert np.array_equal(o, comm.all_to_all(x)), (x, o)
            checked += 1
        transport = comm.device_transport
    finally:
        _C.emulate_cuda_arrays(False)
    comm.close()
    return {"checked": checked, "transport": transport}


def failure(local_size: int | None, library: str, fail: str, algo: str) -> dict:
    """Calls until one raises (the mock fails as `fail` says): the exception's type and words.
    Every rank leaves without MPI finalisation (the launch expects that: expect_ok=False)."""
    comm = _comm_over_mock(local_size, library, fail)
    P, me = comm.size, comm.rank
    x = np.arange(P * 2, dtype=np.float32) + 100 * me
    calls = 0
    _C.emulate_cuda_arrays(True)
    try:
        while calls < 4:
            calls += 1
            comm.all_to_all(FakeCudaArray(x), recv=FakeCudaArray(np.zeros_like(x)),
                            algorithm=algo)
    except pc.PiperError as e:
        out = {"type": type(e).__name__, "message": str(e), "calls": calls}
    else:
        out = {"type": None, "message": "", "calls": calls}
    finally:
        _C.emulate_cuda_arrays(False)
    # MPI holds the failed group's unmatched messages (MPI_Finalize would wait on them):
    # every rank leaves without it once all have reported (tests/worker.py)
    return {**out, "hard_exit": 0, "hard_exit_after_all": True}


def nccl_missing_on_one_rank(local_size: int | None, library: str) -> dict:
    """PIPER_INTER=nccl where rank 1 cannot load NCCL (a path that does not exist): the first
    CUDA call raises the same PiperUsageError on every rank, naming rank 1, at once (no rank
    waits for a timeout)."""
    comm = pc.init(local_size=local_size)
    lib = "/nonexistent/libnccl.so.2" if comm.rank == 1 else library
    comm._executor.emulate_device_plane(comm._segment if comm.local_size > 1 else None,
                                        nccl_library=lib)
    x = np.arange(comm.size * 2, dtype=np.float32)
    _C.emulate_cuda_arrays(True)
    try:
        comm.all_to_all(FakeCudaArray(x), recv=FakeCudaArray(np.zeros_like(x)))
    except pc.PiperUsageError as e:
        return {"message": str(e)}
    finally:
        _C.emulate_cuda_arrays(False)
    return {"message": ""}
