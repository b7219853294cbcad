"""The words of every cross-rank check: what the C++ core (csrc/runtime/agree.cpp) found,
turned into one PiperUsageError that every rank raises.

Each rank's header (csrc/runtime/header.hpp: call number, operation, algorithm asked for,
dtype, row shape, local error, counts) reaches every rank, in a header round before the data
or, after an in-band check found a mismatch, in an agreement round. From the gathered P x W
table every rank reaches the same verdict by the same deterministic checks, so bad input
raises the same message on every rank.

Cost of a header round: 2 (P - 1) messages of 8 (10 + 2P) bytes per rank. The default
(PIPER_CHECK=1) pays it only where the signature cannot travel with the data (see
csrc/runtime/call.hpp, CheckMode); all_to_all_v without recv_counts needs it anyway, for the
counts.
"""

from __future__ import annotations

import numpy as np

from . import _C, envs
from . import arrays as A
from .errors import PiperUsageError
from .transport import Pending, Transport

# Header fields (then send_counts[P], recv_counts[P]; counts in rows, -1 = not given): the
# layout is csrc/runtime/header.hpp's.
_F = _C.HEADER_FIELDS
SEQ, OP, ALGO, DTYPE, ROW_BYTES, TRAIL, MEM = (_F[k] for k in ("SEQ", "OP", "ALGO", "DTYPE",
                                                                "ROW_BYTES", "TRAIL", "MEM"))
MEMORY_NAMES = {0: "host (CPU) memory", 1: "CUDA device memory"}
ERR, ERR_A, ERR_B, RECV_CAP, NFIXED = (_F[k] for k in ("ERR", "ERR_A", "ERR_B", "RECV_CAP",
                                                        "NFIXED"))
OPS = {1: "all_to_all", 2: "all_to_all_v"}
ALGO_IDS = {name: i for i, name in enumerate(envs.ALGORITHMS)}  # auto 0, halo 1, flat 2, pairwise 3
ALGO_NAMES = {v: k for k, v in ALGO_IDS.items()}


def exchange(transport: Transport, mine: np.ndarray, tag: int, what: str, deadline: float,
             timeout: float) -> np.ndarray:
    """All-gather of the headers: P x W int64, row r = rank r's header."""
    P, me = transport.size, transport.rank
    table = np.empty((P, mine.size), dtype=np.int64)
    table[me] = mine
    raw = mine.view(np.uint8)
    pending = []
    for k in range(1, P):
        src, dst = (me - k) % P, (me + k) % P
        pending.append(Pending(transport.irecv(table[src].view(np.uint8), src, tag), "recv", src,
                               raw.nbytes))
        pending.append(Pending(transport.isend(raw, dst, tag), "send", dst, raw.nbytes))
    transport.wait_all(pending, f"{what} (metadata exchange)", deadline, timeout)
    return table


def raise_local(what: str, rank: int, code: int, a: int, b: int) -> None:
    """Raises this rank's own local error (PIPER_CHECK=0: the other ranks are not told)."""
    raise PiperUsageError(f"piper: {what}: rank {rank}: {_local_message(code, a, b)}")


def _local_message(code: int, a: int, b: int) -> str:
    arg = "recv" if a == 1 else "send"
    return {
        A.E_TYPE: f"{arg} must be a numpy array, a torch tensor or a CUDA array "
                  "(__cuda_array_interface__: CuPy, Numba)",
        A.E_NONCONTIG: "send is not contiguous (call .contiguous() / np.ascontiguousarray)",
        A.E_DEVICE: f"{arg} lives on a device Piper does not move (CPU and CUDA only)",
        A.E_NDIM: f"{arg} must have at least one dimension (rows are split along dim 0)",
        A.E_RECV_TYPE: "recv must be the same kind of array as send (numpy or torch)",
        A.E_RECV_NONCONTIG: "recv is not contiguous",
        A.E_RECV_DTYPE: "recv's dtype or trailing shape differs from send's",
        A.E_COUNTS_LEN: f"send_counts has {a} entries, expected one per rank",
        A.E_COUNTS_NEG: f"send_counts[{a}] = {b} is negative",
        A.E_COUNTS_SUM: f"send_counts sum to {a} rows but send has {b} rows",
        A.E_ROWS_DIV: f"send has {a} rows, not divisible by the {b} ranks",
        A.E_RCOUNTS_LEN: f"recv_counts has {a} entries, expected one per rank",
        A.E_RCOUNTS_NEG: f"recv_counts[{a}] = {b} is negative",
        A.E_ALGORITHM: "unknown algorithm (expected auto, halo, flat or pairwise)",
        A.E_COUNTS_TYPE: f"{'recv_counts' if a == 1 else 'send_counts'} must be a 1-D sequence "
                         "of integers",
        A.E_RECV_ROWS: f"output has {a} rows but the split sizes add up to {b} rows",
        A.E_MIXED_MEMORY: f"send is in {MEMORY_NAMES.get(a, a)} but recv in "
                          f"{MEMORY_NAMES.get(b, b)}: pass both on the same device",
        A.E_OTHER_DEVICE: f"an array is on CUDA device {a}, but this call's send or this "
                          f"rank's earlier calls use device {b} (one device per rank: send, "
                          "recv and every call on the same one)",
        A.E_NO_CUDA: "a CUDA array was passed, but " + (
            "piper_comm._C was built without CUDA (rebuild where nvcc is found)" if a == 0
            else "this process sees no CUDA device"),
        A.E_STREAM: f"{arg} is a CUDA array on the per-thread default stream (its "
                    "__cuda_array_interface__ stream is 2), which is another stream on each "
                    "thread, and Piper's work runs on other threads too: pass an explicit "
                    "stream or the legacy default (1)",
    }.get(code, f"error {code}")


_AGREE = [SEQ, OP, ALGO, DTYPE, ROW_BYTES, TRAIL, MEM]  # columns every rank must share


def verdict(table: np.ndarray, what: str) -> np.ndarray:
    """Checks the gathered headers; returns the P x P send-count matrix (rows) or raises the
    same PiperUsageError on every rank."""
    S = _C.agree(table)  # every check at once, in C++; None names a problem, found below
    if S is not None:
        return S
    P = table.shape[0]

    def fail(msg: str):
        raise PiperUsageError(f"piper: {what}: {msg} (raised on every rank)")

    # 1-3. The fixed columns agree and no rank reported a local error.
    fixed = table[:, _AGREE]
    if (fixed != fixed[0]).any() or (table[:, ERR] != A.E_NONE).any():
        _mismatch(table, fail)
    # 4. What i sends to j is what j expects from i.
    sends = table[:, NFIXED:NFIXED + P]
    recvs = table[:, NFIXED + P:]
    given = recvs[:, 0] >= 0
    if np.any(given):
        mism = (recvs != sends.T) & given[:, None]  # [j, i]: j expects recvs[j, i] from i
        if np.any(mism):
            j, i = (int(x) for x in np.argwhere(mism)[0])
            fail(f"count mismatch: rank {i} sends {int(sends[i, j])} rows to rank {j}, "
                 f"but rank {j} expects {int(recvs[j, i])} rows from rank {i}")
    # 5. recv buffers large enough.
    need = sends.sum(axis=0)
    cap = table[:, RECV_CAP]
    small = np.nonzero((cap >= 0) & (cap < need))[0]
    if small.size:
        j = int(small[0])
        fail(f"rank {j}: recv has {int(cap[j])} rows but {int(need[j])} rows arrive "
             f"({int(need[j]) * int(table[0, ROW_BYTES])} B)")
    raise AssertionError(f"piper internal error: {what}: the C++ verdict refused headers that "
                         f"pass every check here")


def _mismatch(table: np.ndarray, fail) -> None:
    """Checks 1-3 of verdict, in order, naming the first disagreeing rank (slow path)."""
    # 1. Every rank must be in the same call.
    for col, name in ((SEQ, "call number"), (OP, "operation")):
        if np.any(table[:, col] != table[0, col]):
            r = int(np.argmax(table[:, col] != table[0, col]))
            a, b = int(table[0, col]), int(table[r, col])
            if col == OP:
                a, b = OPS.get(a, a), OPS.get(b, b)
            fail(f"ranks are in different collectives: rank 0 is at {name} {a}, rank {r} at {b}")
    # 2. Local errors, first rank first.
    bad = np.nonzero(table[:, ERR] != A.E_NONE)[0]
    if bad.size:
        r = int(bad[0])
        fail(f"rank {r}: " + _local_message(*(int(x) for x in table[r, ERR:ERR_B + 1])))
    # 3. Same memory kind, algorithm request, dtype and row shape everywhere.
    if np.any(table[:, MEM] != table[0, MEM]):
        r = int(np.argmax(table[:, MEM] != table[0, MEM]))
        fail(f"ranks pass arrays in different memory: rank 0 in "
             f"{MEMORY_NAMES.get(int(table[0, MEM]))}, rank {r} in "
             f"{MEMORY_NAMES.get(int(table[r, MEM]))}")
    if np.any(table[:, ALGO] != table[0, ALGO]):
        r = int(np.argmax(table[:, ALGO] != table[0, ALGO]))
        fail(f"ranks asked for different algorithms: rank 0 "
             f"{ALGO_NAMES[int(table[0, ALGO])]!r}, rank {r} {ALGO_NAMES[int(table[r, ALGO])]!r}")
    for col in (DTYPE, ROW_BYTES, TRAIL):
        if np.any(table[:, col] != table[0, col]):
            r = int(np.argmax(table[:, col] != table[0, col]))

            def desc(i: int) -> str:
                dt = int(table[i, DTYPE])
                name = A.DTYPE_NAMES[dt - 1] if 0 < dt <= len(A.DTYPE_NAMES) else "unknown"
                return f"{name} with {int(table[i, ROW_BYTES])} B rows"

            fail(f"ranks disagree on dtype or trailing shape: rank 0 has {desc(0)}, "
                 f"rank {r} has {desc(r)}")
