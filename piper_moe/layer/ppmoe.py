"""PPMoE dispatch (Pipeline MoE, Chen et al. 2023): experts spread over a tensor-parallel group
whose ranks all hold the same tokens, so dispatch is an index select and combine an all-reduce.

MoELayer(..., dispatcher="ppmoe") calls `ppmoe_forward`. The layer's communicator is then the TP
group (one node): every rank routes all of the group's tokens (the same decision everywhere),
computes the (token, choice) pairs of its own experts (placement slot_of as in the all-to-all
path), scatters their weighted outputs into a partial [T, hidden] and the group sums the
partials. No token row crosses the link for dispatch; the only traffic is the sum.

Two modes, two gradient conventions (shape legend: T group tokens, T_r this rank's shard, D hidden,
K top_k):

- replicated (sequence_sharded=False): every rank passes the same x_TD and gets the same y_TD,
  and runs the same downstream computation and loss (Megatron tensor parallelism). The partials
  are summed by `reduce_from_group` (all-reduce forward, identity backward: every rank already
  holds the complete dL/dy); the expert input x_TD and the combine weights w_TK enter through
  `copy_to_group` (identity forward, all-reduce backward: rank r's backward only reaches the
  pairs of its own experts, the sum over ranks reaches all of them). Every gradient (input,
  router, shared expert, this rank's experts) is then complete and bitwise identical on all
  ranks of the group: no gradient all-reduce over the group for replicated parameters.
  aux_loss is the whole group batch's loss on every rank: the group's loss is counted once (each
  rank holds a copy of it, not a share).
- sequence_sharded=True: rank r passes its shard x_{T_r D} and gets y_{T_r D}, and its loss
  covers its rows only (the group loss is the sum over ranks, as on the all-to-all path). The
  shards are all-gathered (`gather_from_group`, backward: reduce-scatter, since every rank uses
  every shard) and the partials reduce-scattered (`scatter_to_group`, backward: all-gather);
  the two are each other's dual. Replicated parameters (router, shared expert) get per-rank
  partial gradients: sum them over the group (and over data parallelism), as on the all-to-all
  path; aux_loss is this rank's share (the balancing loss of its rows' probabilities).

All collectives are piper_comm all-to-all(v)s of CPU tensors, so plain mpirun suffices; the sum is
a reduce-scatter (each rank adds up one contiguous row chunk in rank order) followed by an
all-gather, so every rank gets the same bits. Each rank of the group must call forward (and
backward) in the same order.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ..common import even_split
from .dispatch import exchange_counts, weighted_sum
from .precision import dequantize_fp8, pack_fp8, quantize_fp8, unpack_fp8
from .router import balance_loss, capacity_keep


def _reduce_scatter(x: torch.Tensor, counts: list[int], comm) -> torch.Tensor:
    """x [sum(counts), *] on every rank -> [counts[rank], *]: the sum over ranks of their rows
    of this rank's chunk (rank order). No autograd."""
    me, n = comm.rank, comm.size
    recv, _ = comm.all_to_all_v(x.detach().contiguous(), counts, recv_counts=[counts[me]] * n)
    return recv.view(n, counts[me], *x.shape[1:]).sum(0)


def _all_gather(x: torch.Tensor, counts: list[int], comm) -> torch.Tensor:
    """x [counts[rank], *] -> [sum(counts), *]: every rank's rows in rank order. No autograd."""
    n = comm.size
    tiled = x.detach().unsqueeze(0).expand(n, *x.shape).reshape(-1, *x.shape[1:]).contiguous()
    recv, _ = comm.all_to_all_v(tiled, [x.shape[0]] * n, recv_counts=counts)
    return recv


def _all_reduce(x: torch.Tensor, comm) -> torch.Tensor:
    """Sum over ranks of x [T, *] (same T everywhere): reduce-scatter then all-gather."""
    counts = even_split(x.shape[0], comm.size)
    return _all_gather(_reduce_scatter(x, counts, comm), counts, comm)


class GatherFromGroup(torch.autograd.Function):
    """y = all-gather(x): x [counts[rank], D] -> y [sum(counts), D] on every rank. Every rank
    uses all of y, so the gradient of rank r's shard is the sum over ranks of their gradients
    of its rows: the backward is a reduce-scatter (in the gradient's dtype). fp8: the rows
    travel as packed FP8 and arrive dequantized in x's dtype (layer/precision.py), the
    backward taking the quantization as the identity."""

    @staticmethod
    def forward(ctx, x, counts, comm, fp8=False):
        ctx.counts, ctx.comm = counts, comm
        if not fp8:
            return _all_gather(x, counts, comm)
        packed = _all_gather(pack_fp8(*quantize_fp8(x)), counts, comm)
        return dequantize_fp8(*unpack_fp8(packed, x.shape[1]), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.counts, ctx.comm), None, None, None


class ScatterToGroup(torch.autograd.Function):
    """y = reduce-scatter(x): x [sum(counts), *] -> y [counts[rank], *], the sum over ranks of
    their rows of this rank's chunk. dy_r/dx_s is the identity on chunk r for every s, so the
    gradient of x on rank s is every rank's dL/dy_r in place: the backward is an all-gather."""

    @staticmethod
    def forward(ctx, x, counts, comm):
        ctx.counts, ctx.comm = counts, comm
        return _reduce_scatter(x, counts, comm)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.counts, ctx.comm), None, None


class ReduceFromGroup(torch.autograd.Function):
    """y = sum over ranks of x (all-reduce), for a replicated downstream: every rank computes
    the same loss from the same y, so each already holds the complete dL/dy and the backward is
    the identity (Megatron's "g"). Pair it with CopyToGroup on the inputs."""

    @staticmethod
    def forward(ctx, x, comm):
        return _all_reduce(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CopyToGroup(torch.autograd.Function):
    """(x, w) -> (x, w), identity forward (Megatron's "f"); backward: the all-reduce of the
    gradients (one collective on [T, D + K]), since rank r's graph reaches only the pairs of its
    own experts and the sum over ranks reaches every pair. x [T, D], w [T, K], same dtype."""

    @staticmethod
    def forward(ctx, x, w, comm):
        ctx.comm, ctx.split, ctx.dtype, ctx.device = comm, x.shape[1], x.dtype, x.device
        ctx.x_shape, ctx.w_shape = tuple(x.shape), tuple(w.shape)
        return x.view_as(x), w.view_as(w)

    @staticmethod
    def backward(ctx, gx, gw):
        # NOTE: an undefined grad is zero; every rank runs this all-reduce
        gx = torch.zeros(ctx.x_shape, dtype=ctx.dtype, device=ctx.device) if gx is None else gx
        gw = torch.zeros(ctx.w_shape, dtype=ctx.dtype, device=ctx.device) if gw is None else gw
        summed = _all_reduce(torch.cat([gx, gw.to(gx.dtype)], dim=1), ctx.comm)
        return summed[:, :ctx.split], summed[:, ctx.split:].to(gw.dtype), None


def shard_counts(rows: int, comm) -> list[int]:
    """Every rank's row count (an equal-split all-to-all of int64; a host sync)."""
    mine = np.full((comm.size, 1), rows, dtype=np.int64)
    return [int(c) for c in exchange_counts(mine, comm)[:, 0]]


def ppmoe_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward of MoELayer(dispatcher="ppmoe"): x [T, D] (replicated) or [T_r, D] (shard,
    sequence_sharded) -> the same shape, in the layer's accumulate dtype. Sets layer.aux_loss
    and layer.stats (module docstring). Precision: the shards are gathered in the compute
    dtype (as FP8 with layer.fp8_dispatch), so under bf16 the router runs (in float32) on the
    gathered bf16 rows; the experts run in the compute dtype and the partials are summed over
    the group in it (each rank's partial accumulated in float32 first). The replicated mode
    moves no token rows, so fp8_dispatch changes nothing there."""
    cfg, comm = layer.cfg, layer.comm
    n, me = comm.size, comm.rank
    # Gather the group's tokens (sequence-sharded), so every rank routes all of them
    shard = None
    if layer.sequence_sharded:
        shard = shard_counts(x.shape[0], comm)
        x_TD = GatherFromGroup.apply(x.to(layer.compute_dtype), shard, comm,
                                     layer.fp8_dispatch)
    else:
        x_TD = x
    T, K = x_TD.shape[0], cfg.top_k
    routing = layer.router(x_TD)
    keep = capacity_keep(routing.experts, cfg) if cfg.capacity_factor is not None else None
    # Load: the group's tokens are all here; only stats_comm (other groups) adds to it
    chosen = routing.experts if keep is None else routing.experts[keep]
    local = np.zeros(cfg.num_experts + 1, dtype=np.int64)
    local[:-1] = torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts).cpu().numpy()
    local[-1] = T
    load = local if layer.stats_comm is None else layer._all_reduce(local)
    global_load = torch.from_numpy(load[:-1]).to(x.device)
    probs = routing.probs
    if shard is not None:  # this rank's share: the probabilities of its own rows
        lo = sum(shard[:me])
        probs = probs[lo:lo + shard[me]]
    layer.aux_loss = (balance_loss(probs, global_load, int(load[-1]), cfg)
                      if cfg.aux_loss_coef else probs.sum() * 0)
    # Select this rank's pairs by index: by local slot, token-major within a slot
    flat = routing.experts.reshape(-1)
    slot = flat if layer._slot_t is None else layer._slot_t.to(x.device)[flat]
    mine = slot // layer.e_local == me
    if keep is not None:
        mine &= keep.reshape(-1)
    pairs = mine.nonzero().squeeze(1)
    pairs = pairs[torch.argsort(slot[pairs], stable=True)]
    counts = torch.bincount(slot[pairs] - me * layer.e_local, minlength=layer.e_local)
    token = pairs // K
    if shard is None:
        x_in, w_TK = CopyToGroup.apply(x_TD, routing.weights, comm)
    else:
        x_in, w_TK = x_TD, routing.weights
    cdt = layer.compute_dtype
    x_in = x_in.to(cdt)
    out = layer.experts(x_in.index_select(0, token), counts.tolist())
    partial_TD = weighted_sum(out, w_TK, pairs, token, T).to(cdt)
    # Sum the partials over the group: everywhere (replicated) or each rank its rows (sharded)
    if shard is None:
        y = ReduceFromGroup.apply(partial_TD, comm)
        sent = _peer_rows(even_split(T, n), me)
        gathered = [0] * n
    else:
        y = ScatterToGroup.apply(partial_TD, shard, comm)
        sent = _peer_rows(shard, me, replicated=False)
        gathered = [0 if s == me else shard[me] for s in range(n)]
    # dispatch direction: the token all-gather; combine direction: the sum of the partials
    layer.stats = layer._stats(load[:-1], [SimpleNamespace(send_splits=gathered,
                                                           recv_splits=sent)],
                               layer.row_bytes(), 0)
    # Shared expert once per row: after the sum, on the rows this rank returns
    if layer.shared is not None:
        y = y + layer.shared(x.to(cdt))
    if layer.training and cfg.bias_update_rate:
        layer.router.update_bias(global_load)
    return y


def _peer_rows(counts: list[int], me: int, replicated: bool = True) -> list[int]:
    """Rows of partial sums this rank sends to each peer in forward: the reduce-scatter sends
    peer s its chunk (counts[s] rows), and in the replicated all-reduce the all-gather sends
    each peer this rank's summed chunk (counts[me] rows) too."""
    back = counts[me] if replicated else 0
    return [0 if s == me else c + back for s, c in enumerate(counts)]
