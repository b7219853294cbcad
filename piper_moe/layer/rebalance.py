"""Expert rebalancing: measure the per-rank routed load, plan slot swaps, migrate the experts.

    tracker = LoadTracker(cfg.num_experts, window=50)
    tracker.add(layer.stats["tokens_per_expert"])            # after every training forward
    if tracker.imbalance(layer.slot_of, layer.e_local, layer.ep) > 1.2:
        swaps = plan_swaps(tracker.load, layer.slot_of, layer.e_local, layer.ep,
                           layer.comm.node_of)
        migrate(layer, swaps, optimizer)                     # collective over layer.comm

The plan is a pure function of the global load (tokens_per_expert is summed over the
stats_comm ranks, so every rank of an EP group computes the same plan). NOTE: when EP groups
are data-parallel replicas of each other, their expert gradients are all-reduced slot by slot,
so all replicas must keep the same placement: plan from a load summed over all of them
(stats_comm spanning them, or an all-reduce of the tracker's load).

migrate moves whole experts (weights, gradients, optimizer moments) between ranks with one
all-to-all-v and updates the placement; the model stays the same function: outputs,
global_state_dict and later optimizer steps are bitwise those of the run without migration
(dispatch.py, Placement: each expert computes the same rows in the same order, and token-side
sums run in logical order). One exception: under node dedup, an expert moving to another node
regroups a token's per-node partial sums ((a + b) + c may become a + (b + c)), so with
top_k >= 3 results may differ by summation-order rounding (~1e-16 relative in float64).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

EXPERT_PARAMS = ("w1", "w3", "w2")


def _rank_load(load: np.ndarray, slot_of: np.ndarray, e_local: int, ep: int) -> np.ndarray:
    """int64 [ep]: the rows routed to each rank's slots."""
    return np.bincount(np.asarray(slot_of) // e_local, weights=load, minlength=ep)


def _ratio(rank_load: np.ndarray) -> float:
    mean = rank_load.mean()
    return float(rank_load.max() / mean) if mean > 0 else 1.0


class LoadTracker:
    """Per-expert routed rows over the last `window` steps (steps added with `add`)."""

    def __init__(self, num_experts: int, window: int = 100):
        if num_experts < 1 or window < 1:
            raise ValueError(f"LoadTracker needs num_experts >= 1 and window >= 1, got "
                             f"num_experts={num_experts}, window={window}")
        self.num_experts = num_experts
        self.window = window
        self._steps: deque[np.ndarray] = deque(maxlen=window)

    def add(self, tokens_per_expert) -> None:
        """One step's counts, int [num_experts] (layer.stats["tokens_per_expert"])."""
        v = np.asarray(tokens_per_expert, dtype=np.int64)
        if v.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert has shape {v.shape}, expected "
                             f"({self.num_experts},)")
        self._steps.append(v)

    def reset(self) -> None:
        """Forgets the window (e.g. after a migration, to measure the new placement)."""
        self._steps.clear()

    @property
    def steps(self) -> int:
        return len(self._steps)

    @property
    def load(self) -> np.ndarray:
        """int64 [num_experts]: rows per logical expert, summed over the window."""
        if not self._steps:
            return np.zeros(self.num_experts, dtype=np.int64)
        return np.sum(self._steps, axis=0)

    def total(self) -> np.ndarray:
        """The same as `load`."""
        return self.load

    def state_dict(self) -> dict:
        """Plain ints and lists (loadable with torch.load(weights_only=True))."""
        return {"num_experts": self.num_experts, "window": self.window,
                "steps": [v.tolist() for v in self._steps]}

    def load_state_dict(self, state: dict) -> None:
        if state["num_experts"] != self.num_experts:
            raise ValueError(f"LoadTracker state for {state['num_experts']} experts, this "
                             f"tracker has {self.num_experts}")
        self._steps = deque((np.asarray(v, dtype=np.int64) for v in state["steps"]),
                            maxlen=self.window)

    def imbalance(self, slot_of, e_local: int, ep: int) -> float:
        """Max over ranks of the routed rows / their mean over ranks, over the window (1.0 with
        no rows)."""
        return _ratio(_rank_load(self.load, np.asarray(slot_of), e_local, ep))


def apply_swaps(slot_of, swaps: list[tuple[int, int]]) -> np.ndarray:
    """The placement after swapping the slots of each pair of logical experts, in order."""
    out = np.array(slot_of, dtype=np.int64)
    for a, b in swaps:
        out[a], out[b] = out[b], out[a]
    return out


def plan_swaps(load, slot_of, e_local: int, ep: int, node_of_rank=None, threshold: float = 1.2,
               max_swaps: int | None = None) -> list[tuple[int, int]]:
    """Greedy swaps of logical experts between ranks that lower the max / mean rank load.

    Arguments:
        load: int [num_experts], rows per logical expert (LoadTracker.load).
        slot_of: int [num_experts], the current placement; e_local, ep: slots per rank, ranks.
        node_of_rank: int [ep], the node of each rank (comm.node_of); None: one node.
        threshold: stop once the predicted max / mean rank load is <= threshold.
        max_swaps: at most this many swaps (None: ep).
    Returns:
        [(a, b), ...]: pairs of logical experts whose slots to exchange, in order
        (apply_swaps gives the resulting placement).

    Each round takes the most loaded rank h (lowest index on ties) and looks for the swap of one
    of its experts a with an expert b of a less loaded rank r that strictly lowers
    max(load(h), load(r)), minimising that max; ranks on h's node first (moving an expert
    inside a node is cheaper), other nodes only when no swap inside the node helps. Ties go to
    the lowest (r, a, b). It stops when no swap helps h. Pure and deterministic: every rank
    computes the same plan from the same load.
    """
    load = np.asarray(load, dtype=np.int64)
    slot = np.array(slot_of, dtype=np.int64)
    node = np.zeros(ep, dtype=np.int64) if node_of_rank is None else np.asarray(node_of_rank)
    if load.shape != slot.shape or slot.size != e_local * ep:
        raise ValueError(f"plan_swaps: load ({load.size}) and slot_of ({slot.size}) must both "
                         f"have e_local * ep = {e_local} * {ep} entries")
    max_swaps = ep if max_swaps is None else max_swaps
    swaps: list[tuple[int, int]] = []
    rank_load = _rank_load(load, slot, e_local, ep).astype(np.int64)
    while len(swaps) < max_swaps and _ratio(rank_load) > threshold:
        h = int(np.argmax(rank_load))
        best = None
        for same_node in (True, False):
            for r in range(ep):
                if r == h or rank_load[r] >= rank_load[h] or (node[r] == node[h]) != same_node:
                    continue
                for a in np.flatnonzero(slot // e_local == h):
                    for b in np.flatnonzero(slot // e_local == r):
                        d = int(load[a] - load[b])
                        new_max = max(rank_load[h] - d, rank_load[r] + d)
                        key = (new_max, r, int(a), int(b))
                        if new_max < rank_load[h] and (best is None or key < best[0]):
                            best = (key, d)
            if best is not None:
                break
        if best is None:
            break
        (_, r, a, b), d = best
        slot[a], slot[b] = slot[b], slot[a]
        rank_load[h] -= d
        rank_load[r] += d
        swaps.append((a, b))
    return swaps


def _expert_tensors(layer, optimizer) -> list[torch.Tensor]:
    """Every tensor with one row per local slot: the expert weights, their gradients and the
    optimizer's per-element state (Adam/AdamW exp_avg, exp_avg_sq, ...; scalars such as step
    are per parameter and do not move). Same order on every rank."""
    out = []
    for name in EXPERT_PARAMS:
        p = getattr(layer.experts, name)
        out.append(p.data)
        if p.grad is not None:
            out.append(p.grad)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in sorted(state):
            t = state[key]
            if torch.is_tensor(t) and t.shape == p.shape:
                out.append(t)
    return out


@torch.no_grad()
def migrate(layer, swaps: list[tuple[int, int]], optimizer=None) -> np.ndarray:
    """Applies `swaps` (plan_swaps' pairs of logical experts) to layer's placement and moves the
    experts whose slot changes: weights, gradients (when set) and, given the optimizer, its
    per-element state of those rows. Collective over layer.comm: every rank passes the same
    swaps, and the same kinds of tensors (all or none with gradients and optimizer state).

    In place: the Parameters (and state tensors) keep their storage, so the optimizer's
    references stay valid. Rows leaving the rank travel in one all-to-all-v of their bytes
    (through host memory: piper_comm takes CPU tensors). Returns the new slot_of (also set on
    the layer).
    """
    old = layer.slot_of
    new = apply_swaps(old, swaps)
    if np.array_equal(old, new):
        return layer.slot_of
    e_local, me, ep = layer.e_local, layer.rank, layer.ep
    src, dst = old // e_local, new // e_local
    # Moved experts by new slot (so by destination rank): the order senders pack them in.
    moved = [int(e) for e in np.argsort(new, kind="stable") if old[e] != new[e]]
    leaving = [e for e in moved if src[e] == me and dst[e] != me]
    within = [e for e in moved if src[e] == me and dst[e] == me]
    arriving = sorted((e for e in moved if dst[e] == me and src[e] != me),
                      key=lambda e: (src[e], new[e]))
    rows = [t.view(e_local, -1) for t in _expert_tensors(layer, optimizer)]
    device = rows[0].device

    def local(experts: list[int], slot_of: np.ndarray) -> torch.Tensor:
        return torch.tensor([int(slot_of[e] % e_local) for e in experts], dtype=torch.int64,
                            device=device)

    # Copies (index_select) first: the writes below must not clobber rows still to be read.
    kept = [r.index_select(0, local(within, old)) for r in rows]
    if ep > 1:
        widths = [r.shape[1] * r.element_size() for r in rows]
        send = torch.cat([r.index_select(0, local(leaving, old)).view(torch.uint8)
                          for r in rows], dim=1).cpu()
        send_counts = np.bincount(dst[leaving], minlength=ep) if leaving else [0] * ep
        recv_counts = np.bincount(src[arriving], minlength=ep) if arriving else [0] * ep
        recv, _ = layer.comm.all_to_all_v(send, [int(c) for c in send_counts],
                                          recv_counts=[int(c) for c in recv_counts])
        if arriving:
            recv = torch.as_tensor(recv).to(device)
            at = local(arriving, new)
            for r, lo, width in zip(rows, np.cumsum([0, *widths[:-1]]), widths):
                r.index_copy_(0, at, recv[:, lo:lo + width].contiguous().view(r.dtype))
    if within:
        at = local(within, new)
        for r, k in zip(rows, kept):
            r.index_copy_(0, at, k)
    layer.slot_of = new
    return layer.slot_of
