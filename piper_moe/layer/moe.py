"""MoELayer: router + padding-free expert-parallel dispatch + SwiGLU experts + shared expert."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import nn

from .chunk_memory import ChunkMemory
from .chunked import ChunkSchedule, chunked_forward
from .config import MoEConfig, MoEOptions
from .dispatch import combine, combine_dedup, dispatch, dispatch_dedup, exchange_counts
from .experts import Experts, SharedExpert
from .fp8_gemm import resolve_fp8_gemm
from .ppmoe import ppmoe_forward
from .precision import compute_dtype, fp8_row_bytes, param_dtype
from .router import Router, balance_loss, capacity_keep

EXPERT_KEYS = ("experts.w1", "experts.w3", "experts.w2")


def _check_dispatcher(dispatcher: str, comm) -> None:
    """What MoEOptions cannot check alone: the dispatcher against the communicator."""
    if dispatcher == "ppmoe" and comm is None:
        raise ValueError("dispatcher='ppmoe' needs comm (the tensor-parallel group)")
    if dispatcher == "ppmoe" and comm.num_nodes > 1:
        raise ValueError(f"dispatcher='ppmoe' needs comm inside one node (its all-reduce "
                         f"runs on the intra-node link), got {comm.num_nodes} nodes")


class MoELayer(nn.Module):
    """A DeepSeek-style MoE layer whose routed experts are spread over the ranks of `comm`.

    MoELayer(cfg, comm=None, options=None, *, seed=0, dtype=torch.float32, device="cpu",
             stats_comm=None, slot_of=None, **option_fields)
        cfg: MoEConfig, what the layer computes. options: MoEOptions, how it runs (dispatcher,
            dedup, chunking, precision); option_fields override single fields of it, e.g.
            MoELayer(cfg, comm, dedup=False). Both are validated on construction.
        comm: a piper_comm.Communicator (EP = comm.size; num_experts must divide by it) or
            None (one process, EP = 1). For dispatcher "ppmoe": the node's group.
        stats_comm: the Communicator over which the routing load (balancing loss, bias update)
            is summed; None: comm. Give the data-parallel group when it is larger than the EP
            group; its ranks call forward together.
        slot_of: int64 [num_experts], a permutation: logical expert e lives in slot slot_of[e],
            slot s on rank s // E_local (E_local = num_experts // EP); None: the identity.
            Expert weights are stored by slot; global_state_dict() is in logical order.
        Weights depend on (seed, global expert id) only, so every EP layout and placement holds
        the same global model. Construction is collective over comm.

    y = layer(x): x [T, hidden], this rank's tokens (T may differ per rank, including 0) ->
        [T, hidden] in x's dtype. Collective: every rank of comm calls forward, and backward
        through y, in the same order. Cost per forward on the alltoall path: two all-to-all-v
        of T * top_k rows (fewer across nodes with dedup) plus one small count exchange.
        After forward:
        layer.aux_loss: 0-d tensor, this rank's share of the balancing loss (add it to the
            loss; the shares of the stats_comm ranks sum to the loss of their whole batch);
        layer.stats: tokens_per_expert (over stats_comm, logical order), bytes_sent_intra_node,
            bytes_sent_inter_node, bytes_saved_by_dedup, bytes_dispatch, bytes_combine (rows
            this rank sends to other ranks, at the wire format; dedup's routing metadata not
            counted), and for the chunked path chunks, comm_seconds_exposed,
            comm_seconds_total and chunk_memory (None when not chunked).
        In training mode with bias_update_rate > 0 the router bias then moves toward balance.

    Replicated parameters (router, shared expert) get per-rank partial gradients: sum them
    over ranks (data-parallel all-reduce) to get the global-batch gradient.
    """

    def __init__(self, cfg: MoEConfig, comm=None, options: MoEOptions | None = None, *,
                 seed: int = 0, dtype=torch.float32, device="cpu", stats_comm=None,
                 slot_of=None, **option_fields):
        super().__init__()
        o = options or MoEOptions()
        if option_fields:
            o = dataclasses.replace(o, **option_fields)
        self.options = o
        dispatcher, precision = o.dispatcher, o.precision
        _check_dispatcher(dispatcher, comm)
        self.precision, self.fp8_dispatch = precision, bool(o.fp8_dispatch)
        # "scaled" or "dequantize" with fp8_dispatch (layer/fp8_gemm.py), else None
        self.fp8_gemm = (resolve_fp8_gemm(o.fp8_gemm, device, cfg.hidden)
                         if self.fp8_dispatch else None)
        self.compute_dtype = compute_dtype(precision, dtype)
        dtype = param_dtype(precision, dtype)
        self.dispatcher, self.sequence_sharded = dispatcher, o.sequence_sharded
        ep = 1 if comm is None else comm.size
        if cfg.num_experts % ep:
            raise ValueError(f"num_experts={cfg.num_experts} is not divisible by the "
                             f"expert-parallel size EP={ep} (comm.size)")
        self.cfg, self.comm, self.ep, self.stats_comm = cfg, comm, ep, stats_comm
        # On one node dedup has nothing to save and only adds a hop through the gateway.
        self.dedup = (o.dedup and comm is not None and comm.num_nodes > 1
                      and dispatcher == "alltoall")
        self.rank = 0 if comm is None else comm.rank
        self.e_local = cfg.num_experts // ep
        self.router = Router(cfg, seed, dtype, device)
        self.slot_of = np.arange(cfg.num_experts) if slot_of is None else slot_of
        self.pipeline = ChunkSchedule(o.pipeline_chunks, comm, o.pipeline_recheck)
        self.chunk_memory = ChunkMemory(o.chunk_memory, o.chunk_memory_headroom)
        self._pipeline_warned = False
        self.experts = Experts(cfg, self.rank * self.e_local, self.e_local, seed, dtype, device,
                               ids=self.local_experts.tolist())
        self.shared = (SharedExpert(cfg, seed, dtype, device) if cfg.num_shared_experts
                       else None)
        self.aux_loss = torch.zeros((), dtype=dtype, device=device)
        self.stats: dict = {}

    @property
    def slot_of(self) -> np.ndarray:
        """int64 [num_experts] (read-only): the slot of each logical expert. Assigning it moves
        no weights: use rebalance.migrate to move them, or assign it before
        load_global_state_dict. Every rank must hold the same placement."""
        return self._slot_of

    @slot_of.setter
    def slot_of(self, value) -> None:
        E = self.cfg.num_experts
        v = np.array(value.tolist() if hasattr(value, "tolist") else value, dtype=np.int64)
        if v.shape != (E,) or not np.array_equal(np.sort(v), np.arange(E)):
            raise ValueError(f"slot_of must be a permutation of 0..{E - 1} (num_experts={E}), "
                             f"got {v.tolist()}")
        v.setflags(write=False)
        self._slot_of = v
        # None under the identity placement: dispatch then runs exactly today's path.
        self._slot_t = None if np.array_equal(v, np.arange(E)) else torch.from_numpy(v.copy())

    def set_placement(self, slot_of) -> None:
        """Assigns slot_of (a permutation, int [num_experts]) without moving any weight: for
        restoring a checkpoint's placement before loading its per-slot state_dict."""
        self.slot_of = slot_of

    @property
    def local_experts(self) -> np.ndarray:
        """int64 [E_local]: the logical expert in each of this rank's slots."""
        lo = self.rank * self.e_local
        return np.argsort(self._slot_of, kind="stable")[lo:lo + self.e_local]

    def row_bytes(self) -> tuple[int, int]:
        """Bytes of one token row on the wire: (dispatch, combine), at the compute dtype, or
        packed FP8 for the dispatch with fp8_dispatch."""
        h = self.cfg.hidden
        combine = h * self.compute_dtype.itemsize
        return (fp8_row_bytes(h) if self.fp8_dispatch else combine), combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] in x's dtype; collective (see the class docstring).
        Autocast is off inside: the precision policy casts explicitly."""
        with torch.autocast(x.device.type, enabled=False):
            y = (ppmoe_forward(self, x) if self.dispatcher == "ppmoe"
                 else self._forward(x))
        return y.to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The all-to-all dispatcher's forward: the router on x as given, everything else on
        x in the compute dtype; returns [T, hidden] in the combine's accumulate dtype."""
        cfg = self.cfg
        routing = self.router(x)
        keep = (capacity_keep(routing.experts, cfg) if cfg.capacity_factor is not None
                else None)
        chosen = routing.experts if keep is None else routing.experts[keep]
        local = np.zeros(cfg.num_experts + 1, dtype=np.int64)
        local[:-1] = torch.bincount(chosen.reshape(-1), minlength=cfg.num_experts).cpu().numpy()
        local[-1] = x.shape[0]
        load = self._all_reduce(local)
        global_load = torch.from_numpy(load[:-1]).to(x.device)
        self.aux_loss = (balance_loss(routing.probs, global_load, int(load[-1]), cfg)
                         if cfg.aux_loss_coef else routing.probs.sum() * 0)
        row_bytes = self.row_bytes()
        slot_of = self._slot_t
        if slot_of is not None and slot_of.device != x.device:
            slot_of = self._slot_t = slot_of.to(x.device)
        chunks = self._chunks()
        fp8 = self.fp8_dispatch
        x = x.to(self.compute_dtype)
        if self.dedup:
            rows, handle = dispatch_dedup(x, routing.experts, routing.weights, keep,
                                          cfg.num_experts, self.comm, slot_of, fp8)
            y = combine_dedup(self.experts(rows, handle.inner.expert_counts,
                                           fp8_rows=self._fp8_rows(handle.inner)), handle)
            self.stats = self._stats(load[:-1], [handle, handle.inner], row_bytes,
                                     sum(row_bytes) * handle.inter_node_rows_saved)
        elif chunks > 1:
            y, splits, timing = chunked_forward(self, x, routing, keep, slot_of, chunks)
            self.stats = {**self._stats(load[:-1], [splits], row_bytes, 0), **timing}
        else:
            rows, handle = dispatch(x, routing.experts, keep, cfg.num_experts, self.comm,
                                    slot_of, fp8)
            y = combine(self.experts(rows, handle.expert_counts,
                                     fp8_rows=self._fp8_rows(handle)), routing.weights, handle)
            self.stats = self._stats(load[:-1], [handle], row_bytes, 0)
        if chunks == 1:  # synchronous exchanges: nothing hidden, their time not measured
            self.stats.update(chunks=1, comm_seconds_exposed=None, comm_seconds_total=None,
                              chunk_memory=None)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training and cfg.bias_update_rate:
            self.router.update_bias(global_load)
        return y

    def _fp8_rows(self, handle):
        """The FP8 rows a dispatch delivered, for the experts' scaled GEMMs (fp8_gemm
        "scaled"); None otherwise."""
        return handle.fp8_rows if self.fp8_gemm == "scaled" else None

    def _chunks(self) -> int:
        """This forward's pipeline chunk count (collective under "auto"); 1 without comm
        and on the node-dedup path (logged once)."""
        if self.comm is None:
            return 1
        if self.dedup:
            if self.pipeline.setting != 1 and not self._pipeline_warned:
                self._pipeline_warned = True
                logging.getLogger("piper.moe").warning(
                    "piper.moe: pipeline_chunks=%r is not supported on the node-dedup path "
                    "(dedup=True over %d nodes): running unchunked (C=1)",
                    self.pipeline.setting, self.comm.num_nodes)
            return 1
        return self.pipeline.next()

    def _all_reduce(self, v: np.ndarray) -> np.ndarray:
        """Sum of int64 vector v over the stats_comm ranks (an equal-split all-to-all of
        size copies)."""
        comm = self.comm if self.stats_comm is None else self.stats_comm
        n = 1 if comm is None else comm.size
        return exchange_counts(np.tile(v, (n, 1)), comm).sum(axis=0)

    def _stats(self, load: np.ndarray, handles: list, row_bytes: tuple[int, int], saved: int
               ) -> dict:
        """handles: the exchanges of this forward (each with send_splits, the rows this rank
        sends in the dispatch direction, and recv_splits, the rows it sends back in the
        combine direction); row_bytes: (dispatch, combine) bytes per row."""
        intra = inter = sent_dispatch = sent_combine = 0
        if self.comm is not None:
            for r in range(self.ep):
                if r == self.rank:
                    continue
                d = sum(h.send_splits[r] for h in handles) * row_bytes[0]
                c = sum(h.recv_splits[r] for h in handles) * row_bytes[1]
                sent_dispatch, sent_combine = sent_dispatch + d, sent_combine + c
                if self.comm.node_of[r] == self.comm.node:
                    intra += d + c
                else:
                    inter += d + c
        return {"tokens_per_expert": [int(n) for n in load], "bytes_sent_intra_node": intra,
                "bytes_sent_inter_node": inter, "bytes_saved_by_dedup": saved,
                "bytes_dispatch": sent_dispatch, "bytes_combine": sent_combine}

    # -- whole-model state across layouts
    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model (all experts in logical order, whatever the placement) as detached
        CPU tensors. Collective."""
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        for key in EXPERT_KEYS:
            mine = sd[key]
            if self.comm is not None:
                tiled = mine.unsqueeze(0).expand(self.ep, *mine.shape).reshape(
                    -1, *mine.shape[1:]).contiguous()
                sd[key] = self.comm.all_to_all(tiled)
            if self._slot_t is not None:  # slot order -> logical order
                sd[key] = sd[key].index_select(0, torch.from_numpy(self._slot_of.copy()))
        return sd

    def load_global_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Loads a full model (as global_state_dict returns, from any layout): this rank's
        experts (under the current placement) and the replicated tensors. Local; every rank
        passes the same sd."""
        mine = torch.from_numpy(self.local_experts.copy())
        self.load_state_dict({k: (v.index_select(0, mine.to(v.device)) if k in EXPERT_KEYS
                                  else v) for k, v in sd.items()})
