"""Rank-side cases of the distributed tests (run through tests/launch.py).

Data is a pure function of (seed, call, source, destination): every rank builds what each
source sends it and compares bytes exactly (nccl-tests style), so no rank needs another's
reference. Each case loops over many sub-cases inside one launch and returns how many ran.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

import piper_comm as pc
from piper_comm import _C

NUMPY_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                "uint64", "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = ["bfloat16", "float16", "float32", "float64", "bool", "complex64", "complex128",
                "int8", "uint8", "int16", "int32", "int64", "float8_e4m3fn"]
TRAILING = [(), (3,), (2, 5)]
ALGOS = ["flat", "pairwise", "halo", "auto"]


# -- data
def _block(seed: int, call: int, src: int, dst: int, rows: int, row_bytes: int,
           is_bool: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, call, src, dst])
    b = rng.integers(0, 256, size=rows * row_bytes, dtype=np.uint8)
    return b & 1 if is_bool else b


def _make(kind: str, dtype: str, trailing: tuple, raw: np.ndarray):
    """An array of `dtype` and shape [rows, *trailing] whose bytes are `raw`."""
    if kind == "numpy":
        dt = np.dtype(dtype)
        return raw.view(dt).reshape(-1, *trailing).copy()
    import torch

    dt = getattr(torch, dtype)
    if raw.size == 0:  # torch cannot re-view an empty byte tensor with a larger element
        return torch.empty((0, *trailing), dtype=dt)
    return torch.from_numpy(raw.copy()).view(dt).reshape(-1, *trailing)


def _bytes(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    import torch

    return a.contiguous().reshape(-1).view(torch.uint8).numpy()


def _itemsize(kind: str, dtype: str) -> int:
    if kind == "numpy":
        return np.dtype(dtype).itemsize
    import torch

    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def count_patterns(P: int, seed: int) -> dict[str, np.ndarray]:
    """P x P row counts (row = source), identical on every rank."""
    rng = np.random.default_rng([seed, 7])
    rnd = rng.integers(0, 6, size=(P, P)) * (rng.random((P, P)) > 0.3)
    silent = rng.integers(1, 4, size=(P, P))
    silent[P // 2, :] = 0                      # one rank sends nothing
    hot = np.zeros((P, P), dtype=np.int64)
    hot[:, P - 1] = rng.integers(1, 9, size=P)  # one rank receives everything
    return {"random": rnd, "silent": silent, "hot": hot,
            "empty": np.zeros((P, P), dtype=np.int64),
            "equal": np.full((P, P), 2, dtype=np.int64)}


EQUAL_PATTERNS = ("empty", "equal")  # constant counts: exchanged through all_to_all too


def check_exchange(comm, C: np.ndarray, kind: str, dtype: str, trailing: tuple, algo: str,
                   seed: int, call: int, use_recv: bool, equal_split: bool = False) -> None:
    P, me = comm.size, comm.rank
    row_bytes = _itemsize(kind, dtype) * int(np.prod(trailing, dtype=np.int64))
    is_bool = dtype == "bool"
    raw = np.concatenate([_block(seed, call, me, j, int(C[me, j]), row_bytes, is_bool)
                          for j in range(P)])
    send = _make(kind, dtype, trailing, raw)
    expect = np.concatenate([_block(seed, call, i, me, int(C[i, me]), row_bytes, is_bool)
                             for i in range(P)])
    recv = None
    total = int(C[:, me].sum())
    if use_recv:  # a larger buffer with a canary tail that must survive
        recv = _make(kind, dtype, trailing, np.full((total + 2) * row_bytes, 0xA5, np.uint8))
    if equal_split:  # C is constant: the same bytes through all_to_all (in-band checks)
        out, counts = comm.all_to_all(send, recv=recv, algorithm=algo), list(C[:, me])
    else:
        out, counts = comm.all_to_all_v(send, list(C[me]), recv=recv,
                                        recv_counts=list(C[:, me]) if call % 2 else None,
                                        algorithm=algo)
    where = f"rank {me}: {kind} {dtype} {trailing} algo={algo} call={call}"
    assert counts == [int(c) for c in C[:, me]], f"{where}: recv counts {counts}"
    assert type(out) is type(send), where
    assert tuple(out.shape) == (total, *trailing), f"{where}: shape {tuple(out.shape)}"
    assert np.array_equal(_bytes(out), expect), f"{where}: payload differs"
    if use_recv:
        got = _bytes(recv)
        if total:
            assert np.shares_memory(_bytes(out), got), f"{where}: result is not a view of recv"
        assert np.all(got[total * row_bytes:] == 0xA5), f"{where}: wrote past the counts"
    expected_algo = algo if algo != "auto" else comm.last_algorithm
    if P == 1:
        expected_algo = "flat"
    assert comm.last_algorithm == expected_algo in ("flat", "pairwise", "halo"), where


def exactness(local_size: int | None = None, node_ids: list[int] | None = None,
              seed: int = 1, kinds: tuple = ("numpy", "torch"), full: bool = True,
              expect_transport: str | None = None) -> int:
    """Every count pattern x dtype x algorithm (x trailing shape, recv given or not).
    expect_transport: "cpp" (MPI called from C++) or "mpi4py" (through the Python transport)."""
    comm = pc.init(local_size=local_size, node_ids=node_ids)
    if expect_transport is not None:
        want = {"cpp": "mpi", "mpi4py": "python:mpi"}[expect_transport]
        assert comm.transport == want, (comm.transport, want, pc.build_info())
    P = comm.size
    patterns = count_patterns(P, seed)
    call = 0
    for kind in kinds:
        dtypes = NUMPY_DTYPES if kind == "numpy" else TORCH_DTYPES
        if not full:
            dtypes = dtypes[::3]
        for d, dtype in enumerate(dtypes):
            for a, algo in enumerate(ALGOS):
                for name, C in patterns.items():
                    call += 1
                    trailing = TRAILING[(d + a + len(name)) % len(TRAILING)]
                    check_exchange(comm, C, kind, dtype, trailing, algo, seed, call,
                                   use_recv=(call % 3 == 0),
                                   equal_split=name in EQUAL_PATTERNS)
    # Equal split through all_to_all, each algorithm.
    for algo in ALGOS:
        m = 3
        x = np.arange(P * m * 4, dtype=np.float32).reshape(P * m, 4) + 1000 * comm.rank
        y = comm.all_to_all(x, algorithm=algo)
        ref = np.concatenate([np.arange(P * m * 4, dtype=np.float32).reshape(P * m, 4)
                              [comm.rank * m:(comm.rank + 1) * m] + 1000 * i for i in range(P)])
        assert np.array_equal(y, ref), f"all_to_all {algo} rank {comm.rank}"
        call += 1
    comm.close()
    return call


def big_blocks(local_size: int, mib: int = 64, algos: tuple = ("halo", "flat", "pairwise"),
               seed: int = 3) -> int:
    """Blocks of `mib` MiB per rank in total (equal split and random split)."""
    comm = pc.init(local_size=local_size)
    P, me = comm.size, comm.rank
    rows = mib * (1 << 20) // 4
    m = (rows - rows % P) // P

    def sent_by(i: int) -> np.ndarray:  # what rank i sends, to every algorithm alike
        return np.random.default_rng([seed, i]).integers(-2**31, 2**31 - 1, size=rows,
                                                         dtype=np.int32)[: m * P]

    # Each rank's data is generated once (not once per algorithm and source rank): block i of
    # the result came from rank i, so this rank keeps its own part of rank i's data.
    send = sent_by(me)
    expect = [(send if i == me else sent_by(i))[me * m:(me + 1) * m].copy() for i in range(P)]
    n = 0
    for algo in algos:
        out = comm.all_to_all(send, algorithm=algo)
        for i in range(P):
            assert np.array_equal(out[i * m:(i + 1) * m], expect[i]), (algo, i)
        del out
        n += 1
    del send, expect
    # Random split of the same volume: counts from a shared seed.
    C = np.random.default_rng([seed, 99]).dirichlet(np.ones(P), size=P)
    C = np.floor(C * (rows // 2)).astype(np.int64)
    for algo in algos:
        check_exchange(comm, C, "numpy", "float32", (2,), algo, seed, 1000 + n, use_recv=False)
        n += 1
    comm.close()
    return n


def _expect_usage_error(comm, fn, must_contain: str) -> str:
    try:
        fn()
    except pc.PiperUsageError as e:
        msg = str(e)
        assert must_contain in msg, f"rank {comm.rank}: {must_contain!r} not in {msg!r}"
        return msg
    raise AssertionError(f"rank {comm.rank}: no PiperUsageError (expected {must_contain!r})")


class FakeCudaArray:
    """Exports __cuda_array_interface__ for host memory: what a CUDA array looks like to the
    argument checks, without a device. device: the device it claims under
    _C.emulate_cuda_arrays (the emulation reads "piper_emulated_device")."""

    def __init__(self, like: np.ndarray, device: int = 0, stream: int | None = None):
        self.__cuda_array_interface__ = {
            "shape": like.shape, "typestr": like.dtype.str, "strides": None, "version": 3,
            "data": (like.ctypes.data, False), "piper_emulated_device": device,
            "stream": stream}


def bad_input(local_size: int | None = None) -> dict:
    """Each bad call raises PiperUsageError on every rank, then a good call still works."""
    comm = pc.init(local_size=local_size)
    P, me = comm.size, comm.rank
    ok = np.arange(P * 2 * 3, dtype=np.float32).reshape(P * 2, 3)
    counts = [2] * P
    seen = {}
    gpu = pc.build_info().get("cuda_devices", 0) > 0

    def good():
        out, _ = comm.all_to_all_v(ok, counts)
        assert out.shape == (2 * P, 3)

    cases = {
        # counts do not sum to the array length (on rank 0 only)
        "sum": (lambda: comm.all_to_all_v(ok, [3 if me == 0 else 2] + [2] * (P - 1)),
                "send_counts sum to"),
        # rank 1 expects 3 rows from rank 0, which sends 2
        "mismatch": (lambda: comm.all_to_all_v(
            ok, counts, recv_counts=[3 if me == 1 else 2, *[2] * (P - 1)]),
            "count mismatch"),
        "noncontig": (lambda: comm.all_to_all_v(
            ok[:, :2] if me == P - 1 else ok[:, :2].copy(), counts), "not contiguous"),
        "recv_small": (lambda: comm.all_to_all_v(
            ok, counts, recv=np.empty((2 * P - (1 if me == 0 else 0), 3), np.float32)),
            "recv has"),
        "dtype": (lambda: comm.all_to_all_v(
            ok.astype(np.float64) if me == P - 1 else ok, counts), "disagree on dtype"),
        "negative": (lambda: comm.all_to_all_v(
            ok, [-1, 2 * P + 1] + [0] * (P - 2) if (me == 0 and P > 1) else counts),
            "negative"),
        "recv_dtype": (lambda: comm.all_to_all_v(ok, counts, recv=np.empty((2 * P, 3), np.int32)),
                       "dtype or trailing shape"),
        "not_array": (lambda: comm.all_to_all_v([1, 2] if me == 0 else ok, counts),
                      "a numpy array, a torch tensor or a CUDA array"),
        # A CUDA array where no device is (a GPU host finds its pointer is not device memory)
        "cuda_array": (lambda: comm.all_to_all_v(FakeCudaArray(ok) if me == 0 else ok, counts),
                       "device Piper does not move" if gpu else "a CUDA array was passed"),
        "mixed_memory": (lambda: comm.all_to_all_v(
            ok, counts, recv=FakeCudaArray(ok) if me == P - 1 else None),
            "device Piper does not move" if gpu else "in host (CPU) memory but recv in CUDA"),
        "rows_div": (lambda: comm.all_to_all(ok[: 2 * P - 1] if me == 0 else ok[: 2 * P]),
                     "not divisible"),
        "algorithm": (lambda: comm.all_to_all(ok, algorithm="bogus" if me == 0 else "auto"),
                      "unknown algorithm"),
        "counts_len": (lambda: comm.all_to_all_v(ok, [*counts, 0]), "entries"),
    }
    if P == 1:
        for k in ("mismatch", "negative", "dtype", "rows_div"):
            cases.pop(k)
    for name, (fn, text) in cases.items():
        seen[name] = _expect_usage_error(comm, fn, text)
        good()
    comm.close()
    return {"cases": len(seen)}


KEPT_OPEN: list = []  # communicators of ranks that skipped a collective, open until the exit


def skip_and_stay(comm) -> dict:
    """The rank that skips: it leaves the case with its communicator still open and stays in
    the job until every rank has written its result (tests/worker.py's hard_exit_after_all),
    then exits without finalising. The peers see a rank that is alive and never joins, as
    with a sleep past their deadline, and the job ends as soon as they have raised."""
    KEPT_OPEN.append(comm)
    return {"hard_exit": 0, "hard_exit_after_all": True}


def skip_collective(local_size: int | None = None, timeout: float = 3.0) -> dict:
    """The last rank skips a collective: every other rank raises PiperTimeoutError in time."""
    comm = pc.init(local_size=local_size, timeout=timeout)
    P, me = comm.size, comm.rank
    x = np.ones((P * 4, 2), dtype=np.float32)
    comm.all_to_all(x)
    if me == P - 1:
        return skip_and_stay(comm)
    t0 = time.monotonic()
    try:
        comm.all_to_all(x, algorithm=os.environ.get("CASE_ALGO", "auto"))
    except pc.PiperTimeoutError as e:
        took = time.monotonic() - t0
        msg = str(e)
        assert "all_to_all #2" in msg and f"rank {me}" in msg, msg
        assert took <= timeout + 5, f"raised after {took:.1f} s"
        # The communicator refuses further use instead of hanging.
        try:
            comm.all_to_all(x)
        except pc.PiperError as again:
            assert "unusable" in str(again)
        return {"hard_exit": 0, "hard_exit_after_all": True, "took": took}
    raise AssertionError(f"rank {me}: no PiperTimeoutError")


def kill_midway(local_size: int | None = None, timeout: float = 5.0) -> dict:
    """Rank 1 is SIGKILLed during a stream of collectives; survivors must raise in time."""
    comm = pc.init(local_size=local_size, timeout=timeout)
    P, me = comm.size, comm.rank
    x = np.ones((P * (1 << 16), 4), dtype=np.float32)
    algos = ["halo", "flat", "pairwise"]
    t_kill = float("inf")
    try:
        for i in range(100000):
            if i == 6:  # all ranks are in the loop: rank 1 dies 20 ms into a collective
                t_kill = time.monotonic() + 0.02
                if me == 1:
                    threading.Timer(0.02, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            comm.all_to_all(x, algorithm=algos[i % 3])
    except (pc.PiperPeerError, pc.PiperTimeoutError) as e:
        took = time.monotonic() - t_kill
        assert took <= timeout + 5, f"rank {me} raised {took:.1f} s after the kill: {e}"
        # Leave as an application would after an unhandled error: exit status 1, no MPI
        # finalisation. The job's non-zero status must not rest on the launcher noticing rank
        # 1's SIGKILL alone: when the others leave with 0 right after it, MPICH 5.0.2's hydra
        # returns 0 in about 1 job of 4 (seen in CI; 5 of 20 in a bare mpi4py reproduction).
        return {"hard_exit": 1, "took": took, "error": type(e).__name__, "msg": str(e)}
    raise AssertionError("the loop ended without an error")


def truncated_message(local_size: int | None = None, algo: str = "flat") -> dict:
    """PIPER_CHECK=0 and counts that disagree: rank 1 sends rank 0 one row more than rank 0
    expects. Rank 0's receive is truncated: it raises PiperUsageError naming the call, the
    sender and its buffer, instead of writing past the buffer."""
    comm = pc.init(local_size=local_size, timeout=5.0)
    P, me = comm.size, comm.rank
    send = np.full(P, 2)
    if me == 1:
        send[0] = 3
    recv_counts = np.full(P, 2)
    x = np.ones((int(send.sum()), 4), dtype=np.float32)
    try:
        comm.all_to_all_v(x, send, recv_counts=recv_counts, algorithm=algo)
    except pc.PiperUsageError as e:
        msg = str(e)
        assert me == 0 and "all_to_all_v #1" in msg and "from rank 1" in msg, msg
        assert "larger than its 32 B receive buffer" in msg, msg
        return {"hard_exit": 0, "hard_exit_after_all": True, "raised": True}
    except pc.PiperError as e:  # the other ranks may wait for rank 0, which left the call
        return {"hard_exit": 0, "hard_exit_after_all": True, "raised": type(e).__name__}
    return {"hard_exit": 0, "hard_exit_after_all": True, "raised": False}


def in_band_checks(local_size: int | None = None, algo: str = "flat") -> dict:
    """The equal split under the default checks: correct calls send no message beyond the data
    (no header round); each bad call (on one rank, or two ranks disagreeing) raises the same
    PiperUsageError on every rank, and a good call works afterwards."""
    comm = pc.init(local_size=local_size, timeout=20.0)
    P, me = comm.size, comm.rank
    ok = np.arange(P * 2 * 3, dtype=np.float32).reshape(P * 2, 3) + 100 * me

    def good():
        out = comm.all_to_all(ok, algorithm=algo)
        expect = np.concatenate([(np.arange(P * 2 * 3, dtype=np.float32).reshape(P * 2, 3)
                                  + 100 * src)[2 * me:2 * me + 2] for src in range(P)])
        assert np.array_equal(out, expect), f"rank {me}: payload differs after an error"

    before = dict(comm.check_counts)
    for _ in range(5):
        good()
    after = comm.check_counts
    # In-band: MPI from C++, default checks, an algorithm that messages every peer directly.
    in_band = (comm.transport == "mpi" and envs_check() == 1
               and (comm.last_algorithm != "halo" or comm.num_nodes == P))
    if in_band:
        assert after["header_rounds"] == before["header_rounds"], (before, after)
        assert after["in_band"] == before["in_band"] + 5, (before, after)
    last = P - 1
    cases = {
        "dtype": (lambda: comm.all_to_all(ok.astype(np.float64) if me == last else ok,
                                          algorithm=algo), "disagree on dtype"),
        "rows": (lambda: comm.all_to_all(np.concatenate([ok, ok]) if me == last else ok,
                                         algorithm=algo), "count mismatch"),
        "noncontig": (lambda: comm.all_to_all(ok[:, :2] if me == 0 else ok[:, :2].copy(),
                                              algorithm=algo), "not contiguous"),
        "all_noncontig": (lambda: comm.all_to_all(ok[:, :2], algorithm=algo), "not contiguous"),
        "recv_small": (lambda: comm.all_to_all(ok, recv=np.empty((2 * P - (me == last), 3),
                                                                 np.float32), algorithm=algo),
                       "recv has"),
        "op": (lambda: comm.all_to_all_v(ok, [2] * P, algorithm=algo) if me == 0 else
               comm.all_to_all(ok, algorithm=algo), "different collectives"),
        "trailing": (lambda: comm.all_to_all(ok.reshape(P * 2, 3, 1) if me == last else ok,
                                             algorithm=algo), "disagree on dtype or trailing"),
    }
    messages = {}
    for name, (fn, text) in cases.items():
        messages[name] = _expect_usage_error(comm, fn, text)
        good()
    if in_band:
        assert comm.check_counts["agreement_rounds"] >= len(cases), comm.check_counts
    comm.close()
    return {"messages": messages}


def environment_per_rank(env: list[dict]) -> str:
    """Rank r sets the variables of env[r] (value None: unset) and calls pc.init(): the error
    it raises, "type: message", or "ok" (the communicator then runs one all_to_all)."""
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    for name, value in env[rank].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        comm = pc.init()
    except pc.PiperError as e:
        return f"{type(e).__name__}: {e}"
    x = np.arange(comm.size, dtype=np.int64) + 10 * comm.rank
    assert (comm.all_to_all(x) == np.arange(comm.size) * 10 + comm.rank).all()
    comm.close()
    return "ok"


def auto_under_platforms(platforms: list[str], local_size: int) -> list[dict]:
    """For each platform file: PIPER_PLATFORM set to it (restored after), a communicator, one
    equal-split all_to_all and one all_to_all_v under algorithm="auto", both checked exactly;
    what auto ran and where the communicator's links came from."""
    out = []
    before = os.environ.get("PIPER_PLATFORM")
    try:
        for path in platforms:
            os.environ["PIPER_PLATFORM"] = path
            comm = pc.init(local_size=local_size)
            P, r = comm.size, comm.rank
            x = (np.arange(P * 4, dtype=np.int64) + 1000 * r).reshape(P * 4, 1)
            got = comm.all_to_all(x, algorithm="auto")
            want = np.concatenate([np.arange(4 * r, 4 * r + 4) + 1000 * s for s in range(P)])
            assert (got.reshape(-1) == want).all()
            equal = comm.last_algorithm
            counts = [(r + d) % 3 for d in range(P)]  # block r -> d has (r + d) % 3 rows
            xv = np.concatenate([np.full(c, 100 * r + d, np.int64) for d, c in enumerate(counts)])
            got_v, _ = comm.all_to_all_v(xv, counts, algorithm="auto")
            want_v = np.concatenate([np.full((s + r) % 3, 100 * s + r, np.int64)
                                     for s in range(P)])
            assert (got_v == want_v).all()
            out.append({"equal": equal, "v": comm.last_algorithm, "source": comm.links.source})
            comm.close()
    finally:
        if before is None:
            os.environ.pop("PIPER_PLATFORM", None)
        else:
            os.environ["PIPER_PLATFORM"] = before
    return out


def envs_check() -> int:
    from piper_comm import envs

    return envs.check()


def emulated_device(local_size: int | None = None) -> dict:
    """The device plane's plumbing on a host without a device (Executor.emulate_device_plane:
    CUDA-interface arrays are taken as device 0 memory the host addresses): the first CUDA
    call builds the plane collectively, every algorithm gives the host result, host calls in
    between still run on the host plane, a rank passing host memory while the others pass
    CUDA memory gets the same error everywhere, and close() releases the plane."""
    comm = pc.init(local_size=local_size)
    comm._executor.emulate_device_plane(comm._segment if comm.local_size > 1 else None)
    _C.emulate_cuda_arrays(True)
    try:
        return _emulated_device(comm)
    finally:
        _C.emulate_cuda_arrays(False)


def _emulated_device(comm) -> dict:
    P, me = comm.size, comm.rank
    rng = np.random.default_rng(5)
    assert comm.device is None and comm.device_transport is None
    # The first CUDA call fixes the device when it is issued: a call on another device right
    # behind an async first call (whose plane is still being built on the worker) is refused
    # on every rank, and the first call completes.
    a, b = np.ones((P * 2, 2), np.float32), np.zeros((P * 2, 2), np.float32)
    first = comm.all_to_all(FakeCudaArray(a), recv=FakeCudaArray(b), async_op=True)
    other = _expect_usage_error(comm, lambda: comm.all_to_all(
        FakeCudaArray(a, device=1), recv=FakeCudaArray(np.zeros_like(a), device=1)), "device")
    first.wait()
    assert np.array_equal(b, a) and comm.device == 0, other
    # a recv longer than what arrives that cannot be sliced comes back whole, filled in front
    long = np.full((P * 2 + 3, 2), -1, np.float32)
    got_long = FakeCudaArray(long)
    assert comm.all_to_all(FakeCudaArray(a), recv=got_long) is got_long
    assert np.array_equal(long[:P * 2], a) and (long[P * 2:] == -1).all()
    checked = 0
    for algo in ("halo", "flat", "pairwise", "auto"):
        for _ in range(2):
            S = rng.integers(0, 6, size=(P, P))
            S[:, P - 1] += 3 * (checked % 2)  # one rank receiving more
            x = np.random.default_rng(me + 10 * checked).standard_normal(
                (int(S[me].sum()), 3)).astype(np.float32)
            ref, rc = comm.all_to_all_v(x, S[me].tolist(), algorithm=algo)
            recv = np.full_like(ref, np.nan)
            given = FakeCudaArray(recv)
            out, rc2 = comm.all_to_all_v(FakeCudaArray(x), S[me].tolist(), recv=given,
                                         algorithm=algo)
            assert out is given and rc2 == rc
            assert np.array_equal(recv.view(np.uint32), ref.view(np.uint32))
            checked += 1
        eq = np.arange(P * 4 * 2, dtype=np.int64).reshape(P * 4, 2) + 1000 * me
        got = np.zeros_like(eq)
        comm.all_to_all(FakeCudaArray(eq), recv=FakeCudaArray(got), algorithm=algo)
        assert np.array_equal(got, comm.all_to_all(eq, algorithm=algo))
    assert comm.device == 0 and comm.device_transport == comm.transport
    # an array on the per-thread default stream (2): refused on every rank
    streamed = _expect_usage_error(comm, lambda: comm.all_to_all(
        FakeCudaArray(eq, stream=2 if me == 0 else None), recv=FakeCudaArray(got)),
        "per-thread default stream")
    assert "rank 0" in streamed, streamed
    words = ""
    if P > 1:
        words = _expect_usage_error(comm, lambda: comm.all_to_all(
            eq if me == P - 1 else FakeCudaArray(eq),
            recv=None if me == P - 1 else FakeCudaArray(got)), "different memory")
        words = words.split(": ", 2)[2]  # without "piper: all_to_all #n"
    comm.close()
    return {"checked": checked, "error": words}
