"""Rank-side cases of the PPMoE dispatcher tests (run through tests/launch.py).

The whole communicator is one tensor-parallel group. Every rank builds the same global batch and
output gradient from a seed, runs the EP=1 reference (ReferenceMoE) on it, and runs
MoELayer(dispatcher="ppmoe") either on the whole batch (replicated: every rank the same x, the
same loss) or on its shard (sequence_sharded: uneven shards, one rank with none). Replicated:
output, input gradient and every replicated gradient equal the reference on every rank (and are
the same bits on all ranks). Sharded: its rows and, summed over ranks, the replicated gradients
and aux loss.
"""

from __future__ import annotations

import numpy as np
import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.reference import ReferenceMoE

from .cases import BASE, SCENARIOS, TOL, _bias, _close, _ref_choices, _split, _sum_over_ranks

PP_SCENARIOS = {
    **SCENARIOS,
    # the bias keeps rank 0's experts empty: it computes nothing and still joins every sum
    "idle-rank": {**BASE, "num_shared_experts": 1, "aux_loss_coef": 0.01},
    "capacity": {**BASE, "capacity_factor": 0.75, "aux_loss_coef": 0.01},
    "placement": {**BASE, "top_k": 3, "router": "sigmoid", "num_shared_experts": 1},
}


def _pp_bias(name: str, E: int, P: int, dtype) -> torch.Tensor:
    if name == "idle-rank":
        b = torch.zeros(E, dtype=dtype)
        b[:E // P] = -100.0
        return b
    return _bias(name, E, dtype)


def _placement(name: str, E: int, seed: int) -> np.ndarray | None:
    if name != "placement":
        return None
    return np.random.default_rng(seed).permutation(E)


def _same_on_all_ranks(comm, t: torch.Tensor, what: str) -> None:
    flat = t.detach().reshape(1, -1)
    tiled = flat.expand(comm.size, -1).contiguous()
    got = comm.all_to_all(tiled)
    for r in range(comm.size):
        assert torch.equal(got[r], flat[0]), f"{what}: rank {r} differs from rank {comm.rank}"


def exactness(seed: int = 5, total: int = 37) -> int:
    """PPMoE vs the EP=1 reference, replicated and sequence-sharded, float64 (tight) and
    float32 (rounding bound)."""
    comm = pc.init()
    checks = 0
    for name, kw in PP_SCENARIOS.items():
        cfg = MoEConfig(**kw)
        for sharded in (False, True):
            _check(comm, name, cfg, torch.float64, sharded, seed, total)
            checks += 1
        _check(comm, name, cfg, torch.float32, True, seed, total)
        checks += 1
    return checks


def _check(comm, name: str, cfg: MoEConfig, dtype, sharded: bool, seed: int, total: int) -> None:
    P, me = comm.size, comm.rank
    E = cfg.num_experts
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    G = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    ref = ReferenceMoE(cfg, seed=seed, dtype=dtype)
    layer = MoELayer(cfg, comm, seed=seed, dtype=dtype, dispatcher="ppmoe",
                     sequence_sharded=sharded, slot_of=_placement(name, E, seed))
    bias = _pp_bias(name, E, P, dtype)
    ref.router.bias.copy_(bias)
    layer.router.bias.copy_(bias)
    Xr = X.clone().requires_grad_()
    Y = ref(Xr)
    ((Y * G).sum() + ref.aux_loss).backward()
    if sharded:
        counts = _split(total, P)
        lo, hi = sum(counts[:me]), sum(counts[:me + 1])
    else:
        lo, hi = 0, total
    x = X[lo:hi].clone().requires_grad_()
    y = layer(x)
    ((y * G[lo:hi]).sum() + layer.aux_loss).backward()
    what = f"{name} {dtype} sharded={sharded} rank {me}/{P}"
    _close(y, Y[lo:hi].detach(), dtype, f"{what} output")
    _close(x.grad, Xr.grad[lo:hi], dtype, f"{what} input grad")
    ref_params = dict(ref.named_parameters())
    mine = torch.from_numpy(layer.local_experts.copy())
    replicated = {n: p.grad for n, p in layer.named_parameters() if not n.startswith("experts.")}
    if sharded:  # shares: sum over the group
        aux = _sum_over_ranks(comm, layer.aux_loss.reshape(1))
        flat = _sum_over_ranks(comm, torch.cat([v.reshape(-1) for v in replicated.values()]))
        replicated = {}
        for n, p in layer.named_parameters():
            if not n.startswith("experts."):
                replicated[n], flat = flat[:p.numel()].view_as(p), flat[p.numel():]
    else:  # complete on every rank, and the same bits everywhere
        aux = layer.aux_loss.reshape(1)
        for w, t in (("output", y), ("input grad", x.grad), *replicated.items()):
            _same_on_all_ranks(comm, t, f"{what} {w}")
    _close(aux, ref.aux_loss.reshape(1), dtype, f"{what} aux loss")
    for n, p in layer.named_parameters():
        if n.startswith("experts."):
            _close(p.grad, ref_params[n].grad.index_select(0, mine), dtype, f"{what} grad {n}")
        else:
            _close(replicated[n], ref_params[n].grad, dtype, f"{what} grad {n}")
    _close(layer.router.bias, ref.router.bias, dtype, f"{what} bias")
    if cfg.capacity_factor is None:  # the reference's capacity drops are not in _ref_choices
        load = torch.bincount(_ref_choices(ref, X, name), minlength=E)
        assert layer.stats["tokens_per_expert"] == load.tolist(), what
    if name == "idle-rank" and me == 0:
        assert int(torch.tensor(layer.stats["tokens_per_expert"])[:E // P].sum()) == 0, what
        assert all(float(p.grad.abs().sum()) == 0 for n, p in layer.named_parameters()
                   if n.startswith("experts.")), what
    assert layer.stats["bytes_sent_inter_node"] == 0, what
    assert (layer.stats["bytes_sent_intra_node"] > 0) == (P > 1), what


def gradcheck(seed: int = 3) -> int:
    """float64 gradient checks. Replicated: torch.autograd.gradcheck on every rank in lockstep
    (every rank perturbs the same element of the same x, which is the replicated function).
    Sequence-sharded: y_p depends on every rank's shard, so the lockstep check would mix
    columns; `_group_jacobians` perturbs one rank at a time instead."""
    comm = pc.init()
    checks = 0
    for kw in (SCENARIOS["softmax"], SCENARIOS["sigmoid-grouped"]):
        cfg = MoEConfig(**{**kw, "hidden": 4, "ffn_hidden": 4})
        layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dispatcher="ppmoe")
        g = torch.Generator().manual_seed(seed * 31)
        x = torch.randn(3, cfg.hidden, generator=g, dtype=torch.float64, requires_grad=True)

        def f(x, layer=layer):
            return layer(x), layer.aux_loss

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
        checks += 1
        sharded = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dispatcher="ppmoe",
                           sequence_sharded=True)
        g = torch.Generator().manual_seed(seed * 31 + comm.rank)
        xs = torch.randn(2 + comm.rank % 2, cfg.hidden, generator=g, dtype=torch.float64)
        _group_jacobians(comm, sharded, xs)
        checks += 1
    return checks


def _group_jacobians(comm, layer, x: torch.Tensor, eps: float = 1e-6, atol: float = 1e-7
                     ) -> None:
    """Checks d out_p / d x_q for every pair of ranks (out = y and aux_loss, flattened):
    numerically (central differences, only rank q perturbed) on rank p, analytically (backward
    with a unit gradient on rank p only) on rank q; the numerical blocks travel to rank q."""
    P, me = comm.size, comm.rank

    def out(xx):
        y = layer(xx)
        return torch.cat([y.reshape(-1), layer.aux_loss.reshape(1)])

    sizes = [int(v) for v in _sum_over_ranks(comm, torch.eye(P, dtype=torch.int64)[me]
                                              * x.numel())]
    n_out = [int(v) for v in _sum_over_ranks(comm, torch.eye(P, dtype=torch.int64)[me]
                                             * (out(x.detach()).numel()))]
    # numerical: column block (q, i) of this rank's outputs
    num = []
    with torch.no_grad():
        for q in range(P):
            cols = []
            for i in range(sizes[q]):
                ys = []
                for sign in (1, -1):
                    xx = x.clone()
                    if q == me:
                        xx.view(-1)[i] += sign * eps
                    ys.append(out(xx))
                cols.append((ys[0] - ys[1]) / (2 * eps))
            num.append(torch.stack(cols, 1) if cols else torch.zeros(n_out[me], 0,
                                                                       dtype=x.dtype))
    # analytical: row block (p, j) of d out_p / d x_me
    xr = x.clone().requires_grad_()
    o = out(xr)
    ana = []
    for p in range(P):
        rows = []
        for j in range(n_out[p]):
            v = torch.zeros_like(o)
            if p == me:
                v[j] = 1
            (gx,) = torch.autograd.grad(o, xr, v, retain_graph=True)
            rows.append(gx.reshape(-1))
        ana.append(torch.stack(rows))
    # send num block q (d out_me / d x_q) to rank q
    send = torch.cat([num[q].reshape(-1) for q in range(P)])
    got, _ = comm.all_to_all_v(send.contiguous(), [num[q].numel() for q in range(P)],
                               recv_counts=[n_out[p] * sizes[me] for p in range(P)])
    for p, block in enumerate(got.split([n_out[p] * sizes[me] for p in range(P)])):
        torch.testing.assert_close(ana[p], block.view(n_out[p], sizes[me]), rtol=0, atol=atol,
                                   msg=lambda m, p=p: f"d out_{p} / d x_{me}: {m}")


__all__ = ["TOL", "exactness", "gradcheck"]
