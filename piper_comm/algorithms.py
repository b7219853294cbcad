"""Execution of the all-to-all(v) schedules planned in csrc/plan.

The C++ plan says which bytes go where; these functions post the messages on the transport
(zero-copy: numpy views of the caller's buffers and of the node segment) and run the local
copies in C++ with the GIL released. Sizes are in bytes.
"""

from __future__ import annotations

import time

import numpy as np

from . import _C
from .transport import Pending, Transport


def _post(transport: Transport, msgs, buf: np.ndarray, kind: str, tag: int) -> list[Pending]:
    post = transport.isend if kind == "send" else transport.irecv
    return [Pending(post(buf[o:o + n], p, tag), kind, p, n)
            for p, o, n in zip(msgs.peer, msgs.off, msgs.len, strict=False)]


def flat(transport: Transport, send: np.ndarray, recv: np.ndarray, send_bytes: np.ndarray,
         recv_bytes: np.ndarray, *, pairwise: bool, tag: int, what: str, deadline: float,
         timeout: float) -> None:
    """Direct exchange: every block from `send` straight into `recv` (uint8 views).

    flat posts all P-1 receives and sends at once; pairwise runs P-1 steps, step k sending to
    rank+k and receiving from rank-k, so at most two messages per rank are in flight.
    """
    plan = _C.plan_flat(transport.rank, send_bytes, recv_bytes)
    _C.copy_blocks(send.ctypes.data, send.nbytes, recv.ctypes.data, recv.nbytes, plan.self_copy)
    sends, recvs = plan.sends, plan.recvs
    if not pairwise:
        pending = _post(transport, recvs, recv, "recv", tag)
        pending += _post(transport, sends, send, "send", tag)
        transport.wait_all(pending, f"{what} (flat exchange)", deadline, timeout)
        return
    P, me = transport.size, transport.rank
    send_at = {p: (o, n) for p, o, n in zip(sends.peer, sends.off, sends.len, strict=False)}
    recv_at = {p: (o, n) for p, o, n in zip(recvs.peer, recvs.off, recvs.len, strict=False)}
    for k in range(1, P):
        pending = []
        src, dst = (me - k) % P, (me + k) % P
        if src in recv_at:
            o, n = recv_at[src]
            pending.append(Pending(transport.irecv(recv[o:o + n], src, tag), "recv", src, n))
        if dst in send_at:
            o, n = send_at[dst]
            pending.append(Pending(transport.isend(send[o:o + n], dst, tag), "send", dst, n))
        transport.wait_all(pending, f"{what} (pairwise step {k})", deadline, timeout)


class HaloState:
    """What HALO keeps between calls: the node segment and a private staging buffer."""

    def __init__(self, segment, topology):
        self.segment, self.topology = segment, topology
        self.staging = np.empty(0, dtype=np.uint8)
        self._view: np.ndarray | None = None

    def segment_array(self, replaced: bool) -> np.ndarray:
        if replaced or self._view is None or self._view.size != self.segment.data_bytes:
            self._view = np.frombuffer(self.segment.data_view(), dtype=np.uint8)
        return self._view

    def staging_array(self, nbytes: int) -> np.ndarray:
        if self.staging.size < nbytes:
            self.staging = np.empty(max(nbytes, 2 * self.staging.size), dtype=np.uint8)
        return self.staging


def halo(state: HaloState, transport: Transport, send: np.ndarray, recv: np.ndarray,
         send_bytes: np.ndarray, recv_bytes: np.ndarray, *, seq: int, tag: int, what: str,
         deadline: float, timeout: float) -> _C.HaloPlan:
    """Hierarchical exchange (see csrc/plan/schedule.hpp, plan_halo):

    1. the ranks of a node share their counts and pack their blocks into the node segment;
    2. proxies send one aggregated message per (node, destination) straight from the segment;
    3. every rank copies the blocks of its own node out of the segment and receives the rest
       in place (or through staging when a source node's ranks are not a contiguous range).
    """
    seg, P, me = state.segment, transport.size, transport.rank

    def left() -> float:
        return max(deadline - time.monotonic(), 0.0)

    seg.publish_row(seq, send_bytes)
    seg.barrier(f"{what} (halo: counts shared)", left())
    node_bytes = seg.read_rows(seq, P)
    plan = _C.plan_halo(state.topology, me, node_bytes.reshape(-1), recv_bytes)
    replaced = seg.ensure_data(plan.segment_bytes, what, left())
    _C.copy_blocks(send.ctypes.data, send.nbytes, seg.data_address, seg.data_bytes, plan.pack)

    staging = state.staging_array(plan.staging_bytes)
    pending = []
    for p, o, n, staged in zip(plan.recvs.peer, plan.recvs.off, plan.recvs.len,
                               plan.recv_staged, strict=False):
        buf = staging if staged else recv
        pending.append(Pending(transport.irecv(buf[o:o + n], p, tag), "recv", p, n))
    seg.barrier(f"{what} (halo: blocks packed)", left())
    pending += _post(transport, plan.sends, state.segment_array(replaced), "send", tag)
    _C.copy_blocks(seg.data_address, seg.data_bytes, recv.ctypes.data, recv.nbytes, plan.local)
    transport.wait_all(pending, f"{what} (halo inter-node stage)", deadline, timeout)
    if len(plan.unpack):
        _C.copy_blocks(staging.ctypes.data, staging.nbytes, recv.ctypes.data, recv.nbytes,
                       plan.unpack)
    return plan
