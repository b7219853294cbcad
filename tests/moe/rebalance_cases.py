"""Rank-side cases of the stats_comm and expert-migration tests (run through tests/launch.py).

stats_comm: every rank runs an EP=1 layer (experts replicated) on its slice of a global batch
with stats_comm = the world, and the ranks together must equal one process running the whole
batch. migration: the same 3 AdamW steps run twice from the same seed, once with a migration
(plan_swaps + migrate, gradients and optimizer state moving too) before the step-k update; the
outputs of every step and the final global_state_dict must be bitwise equal.
"""

from __future__ import annotations

import numpy as np
import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.rebalance import LoadTracker, apply_swaps, migrate, plan_swaps
from piper_moe.layer.reference import ReferenceMoE

from .cases import SCENARIOS, _bias, _close, _sum_over_ranks


def stats_comm(local_size: int | None = None, seed: int = 7, total: int = 29) -> int:
    """EP=1 layers on every rank, stats_comm = world, vs the 1-process reference on the whole
    batch: outputs, aux-loss shares summed, router / shared / expert gradients summed (all are
    replicated here), tokens_per_expert, and the bias after an update. Two splits of the
    batch: uneven, and everything on rank 0 (the other ranks run on no tokens)."""
    comm = pc.init(local_size=local_size)
    P = comm.size
    uneven = [total // P + (r < total % P) + (P - 1 - 2 * r) for r in range(P)]
    checks = 0
    for counts in (uneven, [total] + [0] * (P - 1)):
        for name in ("softmax", "sigmoid-grouped", "idle-experts", "bias-update"):
            _check_stats_comm(comm, name, counts, seed)
            checks += 1
    return checks


def _check_stats_comm(comm, name: str, counts: list[int], seed: int) -> None:
    P, me = comm.size, comm.rank
    total, lo, hi = sum(counts), sum(counts[:me]), sum(counts[:me + 1])
    cfg = MoEConfig(**SCENARIOS[name])
    dtype = torch.float64
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    G = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    ref = ReferenceMoE(cfg, seed=seed, dtype=dtype)
    layer = MoELayer(cfg, None, seed=seed, dtype=dtype, stats_comm=comm)
    alone = MoELayer(cfg, None, seed=seed, dtype=dtype)  # today's default: local statistics
    for m in (ref, layer, alone):
        m.router.bias.copy_(_bias(name, cfg.num_experts, dtype))
    Y = ref(X)
    ((Y * G).sum() + ref.aux_loss).backward()
    y = layer(X[lo:hi])
    ((y * G[lo:hi]).sum() + layer.aux_loss).backward()
    alone(X[lo:hi])
    what = f"stats_comm {name} counts {counts} rank {me}/{P}"
    _close(y, Y[lo:hi].detach(), dtype, f"{what} output")
    _close(_sum_over_ranks(comm, layer.aux_loss.reshape(1)), ref.aux_loss.reshape(1),
           dtype, f"{what} aux loss")
    ref_params = dict(ref.named_parameters())
    for n, p in layer.named_parameters():
        _close(_sum_over_ranks(comm, p.grad), ref_params[n].grad, dtype,
               f"{what} grad {n} (summed over ranks)")
    load = _sum_over_ranks(comm, torch.tensor(alone.stats["tokens_per_expert"]))
    assert layer.stats["tokens_per_expert"] == load.tolist(), what
    assert torch.equal(layer.router.bias, ref.router.bias), f"{what} bias"
    if min(counts) > 0:  # then local statistics differ from the global ones
        if name == "bias-update":
            assert not torch.equal(alone.router.bias, ref.router.bias), what
        if cfg.aux_loss_coef:
            assert not torch.allclose(_sum_over_ranks(comm, alone.aux_loss.reshape(1)),
                                      ref.aux_loss.reshape(1), rtol=0, atol=1e-12), what


def _skewed_bias(cfg: MoEConfig, dtype) -> torch.Tensor:
    """Steers most tokens to the first quarter of the experts (rank 0's under the identity
    placement), a little more to each than to the next."""
    b = torch.zeros(cfg.num_experts, dtype=dtype)
    hot = max(1, cfg.num_experts // 4)
    b[:hot] = 0.6 - 0.05 * torch.arange(hot, dtype=dtype)
    return b


def _train(comm, cfg: MoEConfig, dtype, dedup: bool, migrate_at: int | None, seed: int,
           steps: int = 3, tokens: int = 24) -> dict:
    """`steps` AdamW steps on per-(step, rank) batches; with migrate_at = k, a plan_swaps +
    migrate between step k's backward and its optimizer update (gradients and the optimizer
    state of step k - 1 move with the weights). Returns the outputs of every step and of one
    forward after the last update, the final global_state_dict, the plan and the imbalances."""
    layer = MoELayer(cfg, comm, seed=seed, dtype=dtype, dedup=dedup)
    layer.router.bias.copy_(_skewed_bias(cfg, dtype))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    tracker = LoadTracker(cfg.num_experts, window=4)
    outs, plan, ratios = [], [], []
    for step in range(steps + 1):
        g = torch.Generator().manual_seed(seed * 1000 + step * 10 + comm.rank)
        x = torch.randn(tokens, cfg.hidden, generator=g).to(dtype)
        target = torch.randn(tokens, cfg.hidden, generator=g).to(dtype)
        y = layer(x)
        outs.append(y.detach().clone())
        tracker.add(layer.stats["tokens_per_expert"])
        if step == steps:
            break
        opt.zero_grad()
        (((y - target) ** 2).mean() + layer.aux_loss).backward()
        for p in layer.parameters():  # data-parallel all-reduce of the replicated ones
            if p is not layer.experts.w1 and p is not layer.experts.w3 and \
                    p is not layer.experts.w2:
                p.grad.copy_(_sum_over_ranks(comm, p.grad))
        if step == migrate_at:
            before = tracker.imbalance(layer.slot_of, layer.e_local, layer.ep)
            plan = plan_swaps(tracker.load, layer.slot_of, layer.e_local, layer.ep,
                              comm._node_of, threshold=1.05)
            migrate(layer, plan, opt)
            after = tracker.imbalance(layer.slot_of, layer.e_local, layer.ep)
            ratios = [before, after]
        opt.step()
    return {"outs": outs, "state": layer.global_state_dict(), "plan": plan, "ratios": ratios,
            "slot_of": layer.slot_of.copy(), "layer": layer}


def migration(local_size: int | None = None, seed: int = 11) -> dict:
    """Training with a migration at step 1 equals training without one: every step's outputs
    and the final global_state_dict, bitwise (float64). Plain dispatch with top_k = 3 (the
    token-side sums of 3 outputs run in logical order whatever the placement), node dedup
    (when the comm spans nodes) with top_k = 2, and dedup with top_k = 3 within 1e-12
    (an expert moving to another node regroups the per-node partial sums)."""
    comm = pc.init(local_size=local_size)
    base = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "num_shared_experts": 1,
            "aux_loss_coef": 0.01}
    runs = [("plain-top3", {**base, "top_k": 3}, False, True)]
    if comm.num_nodes > 1:
        runs += [("dedup-top2", {**base, "top_k": 2}, True, True),
                 ("dedup-top3", {**base, "top_k": 3}, True, False)]
    report = {}
    for name, kw, dedup, bitwise in runs:
        cfg = MoEConfig(**kw)
        ref = _train(comm, cfg, torch.float64, dedup, None, seed)
        mig = _train(comm, cfg, torch.float64, dedup, 1, seed)
        what = f"{name} rank {comm.rank}/{comm.size}"
        assert mig["plan"], f"{what}: the skewed load gave no swap"
        before, after = mig["ratios"]
        assert after < before, f"{what}: imbalance {before} -> {after}"
        assert not np.array_equal(mig["slot_of"], np.arange(cfg.num_experts)), what
        assert np.array_equal(mig["slot_of"], apply_swaps(np.arange(cfg.num_experts),
                                                          mig["plan"])), what
        exact = all(torch.equal(a, b) for a, b in zip(ref["outs"], mig["outs"]))
        exact &= all(torch.equal(ref["state"][k], mig["state"][k]) for k in ref["state"])
        if bitwise:
            for step, (a, b) in enumerate(zip(ref["outs"], mig["outs"])):
                assert torch.equal(a, b), f"{what} output of step {step}: " \
                    f"max diff {(a - b).abs().max().item()}"
            for k, t in ref["state"].items():
                assert torch.equal(t, mig["state"][k]), f"{what} global_state_dict {k}"
        else:
            for a, b in zip(ref["outs"], mig["outs"]):
                _close(a, b, torch.float64, f"{what} outputs")
            for k, t in ref["state"].items():
                _close(t, mig["state"][k], torch.float64, f"{what} global_state_dict {k}")
        # The migrated layer's slots hold the logical experts its placement says.
        layer = mig["layer"]
        mine = torch.from_numpy(layer.local_experts.copy())
        assert torch.equal(layer.experts.w2.detach(), mig["state"]["experts.w2"][mine]), what
        node_of = comm._node_of
        inter = sum(int(node_of[mig["slot_of"][e] // layer.e_local]
                        != node_of[e // layer.e_local]) for e in range(cfg.num_experts))
        report[name] = {"plan": [list(p) for p in mig["plan"]], "ratios": [before, after],
                        "bitwise": bool(exact), "experts_moved_across_nodes": inter}
    return report
