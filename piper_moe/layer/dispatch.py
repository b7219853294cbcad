"""Padding-free dispatch and combine of (token, choice) pairs through piper_comm all-to-all-v.

dispatch sorts the pairs by global expert id, so each destination rank's rows are contiguous
and grouped by its local experts; the [EP, E_local] count matrix travels first (an equal-split
all-to-all of int64), so every rank knows, without any per-row metadata, which local expert
each received row belongs to. combine runs the reverse all-to-all and sums each token's
weighted expert outputs. Both are differentiable: the backward of dispatch's all-to-all is
combine's exchange and vice versa (piper_comm.torch.AllToAll). Every rank of the
communicator must call dispatch and combine (and their backward) in the same order.

dispatch_dedup / combine_dedup add node-level dedup in front (X-MoE's redundancy-bypassing
dispatch): a token crosses to each destination node once and is replicated there by a plain
dispatch among that node's ranks; on the way back its weighted expert outputs are summed on
that node before the one row crosses back. Replication is an index_select, so the backward
sums gradients inside the node too.

Placement: the router's ids are logical experts; slot_of (int64 [num_experts], a permutation,
None = identity) maps them to physical slots, slot s living on rank s // E_local at local index
s % E_local. Rows travel by slot, but on the token side every gather and every sum runs over
the pairs in logical order (what the identity placement does), so a placement changes neither
which rows an expert computes, nor their order, nor the summation order of the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .precision import AllToAll, Fp8RowMoves, Gather, accumulate_dtype


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to undo a dispatch. Built by `dispatch`, consumed by `combine`.

    pair_order: int64 [N_send], the sent (token, choice) pair indices (flat, token-major),
        by logical expert then token (the send order under the identity placement);
        pair_token: int64 [N_send], the token of each of those pairs.
    send_splits / recv_splits: rows sent to / received from each rank (EP ints each).
    to_expert_order: int64 [N_recv], received row -> position grouped by local expert;
        from_expert_order: its inverse.
    expert_counts: rows each local expert gets (E_local ints).
    tokens: this rank's token count; comm: the communicator (None: single process).
    to_send_order / from_send_order: None under the identity placement (pair_order is then
        the send order); else int64 [N_send], pair_order position -> send position
        permutations: sent rows = gathered rows [to_send_order], and returned rows
        [from_send_order] are back in pair_order (logical expert, then token-major) order.
    fp8_rows: after an FP8 dispatch, the received rows as delivered (e4m3 [N_recv, hidden],
        float32 scales [N_recv, nb]), grouped by local expert as the returned rows; else None.
    """

    pair_order: torch.Tensor
    pair_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    to_expert_order: torch.Tensor
    from_expert_order: torch.Tensor
    expert_counts: list[int]
    tokens: int
    comm: object
    to_send_order: torch.Tensor | None = None
    from_send_order: torch.Tensor | None = None
    fp8_rows: tuple[torch.Tensor, torch.Tensor] | None = None


def exchange(x: torch.Tensor, send: list[int], recv: list[int], comm) -> torch.Tensor:
    """Differentiable all-to-all-v of rows (identity without a communicator)."""
    if comm is None:
        return x
    from piper_comm.torch import AllToAll as RowsAllToAll  # piper_comm.torch, on first use

    return RowsAllToAll.apply(x.contiguous(), send, recv, comm)


def exchange_counts(counts: np.ndarray, comm) -> np.ndarray:
    """counts int64 [EP, m] (row r: what this rank has for rank r) -> [EP, m] (row s: what
    rank s has for this rank). Equal-split all-to-all, no autograd."""
    if comm is None:
        return counts
    return np.asarray(comm.all_to_all(np.ascontiguousarray(counts, dtype=np.int64)))


def dispatch(x: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None,
             num_experts: int, comm, slot_of: torch.Tensor | None = None, fp8: bool = False
             ) -> tuple[torch.Tensor, DispatchHandle]:
    """x [T, hidden], experts int64 [T, k] logical expert ids (entries that keep drops may be
    -1), keep bool [T, k] or None (all kept), slot_of int64 [num_experts] on x's device or None
    (identity placement), fp8: rows travel as FP8 -> (rows [sum(expert_counts), hidden] in x's
    dtype, grouped by this rank's local slots, handle). With fp8 the T token rows are quantized
    once, before the k-fold gather (precision.Fp8RowMoves), not the gathered rows."""
    handle = plan_dispatch(experts, keep, num_experts, comm, slot_of, x.device)
    if fp8:
        rows, q, scales = Fp8RowMoves.apply(x, dispatch_moves(handle), comm, x.dtype)
        return rows, replace(handle, fp8_rows=(q, scales))
    gathered = x.index_select(0, handle.pair_token)
    if handle.to_send_order is not None:
        gathered = gathered.index_select(0, handle.to_send_order)
    rows = exchange(gathered, handle.send_splits, handle.recv_splits, comm)
    return rows.index_select(0, handle.to_expert_order), handle


def dispatch_moves(handle: DispatchHandle) -> list:
    """The row moves of a dispatch (precision.Gather / AllToAll), from the T token rows to
    the rows grouped by local slot: gather the pairs' tokens, reorder to send order under a
    placement, the all-to-all-v, regroup by local slot."""
    n_pairs = len(handle.pair_token)
    moves = [Gather(handle.pair_token, handle.tokens)]
    if handle.to_send_order is not None:
        moves.append(Gather(handle.to_send_order, n_pairs))
    return [*moves, AllToAll(handle.send_splits, handle.recv_splits),
            Gather(handle.to_expert_order, sum(handle.recv_splits))]


def plan_dispatch(experts: torch.Tensor, keep: torch.Tensor | None, num_experts: int, comm,
                  slot_of: torch.Tensor | None, device) -> DispatchHandle:
    """The DispatchHandle of a dispatch (arguments as in dispatch): sorts the pairs, exchanges
    the [EP, E_local] count matrix (collective; host sync), builds the row maps on device."""
    ep = 1 if comm is None else comm.size
    e_local = num_experts // ep
    T, k = experts.shape
    flat = experts.reshape(-1)
    slot = flat if slot_of is None else slot_of[flat.clamp(min=0)]
    if keep is not None:
        kept = keep.reshape(-1).nonzero().squeeze(1)
        send_pairs = kept[torch.argsort(slot[kept], stable=True)]
    else:
        send_pairs = torch.argsort(slot, stable=True)
    per_slot = torch.bincount(slot[send_pairs], minlength=num_experts).cpu().numpy()
    send_counts = per_slot.reshape(ep, e_local)
    recv_counts = exchange_counts(send_counts, comm)
    send = [int(s) for s in send_counts.sum(axis=1)]
    recv = [int(r) for r in recv_counts.sum(axis=1)]
    # Received rows are ordered (source rank, local slot); regroup them by local slot.
    local_ids = np.repeat(np.tile(np.arange(e_local), ep), recv_counts.reshape(-1))
    to_expert = torch.from_numpy(np.argsort(local_ids, kind="stable")).to(device)
    from_expert = _inverse(to_expert)
    to_send = from_send = None
    pair_order = send_pairs
    if slot_of is not None:
        # Logical order (stable, so token-major within an expert): gathers and sums run in it.
        from_send = torch.argsort(flat[send_pairs], stable=True)
        to_send = _inverse(from_send)
        pair_order = send_pairs[from_send]
    return DispatchHandle(pair_order, pair_order // k, send, recv, to_expert, from_expert,
                          [int(c) for c in recv_counts.sum(axis=0)], T, comm, to_send,
                          from_send)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def combine(y: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """y [sum(expert_counts), hidden] (dispatch's row order), weights [T, k] -> [T, hidden]:
    out[t] = sum over t's kept choices c of weights[t, c] * expert_output(t, c). The rows
    travel in y's dtype; the sum runs in accumulate_dtype (float32 for bf16 rows) and is
    returned in the promoted dtype of y and weights."""
    back = exchange(y.index_select(0, handle.from_expert_order), handle.recv_splits,
                    handle.send_splits, handle.comm)
    if handle.from_send_order is not None:
        back = back.index_select(0, handle.from_send_order)
    return weighted_sum(back, weights, handle.pair_order, handle.pair_token, handle.tokens)


def weighted_sum(back: torch.Tensor, weights: torch.Tensor, pair_order: torch.Tensor,
                 pair_token: torch.Tensor, tokens: int) -> torch.Tensor:
    """out [tokens, hidden] = sum over pairs p of weights.flat[pair_order[p]] * back[p] into
    row pair_token[p]; back [N, hidden], accumulated in float32 at least (accumulate_dtype),
    result dtype = promote(back, weights, accumulate). The product promotes bf16 rows itself,
    so autograd keeps back in its own dtype (no float32 copy of it)."""
    dt = torch.promote_types(accumulate_dtype(back.dtype), weights.dtype)
    w = weights.reshape(-1).index_select(0, pair_order).unsqueeze(1).to(dt)
    out = back.new_zeros(tokens, back.shape[1], dtype=dt)
    return out.index_add(0, pair_token, back * w)


@dataclass(frozen=True)
class DedupHandle:
    """What combine_dedup needs to undo a dispatch_dedup.

    row_token: int64 [N_rows], the token of each (token, destination node) row sent, in send
        order (by gateway rank, then token); send_splits / recv_splits: rows sent to / received
        from each rank in the inter-node stage; weights: [R, top_k] the received rows' combine
        weights (0 where the slot is for no expert of this node); inner: the gateway's
        intra-node DispatchHandle; inter_node_rows_saved: (token, choice) pairs of this rank
        minus (token, node) rows of this rank that cross to other nodes.
    """

    row_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    weights: torch.Tensor
    inner: DispatchHandle
    tokens: int
    inter_node_rows_saved: int


def gateways(comm) -> np.ndarray:
    """int64 [max node id + 1]: the rank of each node that receives this rank's rows for it,
    ranks of a node taken in rank order and matched by local rank (a rail, as in HALO)."""
    node_of = np.asarray(comm.node_of)
    gw = np.full(int(node_of.max()) + 1, -1, dtype=np.int64)
    for n in np.unique(node_of):
        ranks = np.flatnonzero(node_of == n)
        gw[n] = ranks[comm.local_rank % len(ranks)]
    return gw


def dispatch_dedup(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                   keep: torch.Tensor | None, num_experts: int, comm,
                   slot_of: torch.Tensor | None = None, fp8: bool = False
                   ) -> tuple[torch.Tensor, DedupHandle]:
    """Node-level deduplicated dispatch: each token crosses to a node once, whatever the number
    of its experts there, then is replicated inside that node.

    Stage 1: for every (token, node) with at least one chosen expert on the node, one row goes
    to the node's gateway (`gateways`), with the token's expert ids there (int64 [k], -1 for
    slots of other nodes) and their weights ([k], differentiable). Stage 2: the gateway
    dispatches the received rows to the experts of its node (`dispatch`, intra-node only).
    x [T, hidden], experts int64 [T, k] logical ids, weights [T, k], keep bool [T, k] or None,
    slot_of as in dispatch, fp8: both stages carry the packed FP8 rows (quantized once here,
    forwarded as they are by the gateway, dequantized by the expert's rank) -> (rows grouped by
    this rank's local slots, in x's dtype, handle). Collective, like dispatch. Logical ids
    travel to the gateway; a placement that moves an expert to another node changes which
    outputs are summed on which node (rounding, for top_k >= 3).
    """
    ep, T = comm.size, experts.shape[0]
    e_local = num_experts // ep
    node_of = torch.from_numpy(np.asarray(comm.node_of, dtype=np.int64)).to(x.device)
    slots = experts if slot_of is None else slot_of[experts]
    pair_node = node_of[slots // e_local]
    valid = torch.ones_like(experts, dtype=torch.bool) if keep is None else keep
    pair_gw = torch.from_numpy(gateways(comm)).to(x.device)[pair_node]
    sent = torch.zeros(ep, T, dtype=torch.bool, device=x.device)
    sent[pair_gw[valid], valid.nonzero()[:, 0]] = True
    row_gw, row_token = sent.nonzero(as_tuple=True)
    mine = valid.index_select(0, row_token) & (pair_gw.index_select(0, row_token)
                                               == row_gw.unsqueeze(1))
    ids = torch.where(mine, experts.index_select(0, row_token), -1)
    w = weights.index_select(0, row_token) * mine
    send_counts = torch.bincount(row_gw, minlength=ep).cpu().numpy().reshape(ep, 1)
    send = [int(s) for s in send_counts[:, 0]]
    recv = [int(r) for r in exchange_counts(send_counts, comm)[:, 0]]
    w_recv = exchange(w, send, recv, comm)
    ids_recv, _ = comm.all_to_all_v(ids.cpu().contiguous(), send, recv_counts=recv)
    ids_recv = ids_recv.to(x.device)
    if fp8:  # both stages move the packed rows: quantized once, dequantized on arrival
        inner = plan_dispatch(ids_recv, ids_recv >= 0, num_experts, comm, slot_of, x.device)
        moves = [Gather(row_token, T), AllToAll(send, recv), *dispatch_moves(inner)]
        rows, q, scales = Fp8RowMoves.apply(x, moves, comm, x.dtype)
        inner = replace(inner, fp8_rows=(q, scales))
    else:
        x_recv = exchange(x.index_select(0, row_token), send, recv, comm)
        rows, inner = dispatch(x_recv, ids_recv, ids_recv >= 0, num_experts, comm, slot_of)
    remote = pair_node[valid] != comm.node
    remote_rows = int((node_of[row_gw] != comm.node).sum())
    handle = DedupHandle(row_token, send, recv, w_recv, inner, T,
                         int(remote.sum()) - remote_rows)
    return rows, handle


def combine_dedup(y: torch.Tensor, handle: DedupHandle) -> torch.Tensor:
    """Reverse of dispatch_dedup: y [sum(inner.expert_counts), hidden] -> [T, hidden]. The
    weighted outputs of a token's experts on one node are summed on that node's gateway, so
    one row per (token, node) crosses back, in y's dtype (the partial sums are accumulated in
    float32 at least and cast to it); the final sum runs as in combine."""
    partial = combine(y, handle.weights, handle.inner).to(y.dtype)
    back = exchange(partial, handle.recv_splits, handle.send_splits, handle.inner.comm)
    dt = torch.promote_types(accumulate_dtype(back.dtype), handle.weights.dtype)
    out = back.new_zeros(handle.tokens, back.shape[1], dtype=dt)
    return out.index_add(0, handle.row_token, back.to(dt))
