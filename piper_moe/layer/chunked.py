"""Chunked (MPipeMoE-style) pipelining of one MoE layer: dispatch, experts, combine.

MoELayer(..., pipeline_chunks=C) with C > 1 splits this rank's tokens into C chunks by token
index (sizes differing by at most one; chunks may be empty) and overlaps communication with
expert compute:

    1. the [EP, C, E_local] count matrix of all chunks is exchanged once (synchronous), with
       one extra column: this rank's chunk_memory wish;
    2. the dispatch all-to-all-v of every chunk is issued asynchronously, up front;
    3. for each chunk: wait its dispatch, run the experts on its rows (later chunks' dispatches
       are in flight meanwhile), issue its combine asynchronously;
    4. wait the combines; the weighted sum runs once over all (token, choice) pairs.

Autograd. The pipeline above runs outside autograd (the experts under no_grad). The graph is
then rebuilt from the already-computed tensors with three small Functions, one per stage of
the unchunked path, whose forward returns the stored tensor:

    _Dispatched  gathered rows -> rows in the unchunked expert order; backward: the reverse
                 all-to-all-v of each chunk's gradient (all C issued async, then waited);
    _Experts     rows -> expert outputs; backward recomputes the experts on ALL rows at once,
                 in the unchunked order, and differentiates that (activation checkpointing);
                 the rows themselves are kept, offloaded to host or re-dispatched in backward
                 by the chunk_memory strategy (layer/chunk_memory.py);
    _Combined    expert outputs -> returned rows; backward: reverse all-to-all-v per chunk.

Why the recompute: a chunked expert backward would sum each weight gradient over C partial
GEMMs, a different rounding than the unchunked single GEMM; differentiating the whole group
at once gives gradients bitwise equal to C = 1. The forward is equal too where a GEMM row's
result does not depend on the number of rows (float64 on CPU here; see tests/moe). The costs:
one extra expert forward in backward, and, in exchange, no expert intermediates (the SwiGLU
activations, [rows, ffn_hidden] each) saved for backward, only the expert input rows.

Buffers. The receive buffers of all dispatches ([sum of recv rows, hidden]), the combine send
buffer and the combine receive buffer are allocated once per forward (every chunk's dispatch
is in flight at the same time, so each chunk owns a row range); the per-chunk expert input is
regrouped into one scratch buffer of the largest chunk, reused by every chunk. What survives
the forward for backward is chunk_memory's choice (layer/chunk_memory.py: "save" the expert
input rows [R, H], "offload" them to host, or "recompute" them by a second dispatch in
backward; "auto" picks per forward from the free memory, the same choice on every rank via the
count exchange below), reported as layer.stats["chunk_memory"].

"auto" (ChunkSchedule): the first forwards try C in (1, 2, 4), `trials` times each; a
candidate's time is the interval from its forward's start to the next forward's start (so it
includes the backward, recompute included), median over trials; the medians are maxed over
the EP ranks (an all-to-all of a small float64 array) and the smallest wins, the same C on
every rank. It is measured again every `recheck_every` forwards. Choices are logged on
logging.getLogger("piper.moe").

Shapes: T tokens of this rank, k = top_k, H = hidden, N = sent (token, choice) rows,
R = received rows, E_local experts per rank, EP ranks.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from . import chunk_memory
from .dispatch import _inverse, exchange_counts, weighted_sum
from .precision import dequantize_fp8, pack_fp8, quantize_fp8, unpack_fp8

log = logging.getLogger("piper.moe")

CANDIDATES = (1, 2, 4)


# -- the plan: what every chunk sends and receives
@dataclass(frozen=True)
class ChunkPlan:
    """Row bookkeeping of one chunked forward (rows of all chunks concatenated by chunk).

    bounds: C + 1 token boundaries. send_counts / recv_counts: int64 [C, EP, E_local], rows
        this rank sends to (receives from) each rank, per chunk and local slot.
    pair_order: int64 [N], flat (token, choice) pair indices, by chunk, then logical expert,
        then token; pair_token = pair_order // k.
    to_send / from_send: None (identity placement) or int64 [N] permutations between
        pair_order and send order (as DispatchHandle's, with chunk offsets).
    to_expert_c / from_expert_c: per chunk, received row -> expert-grouped row permutations.
    to_expert: int64 [R], concatenated receive buffer -> the unchunked expert order (local
        slot, then source rank, then token); from_expert: its inverse.
    memory_codes: int64 [EP], every rank's chunk_memory wish (chunk_memory.CODES), the same
        array on every rank.
    """

    bounds: list[int]
    send_counts: np.ndarray
    recv_counts: np.ndarray
    pair_order: torch.Tensor
    pair_token: torch.Tensor
    to_send: torch.Tensor | None
    from_send: torch.Tensor | None
    to_expert_c: list[torch.Tensor]
    from_expert_c: list[torch.Tensor]
    to_expert: torch.Tensor
    from_expert: torch.Tensor
    comm: object
    memory_codes: np.ndarray

    @property
    def chunks(self) -> int:
        return len(self.bounds) - 1

    def send_rows(self, c: int) -> list[int]:
        return [int(n) for n in self.send_counts[c].sum(axis=1)]

    def recv_rows(self, c: int) -> list[int]:
        return [int(n) for n in self.recv_counts[c].sum(axis=1)]

    def offsets(self, which: str) -> np.ndarray:
        """Row offsets [C + 1] of the chunks in the send ("send") or receive ("recv") order."""
        m = self.send_counts if which == "send" else self.recv_counts
        return np.concatenate([[0], np.cumsum(m.sum(axis=(1, 2)))]).astype(np.int64)

    @property
    def expert_counts(self) -> list[int]:
        return [int(n) for n in self.recv_counts.sum(axis=(0, 1))]


def make_plan(experts: torch.Tensor, keep: torch.Tensor | None, num_experts: int, comm,
              slot_of: torch.Tensor | None, chunks: int, wish: int = 0) -> ChunkPlan:
    """experts int64 [T, k] logical ids, keep bool [T, k] or None, slot_of as in dispatch,
    wish: this rank's chunk_memory code. Collective: exchanges the count matrix of all chunks
    and the wishes in one all-to-all (host sync)."""
    ep, (T, k) = comm.size, experts.shape
    e_local = num_experts // ep
    flat = experts.reshape(-1)
    slot = flat if slot_of is None else slot_of[flat.clamp(min=0)]
    keep_flat = None if keep is None else keep.reshape(-1)
    bounds = [T * c // chunks for c in range(chunks + 1)]
    # Per chunk: its pairs sorted by slot (a stable sort restricted to a contiguous range of
    # pairs keeps the unchunked relative order).
    send_pairs, per_slot = [], np.zeros((chunks, num_experts), dtype=np.int64)
    for c in range(chunks):
        lo, hi = bounds[c] * k, bounds[c + 1] * k
        s = slot[lo:hi]
        if keep_flat is not None:
            kept = keep_flat[lo:hi].nonzero().squeeze(1)
            sp = kept[torch.argsort(s[kept], stable=True)]
        else:
            sp = torch.argsort(s, stable=True)
        sp = sp + lo
        send_pairs.append(sp)
        per_slot[c] = torch.bincount(slot[sp], minlength=num_experts).cpu().numpy()
    send_counts = per_slot.reshape(chunks, ep, e_local)
    # NOTE: host sync. Row s of the result: what rank s sends this rank, all chunks.
    # The last column carries this rank's chunk_memory wish to every rank.
    mat = np.concatenate([send_counts.transpose(1, 0, 2).reshape(ep, chunks * e_local),
                          np.full((ep, 1), wish, dtype=np.int64)], axis=1)
    recv = exchange_counts(mat, comm)
    memory_codes = np.ascontiguousarray(recv[:, -1])
    recv_counts = np.ascontiguousarray(recv[:, :-1].reshape(ep, chunks, e_local)
                                       .transpose(1, 0, 2))
    # Pair order (logical expert, then token, within each chunk) and the send permutations.
    dev = experts.device
    orders, to_send, from_send, off = [], [], [], 0
    for sp in send_pairs:
        if slot_of is None:
            orders.append(sp)
        else:
            fs = torch.argsort(flat[sp], stable=True)
            orders.append(sp[fs])
            from_send.append(fs + off)
            to_send.append(_inverse(fs) + off)
        off += len(sp)
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    pair_order = torch.cat(orders) if orders else empty
    # Received rows of chunk c: (source rank, local slot, token); regroup by local slot.
    to_expert_c, from_expert_c, keys = [], [], []
    slots = np.tile(np.arange(e_local), ep)
    sources = np.repeat(np.arange(ep), e_local)
    for c in range(chunks):
        n = recv_counts[c].reshape(-1)
        local_ids = np.repeat(slots, n)
        te = torch.from_numpy(np.argsort(local_ids, kind="stable")).to(dev)
        to_expert_c.append(te)
        from_expert_c.append(_inverse(te))
        keys.append(np.repeat(slots * (ep * chunks) + sources * chunks + c, n))
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    to_expert = torch.from_numpy(np.argsort(key, kind="stable")).to(dev)
    return ChunkPlan(bounds, send_counts, recv_counts, pair_order, pair_order // k,
                     torch.cat(to_send) if to_send else None,
                     torch.cat(from_send) if from_send else None,
                     to_expert_c, from_expert_c, to_expert, _inverse(to_expert), comm,
                     memory_codes)


# -- communication timing
class CommClock:
    """Exposed (blocked in wait or in a synchronous call) and total (union of issue-to-
    completion intervals) communication seconds of one forward. An operation's completion is
    the time wait() returned when wait blocked, else the first time it was seen completed
    (poll() runs between stages), an upper bound, so `total` may be slightly high."""

    def __init__(self):
        self.exposed = 0.0
        self.spans: list[list] = []   # [issue time, completion time or None, work]

    def issue(self, work) -> list:
        rec = [time.perf_counter(), None, work]
        self.spans.append(rec)
        return rec

    def poll(self) -> None:
        now = time.perf_counter()
        for rec in self.spans:
            if rec[1] is None and rec[2] is not None and rec[2].is_completed():
                rec[1] = now

    def wait(self, rec):
        t0 = time.perf_counter()
        done = rec[2].is_completed()
        result = rec[2].wait()
        t1 = time.perf_counter()
        self.exposed += t1 - t0
        if rec[1] is None:
            rec[1] = t0 if done else t1
        rec[2] = None  # drop the Work (it holds the received tensor)
        return result

    def sync(self, t0: float, t1: float) -> None:
        self.exposed += t1 - t0
        self.spans.append([t0, t1, None])

    @property
    def total(self) -> float:
        total, end = 0.0, -np.inf
        for start, stop in sorted((a, b) for a, b, _ in self.spans if b is not None):
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        return total


# -- autograd re-attachment
class _Dispatched(torch.autograd.Function):
    """gathered [N, H] (send order) -> the received rows [R, H] in the unchunked expert order,
    already received (`value`); backward: reverse all-to-all-v of each chunk's gradient."""

    @staticmethod
    def forward(ctx, gathered, value, plan):
        ctx.plan, ctx.shape = plan, gathered.shape
        return value

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        g_recv = grad.index_select(0, plan.from_expert)  # back to the receive buffers' order
        g_send = grad.new_empty(ctx.shape)
        return _reverse(plan, g_recv, g_send, forward_send="send"), None, None


class _Combined(torch.autograd.Function):
    """y [R, H] (unchunked expert order) -> the returned rows [N, H] in pair order, already
    received (`value`); backward: reverse all-to-all-v of each chunk's gradient."""

    @staticmethod
    def forward(ctx, y, value, plan):
        ctx.plan, ctx.shape = plan, y.shape
        return value

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        g_send = grad if plan.to_send is None else grad.index_select(0, plan.to_send)
        g_recv = grad.new_empty(ctx.shape)
        _reverse(plan, g_send.contiguous(), g_recv, forward_send="recv")
        return g_recv.index_select(0, plan.to_expert), None, None


def _reverse(plan: ChunkPlan, src: torch.Tensor, dst: torch.Tensor, forward_send: str
             ) -> torch.Tensor:
    """Backward of a chunked exchange: src rows (the forward's receive side, by chunk) go back
    to dst (the forward's send side). forward_send: which side of `plan` the forward sent
    from ("send": the dispatch, "recv": the combine). All chunks are issued, then waited.
    (The combine's reverse, forward_send="recv", is the dispatch direction: _redispatch.)"""
    comm = plan.comm
    src_off = plan.offsets("recv" if forward_send == "send" else "send")
    dst_off = plan.offsets(forward_send)
    works = []
    for c in range(plan.chunks):
        fwd_send, fwd_recv = ((plan.send_rows(c), plan.recv_rows(c)) if forward_send == "send"
                              else (plan.recv_rows(c), plan.send_rows(c)))
        works.append(comm.all_to_all_v(src[src_off[c]:src_off[c + 1]], fwd_recv,
                                       recv=dst[dst_off[c]:dst_off[c + 1]],
                                       recv_counts=fwd_send, async_op=True))
    for w in works:
        w.wait()
    return dst


def _redispatch(plan: ChunkPlan, x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """The dispatched rows [R, H] (unchunked expert order) again, from the layer input x
    [T, H] (compute dtype): the forward's gather and every chunk's dispatch all-to-all-v (all
    issued, then waited), as packed FP8 when fp8 (the same values as the forward's).
    Collective: every rank of plan.comm calls it for the same forward."""
    send = x.index_select(0, plan.pair_token)
    if plan.to_send is not None:
        send = send.index_select(0, plan.to_send)
    H, R = x.shape[1], int(plan.offsets("recv")[-1])
    if fp8:
        send = pack_fp8(*quantize_fp8(send))
    recv = send.new_empty((R, send.shape[1]))
    # the dispatch direction: the combine's backward exchange (send side -> receive side)
    _reverse(plan, send.contiguous(), recv, forward_send="recv")
    if fp8:
        recv = dequantize_fp8(*unpack_fp8(recv, H), x.dtype)
    return recv.index_select(0, plan.to_expert)


class _Experts(torch.autograd.Function):
    """rows [R, H] -> expert outputs [R, H] (`value`, computed chunk by chunk); backward
    recomputes the experts on all rows at once and differentiates that. The rows for that are
    kept ("save"), copied to host and back ("offload"), or re-dispatched from x [T, H]
    ("recompute": collective in backward; x is saved, a tensor the router keeps anyway).

    apply(rows [R, H], w1, w3, w2, value [R, H], experts (the Experts module), counts (rows per
    local expert), memory ("save" | "offload" | "recompute", the same on every rank),
    x [T, H] detached, plan (ChunkPlan, for the re-dispatch), fp8 (the re-dispatch's wire),
    scaled (the experts' first GEMMs are scaled FP8 GEMMs: layer/fp8_gemm.py)).
    """

    @staticmethod
    def forward(ctx, rows, w1, w3, w2, value, experts, counts, memory, x, plan, fp8, scaled):
        ctx.memory, ctx.device, ctx.fp8, ctx.scaled = memory, rows.device, fp8, scaled
        if memory == "save":
            ctx.save_for_backward(rows)
        elif memory == "offload":
            host, ctx.event = chunk_memory.offload(rows.detach())
            host._piper_offloaded = True  # lets saved-bytes counters tell host bytes apart
            ctx.save_for_backward(host)
        else:
            ctx.save_for_backward(x)  # detached by the caller: no gradient flows to it here
            ctx.plan = plan
        ctx.experts, ctx.counts = experts, counts
        return value

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        if ctx.memory == "save":
            rows = saved
        elif ctx.memory == "offload":
            rows = chunk_memory.reload(saved, ctx.event, ctx.device)
        else:
            rows = _redispatch(ctx.plan, saved, ctx.fp8)
        ex = ctx.experts
        with torch.enable_grad():
            r = rows.detach().requires_grad_()
            # dequantized FP8 rows re-quantize to the same values (layer/precision.py)
            y = ex(r, ctx.counts, fp8_rows=quantize_fp8(r) if ctx.scaled else None)
            grads = torch.autograd.grad(y, (r, ex.w1, ex.w3, ex.w2), grad, allow_unused=True)
        return (*grads, None, None, None, None, None, None, None, None)


# -- the chunked forward
def chunked_forward(layer, x: torch.Tensor, routing, keep: torch.Tensor | None,
                    slot_of: torch.Tensor | None, chunks: int
                    ) -> tuple[torch.Tensor, SimpleNamespace, dict]:
    """Dispatch -> experts -> combine of x [T, H] (the compute dtype) in `chunks` pipelined
    chunks, the dispatches as packed FP8 when layer.fp8_dispatch (each chunk dequantized when
    it arrives). Returns (y [T, H] without the shared expert, in the combine's accumulate
    dtype, splits (send_splits / recv_splits summed over the
    chunks, for layer._stats), timing {chunks, comm_seconds_exposed, comm_seconds_total,
    chunk_memory}). Collective, like dispatch and combine; the backward too (and its
    "recompute" strategy re-runs the dispatch). layer.chunk_memory (a ChunkMemory) decides
    what is kept for backward."""
    comm, H = layer.comm, x.shape[1]
    clock = CommClock()
    pairs = routing.experts.numel() if keep is None else int(keep.sum())
    if torch.is_grad_enabled():  # rows kept: the larger of what it sends and what it received
        kept = max(pairs, layer.chunk_memory.last_rows)
        wish = layer.chunk_memory.wish(kept, H, x.element_size(), x.device)
    else:  # no graph, nothing kept: no probe, no host copy
        wish = chunk_memory.CODES["save"]
    t0 = time.perf_counter()
    plan = make_plan(routing.experts, keep, layer.cfg.num_experts, comm, slot_of, chunks, wish)
    clock.sync(t0, time.perf_counter())
    memory = layer.chunk_memory.decide(plan.memory_codes, comm.rank)
    layer.chunk_memory.last_rows = int(plan.recv_counts.sum())
    s_off, r_off = plan.offsets("send"), plan.offsets("recv")
    gathered = x.index_select(0, plan.pair_token)
    if plan.to_send is not None:
        gathered = gathered.index_select(0, plan.to_send)
    send = gathered.detach()
    fp8, scaled = layer.fp8_dispatch, layer.fp8_gemm == "scaled"
    if fp8:
        send = pack_fp8(*quantize_fp8(send))
    # One allocation per forward: every chunk's dispatch is in flight at once, so each chunk
    # owns a row range of the receive buffer (and of the combine's send and receive buffers).
    # FP8: the packed rows land in recv_buf and are dequantized per chunk into rows_buf.
    recv_buf = send.new_empty((int(r_off[-1]), send.shape[1]))
    rows_buf = x.new_empty((int(r_off[-1]), H)) if fp8 else recv_buf
    y_buf = x.new_empty((int(r_off[-1]), H))
    back_buf = x.new_empty((int(s_off[-1]), H))
    scratch = x.new_empty((int(np.diff(r_off).max(initial=0)), H))

    # Issue every dispatch, then per chunk: wait, experts, issue its combine.
    dispatches = [clock.issue(comm.all_to_all_v(
        send[s_off[c]:s_off[c + 1]], plan.send_rows(c), recv=recv_buf[r_off[c]:r_off[c + 1]],
        recv_counts=plan.recv_rows(c), async_op=True)) for c in range(chunks)]
    combines = []
    with torch.no_grad():
        for c in range(chunks):
            clock.poll()
            clock.wait(dispatches[c])
            n = int(r_off[c + 1] - r_off[c])
            fp8_rows = None
            if fp8:
                q, scales = unpack_fp8(recv_buf[r_off[c]:r_off[c + 1]], H)
                rows_buf[r_off[c]:r_off[c + 1]] = dequantize_fp8(q, scales, x.dtype)
                if scaled:  # gathered as bytes: index_select need not know float8
                    fp8_rows = (q.view(torch.uint8).index_select(0, plan.to_expert_c[c])
                                .view(q.dtype), scales.index_select(0, plan.to_expert_c[c]))
            rows = torch.index_select(rows_buf[r_off[c]:r_off[c + 1]], 0, plan.to_expert_c[c],
                                      out=scratch[:n])
            out = layer.experts(rows, [int(v) for v in plan.recv_counts[c].sum(axis=0)],
                                fp8_rows=fp8_rows)
            y_c = y_buf[r_off[c]:r_off[c + 1]]
            torch.index_select(out, 0, plan.from_expert_c[c], out=y_c)
            clock.poll()
            combines.append(clock.issue(comm.all_to_all_v(
                y_c, plan.recv_rows(c), recv=back_buf[s_off[c]:s_off[c + 1]],
                recv_counts=plan.send_rows(c), async_op=True)))
        for rec in combines:
            clock.wait(rec)
        rows_value = rows_buf.index_select(0, plan.to_expert)
        y_value = y_buf.index_select(0, plan.to_expert)
        back_value = back_buf if plan.from_send is None else back_buf.index_select(
            0, plan.from_send)
    del recv_buf, rows_buf, y_buf, scratch

    # Re-attach autograd: the same stages (and row orders) as the unchunked path.
    ex = layer.experts
    rows = _Dispatched.apply(gathered, rows_value, plan)
    y = _Experts.apply(rows, ex.w1, ex.w3, ex.w2, y_value, ex, plan.expert_counts, memory,
                       x.detach(), plan, fp8, scaled)
    back = _Combined.apply(y, back_value, plan)
    out = weighted_sum(back, routing.weights, plan.pair_order, plan.pair_token, x.shape[0])
    splits = SimpleNamespace(send_splits=[int(v) for v in plan.send_counts.sum(axis=(0, 2))],
                             recv_splits=[int(v) for v in plan.recv_counts.sum(axis=(0, 2))])
    timing = {"chunks": chunks, "comm_seconds_exposed": clock.exposed,
              "comm_seconds_total": clock.total, "chunk_memory": memory}
    return out, splits, timing


# -- choosing C
class ChunkSchedule:
    """The chunk count of each forward: a fixed int, or "auto" (see the module docstring).

    ChunkSchedule(setting, comm, recheck_every=50, candidates=(1, 2, 4), trials=2)
    next() -> int, called once per forward, at the same point on every rank of comm (the
    "auto" decision is collective: an all-to-all over comm).
    """

    def __init__(self, setting, comm, recheck_every: int = 50,
                 candidates: tuple[int, ...] = CANDIDATES, trials: int = 2):
        self.setting, self.comm = setting, comm
        self.recheck_every, self.candidates, self.trials = recheck_every, candidates, trials
        self.choice: int | None = None if setting == "auto" else setting
        self.measured: dict[int, float] = {}
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._pending: tuple[int, float] | None = None
        self._since = 0
        if setting == "auto":
            self._restart()

    def _restart(self) -> None:
        self._plan = [c for _ in range(self.trials) for c in self.candidates]
        self._times = {c: [] for c in self.candidates}
        self._since = 0

    def next(self) -> int:
        if self.setting != "auto":
            return self.setting
        now = time.perf_counter()
        if self._pending is not None:
            c, t = self._pending
            self._times[c].append(now - t)
            self._pending = None
        if self._plan:
            c = self._plan.pop(0)
            self._pending = (c, now)
            return c
        if self._times:  # every trial measured: decide (collective)
            self._decide()
        self._since += 1
        if self._since >= self.recheck_every:
            self._restart()
        return self.choice

    def _decide(self) -> None:
        mine = np.array([statistics.median(self._times[c]) for c in self.candidates])
        comm = self.comm
        tiled = np.ascontiguousarray(np.tile(mine, (comm.size, 1)))
        worst = np.asarray(comm.all_to_all(tiled)).max(axis=0)  # same on every rank
        self.choice = int(self.candidates[int(np.argmin(worst))])
        self.measured = {c: float(t) for c, t in zip(self.candidates, worst)}
        self._times = {}
        if comm.rank == 0:
            log.info("piper.moe: pipeline_chunks='auto' chose C=%d (forward-to-forward "
                     "seconds, max over %d ranks: %s); next check in %d forwards", self.choice,
                     comm.size, ", ".join(f"C={c}: {t:.4g}" for c, t in self.measured.items()),
                     self.recheck_every)
