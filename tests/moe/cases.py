"""Rank-side cases of the MoE layer tests (run through tests/launch.py).

Every rank builds the same global batch and output gradient from a seed, runs the EP=1
reference (ReferenceMoE) on the whole batch locally, runs its own slice through the
expert-parallel MoELayer, and compares outputs and gradients: its own rows, its own experts,
and the replicated parameters' gradients summed over ranks. Each case loops over many
sub-cases in one launch and returns how many checks it made.
"""

from __future__ import annotations

import numpy as np
import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.reference import ReferenceMoE

# float64: the only differences are summation orders (top-k combine, GEMM blocking over
# different row counts), ~1e-16 relative; float32: the same orders at 2^-24 relative rounding,
# amplified a little through SwiGLU and the softmax, so rtol 1e-5, and an absolute tolerance
# relative to the tensor's largest element (SCALED_ATOL): a replicated parameter's gradient is
# a sum over ranks of partial sums, the reference's one GEMM sums the same terms in another
# order (its blocking depends on the row count and on the CPU's vector width: AVX2 and AVX-512
# hosts differ), and where terms cancel an element's relative error is unbounded while its
# absolute error stays at the scale of the terms.
TOL = {torch.float64: {"rtol": 0.0, "atol": 1e-12},
       torch.float32: {"rtol": 1e-5, "atol": 1e-6}}
SCALED_ATOL = {torch.float64: 0.0, torch.float32: 1e-5}

BASE = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "top_k": 2}
SCENARIOS = {
    "softmax": {**BASE, "num_shared_experts": 1, "aux_loss_coef": 0.01},
    "sigmoid-grouped": {**BASE, "top_k": 3, "router": "sigmoid", "num_groups": 4,
                        "topk_groups": 2, "aux_loss_coef": 0.02, "num_shared_experts": 2},
    "top_k-all": {**BASE, "top_k": 8},
    "one-expert": {**BASE, "top_k": 1},    # bias sends every token to expert 5
    "idle-experts": {**BASE, "top_k": 2},  # bias keeps experts 0 and 7 empty
    "bias-update": {**BASE, "router": "sigmoid", "bias_update_rate": 0.01},
}


def _split(total: int, P: int) -> list[int]:
    """Uneven token counts summing to total, rank P // 2 (rank 1 when P == 2) gets none."""
    w = np.array([(r % 3) + 1 for r in range(P)], dtype=float)
    w[P // 2] = 0
    n = np.floor(w / w.sum() * total).astype(int)
    n[0] += total - n.sum()
    return [int(v) for v in n]


def _bias(name: str, E: int, dtype) -> torch.Tensor:
    b = torch.zeros(E, dtype=dtype)
    if name == "one-expert":
        b[5] = 100.0
    elif name == "idle-experts":
        b[0] = b[7] = -100.0
    return b


def _sum_over_ranks(comm, t: torch.Tensor) -> torch.Tensor:
    tiled = t.detach().unsqueeze(0).expand(comm.size, *t.shape).reshape(-1, *t.shape[1:])
    return comm.all_to_all(tiled.contiguous()).view(comm.size, *t.shape).sum(0)


def _close(a, b, dtype, what: str) -> None:
    largest = float(b.detach().abs().max()) if b.numel() else 0.0
    atol = max(TOL[dtype]["atol"], SCALED_ATOL[dtype] * largest)
    torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"], atol=atol,
                               msg=lambda m: f"{what}: {m}")


def exactness(local_size: int | None = None, node_ids: list[int] | None = None, seed: int = 5,
              total: int = 37) -> int:
    """EP layout vs the EP=1 reference, with node dedup off and on: output, aux loss, stats,
    input / expert / replicated gradients, bias after an update, global_state_dict, and dedup
    moving fewer inter-node bytes (exactly the count it reports saved)."""
    comm = pc.init(local_size=local_size, node_ids=node_ids)
    checks = 0
    for name, kw in SCENARIOS.items():
        cfg = MoEConfig(**kw)
        inter = {}
        for dedup in (False, True):  # float64: tight check of both paths, and the bytes
            stats = _check(comm, name, cfg, torch.float64, dedup, seed, total)
            inter[dedup] = _sum_over_ranks(comm, torch.tensor(
                [stats["bytes_sent_inter_node"], stats["bytes_saved_by_dedup"]]))
        assert inter[False][1] == 0
        assert inter[False][0] - inter[True][0] == inter[True][1], (name, inter)
        experts_per_node = cfg.num_experts // comm.size * comm.local_size
        if comm.num_nodes > 1 and cfg.top_k >= 3 and experts_per_node >= 2:  # else none to save
            assert inter[True][1] > 0, (name, inter)
        _check(comm, name, cfg, torch.float32, True, seed, total)  # float32 rounding bound
        checks += 3
    return checks + _state_round_trip(comm, seed)


def _check(comm, name: str, cfg: MoEConfig, dtype, dedup: bool, seed: int, total: int) -> dict:
    P, me = comm.size, comm.rank
    counts = _split(total, P)
    lo, hi = sum(counts[:me]), sum(counts[:me + 1])
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    G = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    ref = ReferenceMoE(cfg, seed=seed, dtype=dtype)
    layer = MoELayer(cfg, comm, seed=seed, dtype=dtype, dedup=dedup)
    ref.router.bias.copy_(_bias(name, cfg.num_experts, dtype))
    layer.router.bias.copy_(_bias(name, cfg.num_experts, dtype))
    Xr = X.clone().requires_grad_()
    Y = ref(Xr)
    ((Y * G).sum() + ref.aux_loss).backward()
    x = X[lo:hi].clone().requires_grad_()
    y = layer(x)
    ((y * G[lo:hi]).sum() + layer.aux_loss).backward()
    what = f"{name} {dtype} dedup={dedup} rank {me}/{P}"
    _close(y, Y[lo:hi].detach(), dtype, f"{what} output")
    _close(x.grad, Xr.grad[lo:hi], dtype, f"{what} input grad")
    _close(_sum_over_ranks(comm, layer.aux_loss.reshape(1)), ref.aux_loss.reshape(1),
           dtype, f"{what} aux loss")
    el, eh = me * layer.e_local, (me + 1) * layer.e_local
    ref_params = dict(ref.named_parameters())
    replicated = {n: p.grad for n, p in layer.named_parameters() if not n.startswith("experts.")}
    summed = _sum_over_ranks(comm, torch.cat([g.reshape(-1) for g in replicated.values()]))
    for n, p in layer.named_parameters():
        if n.startswith("experts."):
            _close(p.grad, ref_params[n].grad[el:eh], dtype, f"{what} grad {n}")
        else:
            mine, summed = summed[:p.numel()].view_as(p), summed[p.numel():]
            _close(mine, ref_params[n].grad, dtype, f"{what} grad {n} (summed over ranks)")
    _close(layer.router.bias, ref.router.bias, dtype, f"{what} bias")
    load = torch.bincount(_ref_choices(ref, X, name), minlength=cfg.num_experts)
    assert layer.stats["tokens_per_expert"] == load.tolist(), what
    if name == "one-expert":
        assert load[5] == total, what
    if name == "idle-experts":
        assert load[0] == load[7] == 0, what
    if comm.local_size == P:
        assert layer.stats["bytes_sent_inter_node"] == 0, what
    if comm.local_size == 1:
        assert layer.stats["bytes_sent_intra_node"] == 0, what
    if dedup and dtype == torch.float64:
        sd = layer.global_state_dict()
        for n, t in ref.state_dict().items():
            assert torch.equal(sd[n], t), f"{what} global_state_dict {n}"
    return layer.stats


def _ref_choices(ref: ReferenceMoE, X: torch.Tensor, name: str) -> torch.Tensor:
    """The experts the reference picked for X before its bias update (the bias-update scenario
    changed the bias after routing, so route with the bias it had then: zero)."""
    bias = ref.router.bias.clone()
    if name == "bias-update":
        ref.router.bias.zero_()
    with torch.no_grad():
        chosen = ref.router(X).experts.reshape(-1)
    ref.router.bias.copy_(bias)
    return chosen


def _state_round_trip(comm, seed: int) -> int:
    """A model saved under one seed and loaded into a layer built with another seed."""
    cfg = MoEConfig(**SCENARIOS["softmax"])
    src = ReferenceMoE(cfg, seed=seed + 1, dtype=torch.float64)
    layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64)
    layer.load_global_state_dict(src.state_dict())
    sd = layer.global_state_dict()
    for n, t in src.state_dict().items():
        assert torch.equal(sd[n], t), f"round trip {n}"
    return 1


def gradcheck(local_size: int | None = None, seed: int = 3) -> int:
    """torch.autograd.gradcheck in float64 of (y, aux_loss) w.r.t. this rank's tokens. Every
    rank has the same token count (gradcheck's forward and backward calls are collective and
    must match), and y_r depends on x_r only, so the simultaneous perturbations on the other
    ranks do not disturb the numerical Jacobian."""
    comm = pc.init(local_size=local_size)
    checks = 0
    for kw, dedup in ((SCENARIOS["softmax"], False), (SCENARIOS["sigmoid-grouped"], True)):
        cfg = MoEConfig(**{**kw, "hidden": 4, "ffn_hidden": 4})
        layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=dedup)
        g = torch.Generator().manual_seed(seed * 31 + comm.rank)
        x = torch.randn(2, cfg.hidden, generator=g, dtype=torch.float64, requires_grad=True)

        def f(x, layer=layer):
            return layer(x), layer.aux_loss

        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
        checks += 1
    return checks
