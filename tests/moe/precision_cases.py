"""Rank-side cases of the precision tests (tests/moe/test_precision.py, via tests/launch.py).

Every rank builds the same global batch and output gradient from a seed, runs the one-process
ReferenceMoE on the whole batch in fp32, in bf16-mixed and in bf16-mixed with FP8 dispatch,
and its own slice through MoELayer in bf16-mixed and bf16-mixed + FP8 on the all-to-all path
(node dedup off and on, and chunked with C = 2), then compares outputs and gradients.

Tolerances, relative to the largest element of the reference tensor (what bf16 resolves):
- SAME: layer vs the reference of the same precision. Both compute in bf16 on the same
  values; only GEMM blocking (grouped vs per expert, other row counts), the rank-summed
  replicated gradients and dedup's bf16 partial sums round differently: a few bf16 ulps.
- BF16: bf16-mixed vs fp32, each bf16 rounding of inputs, weights and GEMM outputs (2^-9
  relative each) through SwiGLU and the backward's GEMMs.
- FP8: FP8 dispatch vs bf16-mixed; e4m3 keeps 3 mantissa bits (2^-4 relative rounding per
  element, smaller elements of a block lose more), and the expert input's error enters every
  expert output and weight gradient.
"""

from __future__ import annotations

import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.precision import fp8_row_bytes
from piper_moe.layer.reference import ReferenceMoE
from tests.moe.cases import _split, _sum_over_ranks

TOL = {"same": 2e-2, "bf16": 3e-2, "fp8": 1.5e-1}

BASE = {"hidden": 256, "ffn_hidden": 64, "num_experts": 8, "top_k": 2}
SCENARIOS = {
    "softmax-shared": {**BASE, "num_shared_experts": 1, "aux_loss_coef": 0.01},
    "sigmoid-grouped": {**BASE, "top_k": 3, "router": "sigmoid", "num_groups": 4,
                        "topk_groups": 2, "aux_loss_coef": 0.02},
}
VARIANTS = ({"dedup": False}, {"dedup": True}, {"dedup": False, "pipeline_chunks": 2})


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> float:
    """|a - b| <= tol * max|b| elementwise; returns the measured max |a - b| / max |b|."""
    largest = float(b.detach().abs().max()) if b.numel() else 0.0
    err = float((a.detach().float() - b.detach().float()).abs().max()) if b.numel() else 0.0
    assert err <= tol * largest + 1e-12, (f"{what}: max |diff| {err:.3g} > {tol} * max|ref| "
                                          f"{largest:.3g}")
    return err / largest if largest else 0.0


def _run_ref(cfg, X, G, seed, **kw) -> dict:
    ref = ReferenceMoE(cfg, seed=seed, **kw)
    x = X.clone().requires_grad_()
    y = ref(x)
    ((y * G).sum() + ref.aux_loss).backward()
    return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in ref.named_parameters()}}


def _layer_grads(layer, comm, X, G, lo: int, hi: int) -> dict:
    """Runs layer on this rank's rows X[lo:hi] with output gradient G[lo:hi] (+ aux loss):
    {"y", "x" (its grad), parameter name: its grad (replicated ones summed over ranks)}, the
    layer's parameters and gradients checked to be float32 (the master dtype)."""
    x = X[lo:hi].clone().requires_grad_()
    y = layer(x)
    ((y * G[lo:hi]).sum() + layer.aux_loss).backward()
    assert y.dtype == torch.float32 and layer.experts.w1.dtype == torch.float32
    assert layer.experts.w1.grad.dtype == torch.float32
    mine = {"y": y, "x": x.grad}
    params = dict(layer.named_parameters())
    replicated = [n for n in params if not n.startswith("experts.")]
    summed = _sum_over_ranks(comm, torch.cat([params[n].grad.reshape(-1) for n in replicated]))
    for n, p in params.items():
        if n.startswith("experts."):
            mine[n] = p.grad
        else:
            mine[n], summed = summed[:p.numel()].view_as(p), summed[p.numel():]
    return mine


def _compare(mine: dict, ref: dict, layer, lo: int, hi: int, tol: str, what: str) -> float:
    """Every tensor of mine (_layer_grads) against the reference's whole-batch tensor (this
    rank's rows of y and x, its experts' slices) within TOL[tol]; the largest relative error."""
    el, eh = layer.rank * layer.e_local, (layer.rank + 1) * layer.e_local
    worst = 0.0
    for key, val in mine.items():
        r = ref[key]
        if key.startswith("experts."):
            r = r[el:eh]
        if key in ("y", "x"):
            r = r[lo:hi]
        worst = max(worst, _close(val, r, TOL[tol], f"{what} {key} vs {tol}"))
    return worst


def layouts(local_size: int | None = None, node_ids: list[int] | None = None, seed: int = 7,
            total: int = 61) -> dict:
    """Every scenario x variant on this layout: bf16-mixed and bf16-mixed + FP8 layers against
    the references (tolerances above); FP8's dispatch bytes = bf16's * fp8_row_bytes(H) / 2H,
    its combine bytes unchanged. Returns {"checks", "worst": {tolerance: measured max}}."""
    comm = pc.init(local_size=local_size, node_ids=node_ids)
    P, me = comm.size, comm.rank
    counts = _split(total, P)
    lo, hi = sum(counts[:me]), sum(counts[:me + 1])
    checks, worst = 0, {k: 0.0 for k in TOL}
    for name, kw in SCENARIOS.items():
        cfg = MoEConfig(**kw)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(total, cfg.hidden, generator=g)
        G = torch.randn(total, cfg.hidden, generator=g)
        refs = {"fp32": _run_ref(cfg, X, G, seed),
                "bf16-mixed": _run_ref(cfg, X, G, seed, precision="bf16-mixed"),
                "fp8": _run_ref(cfg, X, G, seed, precision="bf16-mixed", fp8_dispatch=True)}
        for variant in VARIANTS:
            stats = {}
            for fp8 in (False, True):
                layer = MoELayer(cfg, comm, seed=seed, precision="bf16-mixed",
                                 fp8_dispatch=fp8, **variant)
                mine = _layer_grads(layer, comm, X, G, lo, hi)
                stats[fp8] = layer.stats
                what = f"{name} {variant} fp8={fp8} rank {me}/{P}"
                pairs = [("same", refs["fp8" if fp8 else "bf16-mixed"]),
                         ("fp8" if fp8 else "bf16", refs["bf16-mixed" if fp8 else "fp32"])]
                for tol, ref in pairs:
                    worst[tol] = max(worst[tol], _compare(mine, ref, layer, lo, hi, tol, what))
                    checks += len(mine)
            h = cfg.hidden
            for key in ("bytes_dispatch", "bytes_combine"):
                assert stats[False][key] % (2 * h) == 0, (key, stats[False])
            rows = stats[False]["bytes_dispatch"] // (2 * h)
            assert stats[True]["bytes_dispatch"] == rows * fp8_row_bytes(h), (name, stats)
            assert stats[True]["bytes_combine"] == stats[False]["bytes_combine"], (name, stats)
            checks += 1
    return {"checks": checks, "worst": worst}


def scaled_layouts(local_size: int | None = None, node_ids: list[int] | None = None,
                   seed: int = 11, total: int = 53) -> dict:
    """FP8 dispatch with the scaled expert GEMMs (fp8_gemm="scaled", composed on CPU), every
    scenario x variant (dedup off / on, chunked C = 2) against ReferenceMoE with the same
    e4m3-rounded weights ("same" tolerance), and against the dequantize reference ("fp8":
    the weights' rounding on top). Returns {"checks", "worst"}."""
    comm = pc.init(local_size=local_size, node_ids=node_ids)
    counts = _split(total, comm.size)
    lo, hi = sum(counts[:comm.rank]), sum(counts[:comm.rank + 1])
    checks, worst = 0, {"same": 0.0, "fp8": 0.0}
    kw = {"precision": "bf16-mixed", "fp8_dispatch": True}
    for name, scenario in SCENARIOS.items():
        cfg = MoEConfig(**scenario)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(total, cfg.hidden, generator=g)
        G = torch.randn(total, cfg.hidden, generator=g)
        refs = {"same": _run_ref(cfg, X, G, seed, fp8_gemm="scaled", **kw),
                "fp8": _run_ref(cfg, X, G, seed, **kw)}
        for variant in VARIANTS:
            layer = MoELayer(cfg, comm, seed=seed, fp8_gemm="scaled", **kw, **variant)
            assert layer.fp8_gemm == "scaled"
            mine = _layer_grads(layer, comm, X, G, lo, hi)
            what = f"{name} {variant} scaled rank {comm.rank}/{comm.size}"
            for tol, ref in refs.items():
                worst[tol] = max(worst[tol], _compare(mine, ref, layer, lo, hi, tol, what))
                checks += len(mine)
    return {"checks": checks, "worst": worst}


def bytes_by_precision(local_size: int | None = None, seed: int = 3) -> dict:
    """layer.stats bytes of one forward in fp32, bf16-mixed and bf16-mixed + FP8, hidden
    512: {name: (bytes_dispatch, bytes_combine)} of this rank."""
    comm = pc.init(local_size=local_size)
    cfg = MoEConfig(hidden=512, ffn_hidden=64, num_experts=8, top_k=2)
    x = torch.randn(40, cfg.hidden, generator=torch.Generator().manual_seed(seed + comm.rank))
    out = {}
    for name, kw in {"fp32": {}, "bf16-mixed": {"precision": "bf16-mixed"},
                     "fp8": {"precision": "bf16-mixed", "fp8_dispatch": True}}.items():
        layer = MoELayer(cfg, comm, seed=seed, **kw)
        with torch.no_grad():
            layer(x)
        out[name] = (layer.stats["bytes_dispatch"], layer.stats["bytes_combine"])
    return out


def ppmoe_fp8(seed: int = 5) -> int:
    """PPMoE sequence-sharded: bf16-mixed + FP8 gather against bf16-mixed (FP8 tolerance)
    and bf16-mixed against fp32 (BF16 tolerance), outputs and input gradients."""
    comm = pc.init()
    cfg = MoEConfig(**SCENARIOS["softmax-shared"])
    g = torch.Generator().manual_seed(seed + comm.rank)
    x0 = torch.randn(13 + comm.rank, cfg.hidden, generator=g)
    out = {}
    for name, kw in {"fp32": {}, "bf16-mixed": {"precision": "bf16-mixed"},
                     "fp8": {"precision": "bf16-mixed", "fp8_dispatch": True}}.items():
        layer = MoELayer(cfg, comm, seed=seed, dispatcher="ppmoe", sequence_sharded=True,
                         **kw)
        x = x0.clone().requires_grad_()
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        out[name] = (y.detach(), x.grad, layer.stats)
    for i in (0, 1):
        _close(out["bf16-mixed"][i], out["fp32"][i], TOL["bf16"], f"ppmoe bf16 [{i}]")
        _close(out["fp8"][i], out["bf16-mixed"][i], TOL["fp8"], f"ppmoe fp8 [{i}]")
    h = cfg.hidden
    assert out["fp8"][2]["bytes_dispatch"] * 2 * h == (
        out["bf16-mixed"][2]["bytes_dispatch"] * fp8_row_bytes(h)), out
    assert out["bf16-mixed"][2]["bytes_dispatch"] * 2 == out["fp32"][2]["bytes_dispatch"]
    return 4
