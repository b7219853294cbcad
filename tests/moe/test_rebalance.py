"""Expert placement, rebalancing and stats_comm: single-process units of plan_swaps,
LoadTracker and migrate, and mpirun cases (tests/moe/rebalance_cases.py)."""

import numpy as np
import pytest
import torch

from piper_moe import MoEConfig, MoELayer
from piper_moe.layer import LoadTracker, apply_swaps, migrate, plan_swaps
from piper_moe.layer.rebalance import _rank_load
from tests.launch import run_mpi

IDENTITY = np.arange(8)


def _ratio(load, slot_of, e_local, ep):
    r = _rank_load(np.asarray(load), np.asarray(slot_of), e_local, ep)
    return r.max() / r.mean()


# -- plan_swaps
def test_plan_prefers_intra_node_and_reduces_imbalance():
    # Ranks 0, 1 on node 0 and 2, 3 on node 1; rank 0 holds the two hot experts.
    load = [10, 9, 1, 1, 2, 2, 1, 1]
    nodes = [0, 0, 1, 1]
    swaps = plan_swaps(load, IDENTITY, 2, 4, nodes, threshold=1.2)
    assert swaps and all(isinstance(a, int) and isinstance(b, int) for a, b in swaps)
    a, b = swaps[0]
    assert a // 2 == 0 and b // 2 == 1  # rank 0 <-> rank 1: same node first
    assert swaps[0] == (0, 2)  # pair max 11 either way: lowest (rank, a, b) wins
    after = apply_swaps(IDENTITY, swaps)
    assert _ratio(load, after, 2, 4) < _ratio(load, IDENTITY, 2, 4)


def test_plan_goes_across_nodes_when_the_node_is_the_hot_spot():
    load = [5, 5, 5, 5, 0, 0, 0, 0]  # node 0 (ranks 0, 1) equally loaded, node 1 idle
    swaps = plan_swaps(load, IDENTITY, 2, 4, [0, 0, 1, 1], threshold=1.0)
    after = apply_swaps(IDENTITY, swaps)
    assert _ratio(load, after, 2, 4) == 1.0
    assert all(a // 4 != b // 4 for a, b in swaps)  # each swap crosses nodes


def test_plan_deterministic_and_bounded():
    rng = np.random.default_rng(0)
    for trial in range(50):
        ep, e_local = [(2, 4), (4, 2), (4, 4), (8, 2)][trial % 4]
        E = ep * e_local
        load = rng.integers(0, 100, E) * (rng.random(E) < 0.7)
        slot_of = rng.permutation(E)
        nodes = np.arange(ep) // 2
        swaps = plan_swaps(load, slot_of, e_local, ep, nodes, threshold=1.1, max_swaps=3)
        assert swaps == plan_swaps(load.copy(), slot_of.copy(), e_local, ep, nodes.copy(),
                                   threshold=1.1, max_swaps=3)
        assert len(swaps) <= 3
        before, after = _ratio(load, slot_of, e_local, ep), _ratio(
            load, apply_swaps(slot_of, swaps), e_local, ep)
        if load.sum():
            assert after <= before
            if swaps:
                assert after < before
            if len(swaps) < 3 and after > 1.1:  # stopped early: no swap helps the hot rank
                hot_rank = np.argmax(_rank_load(load, apply_swaps(slot_of, swaps), e_local, ep))
                assert plan_swaps(load, apply_swaps(slot_of, swaps), e_local, ep, nodes,
                                  threshold=1.1, max_swaps=1) == [], hot_rank


def test_plan_no_op_cases():
    skewed = [10, 9, 1, 1, 2, 2, 1, 1]
    assert plan_swaps([3] * 8, IDENTITY, 2, 4) == []              # balanced
    assert plan_swaps([0] * 8, IDENTITY, 2, 4) == []              # no tokens at all
    assert plan_swaps(skewed, IDENTITY, 2, 4, threshold=3.0) == []  # under the threshold
    assert plan_swaps(skewed, IDENTITY, 2, 4, max_swaps=0) == []
    assert len(plan_swaps(skewed, IDENTITY, 2, 4, threshold=1.0, max_swaps=1)) == 1
    assert plan_swaps(skewed, IDENTITY, 8, 1) == []               # one rank
    with pytest.raises(ValueError, match="e_local \\* ep = 2 \\* 3"):
        plan_swaps(skewed, IDENTITY, 2, 3)


def test_load_tracker_window():
    t = LoadTracker(4, window=2)
    assert t.imbalance([0, 1, 2, 3], 2, 2) == 1.0  # nothing yet
    t.add([100, 0, 0, 0])
    t.add([1, 1, 1, 1])
    t.add([3, 1, 0, 0])
    assert t.steps == 2 and t.load.tolist() == [4, 2, 1, 1]
    assert t.imbalance([0, 1, 2, 3], 2, 2) == 6 / 4
    assert t.imbalance([0, 2, 1, 3], 2, 2) == 5 / 4  # experts 0, 2 on rank 0
    saved = t.state_dict()
    t.reset()
    assert t.steps == 0 and t.load.tolist() == [0, 0, 0, 0]
    t.load_state_dict(saved)
    assert t.total().tolist() == [4, 2, 1, 1]
    t.add([0, 0, 0, 8])  # the window still holds 2 steps
    assert t.load.tolist() == [3, 1, 0, 8]
    with pytest.raises(ValueError, match="shape"):
        t.add([1, 2, 3])


# -- placement and migrate in one process (every move stays on the rank)
CFG = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "top_k": 3, "num_shared_experts": 1,
       "aux_loss_coef": 0.01}


def test_slot_of_validation():
    layer = MoELayer(MoEConfig(**CFG), dtype=torch.float64)
    assert layer.slot_of.tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"permutation of 0\.\.7"):
        layer.slot_of = [0, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError):
        layer.slot_of[0] = 1  # read-only: placement changes go through the setter
    w1 = layer.experts.w1.detach().clone()
    layer.set_placement(torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))  # moves no weights
    assert layer.slot_of.tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert layer.local_experts.tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert torch.equal(layer.experts.w1, w1)


@pytest.mark.parametrize(("dtype", "extra"), [
    (torch.float64, {}), (torch.float64, {"capacity_factor": 0.8}),
    (torch.float32, {})])  # float32: torch._grouped_mm where available
def test_placement_is_invisible(dtype, extra):
    """A layer built with a permuted placement is the same model, bitwise (plain path)."""
    cfg = MoEConfig(**CFG, **extra)
    perm = np.random.default_rng(1).permutation(8)
    a = MoELayer(cfg, seed=2, dtype=dtype)
    b = MoELayer(cfg, seed=2, dtype=dtype, slot_of=perm)
    assert b.local_experts.tolist() == np.argsort(perm).tolist()
    sa, sb = a.global_state_dict(), b.global_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    assert a.stats["tokens_per_expert"] == b.stats["tokens_per_expert"]
    (ya.sum() + a.aux_loss).backward()
    (yb.sum() + b.aux_loss).backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.router.weight.grad, b.router.weight.grad)
    mine = torch.from_numpy(b.local_experts.copy())
    assert torch.equal(a.experts.w1.grad[mine], b.experts.w1.grad)
    # load_global_state_dict follows the placement.
    c = MoELayer(cfg, seed=3, dtype=dtype, slot_of=perm)
    c.load_global_state_dict(sa)
    assert torch.equal(c.experts.w2, b.experts.w2)


def test_migrate_in_place_with_optimizer_state():
    cfg = MoEConfig(**CFG)
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = []
    for swaps in ([], [(0, 5), (2, 3), (0, 7)]):
        layer = MoELayer(cfg, seed=2, dtype=torch.float64)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        ptrs = [p.data_ptr() for p in layer.parameters()]
        for step in range(3):
            opt.zero_grad()
            (layer(x * (step + 1)) ** 2).mean().backward()
            if step == 1:
                migrate(layer, swaps, opt)
            opt.step()
        assert ptrs == [p.data_ptr() for p in layer.parameters()]
        w1 = layer.experts.w1
        assert opt.state[w1]["exp_avg"].shape == w1.shape
        runs.append((layer.global_state_dict(), layer(x), layer.slot_of.copy()))
    (sa, ya, pa), (sb, yb, pb) = runs
    assert pb.tolist() == apply_swaps(pa, [(0, 5), (2, 3), (0, 7)]).tolist() != pa.tolist()
    assert torch.equal(ya, yb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- mpirun: stats_comm, and training with a migration vs without
@pytest.mark.mpi
def test_stats_comm_ep1_dp2():
    run = run_mpi(2, "moe.rebalance_cases:stats_comm", env={"PIPER_LOCAL_SIZE": "2"})
    assert all(r["result"] == 8 for r in run.ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 4], ids=["ep2-one-node", "ep4-two-nodes"])
def test_migration_matches_no_migration(nprocs):
    run = run_mpi(nprocs, "moe.rebalance_cases:migration", env={"PIPER_LOCAL_SIZE": "2"})
    report = run.ranks[0]["result"]
    assert all(r["result"] == report for r in run.ranks)  # every rank planned the same
    assert report["plain-top3"]["bitwise"]
    if nprocs == 4:
        assert report["dedup-top2"]["bitwise"]
