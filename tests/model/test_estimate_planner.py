"""estimate(), plan() and the planner CLI."""

import dataclasses
import json

import pytest

from piper_moe.cli import plan as plan_cli
from piper_moe.resource_model import Strategy, estimate, load_model, load_platform, plan
from piper_moe.resource_model.estimate import TIME_KEYS

V3 = load_model("deepseek-v3")
H100 = load_platform("dgx-h100")
V3_STRAT = Strategy(dp=8, tp=8, pp=16, ep=64, micro_batch=1, global_batch=1024, seq_len=4096,
                    recompute="full")


def test_estimate_shape_and_consistency():
    e = estimate(V3, H100, V3_STRAT)
    assert e.time["step"] == pytest.approx(sum(e.time[k] for k in TIME_KEYS))
    assert e.memory["total"] == pytest.approx(
        sum(v for k, v in e.memory.items() if k != "total"))
    assert e.fits == (e.memory["total"] <= H100.device_memory)
    assert 0 < e.mfu < 1
    assert e.bottleneck in (*TIME_KEYS, "memory")
    assert e.time["bubble"] > 0 and e.time["a2a"] > 0 and e.time["dp_comm"] > 0


def test_no_pp_no_bubble_no_ep_no_a2a():
    e = estimate(load_model("tiny-moe"), load_platform("cpu-host"),
                 Strategy(dp=2, tp=1, pp=1, ep=1, micro_batch=1, global_batch=4, seq_len=128))
    assert e.time["bubble"] == 0 and e.time["a2a"] == 0 and e.time["pp_comm"] == 0


def test_too_big_does_not_fit():
    e = estimate(V3, H100, Strategy(dp=8, tp=1, pp=1, ep=8, micro_batch=1, global_batch=8,
                                    seq_len=4096))
    assert not e.fits and e.bottleneck == "memory"


def test_recompute_trades_memory_for_time():
    none = estimate(V3, H100, dataclasses.replace(V3_STRAT, recompute="none"))
    full = estimate(V3, H100, V3_STRAT)
    assert full.memory["activations"] < none.memory["activations"]
    assert full.time["recompute"] > 0 == none.time["recompute"]
    assert full.time["step"] > none.time["step"]


def test_overlap_hides_a2a():
    plain = estimate(V3, H100, V3_STRAT)
    hidden = estimate(V3, H100, dataclasses.replace(V3_STRAT, overlap_a2a=True))
    assert hidden.time["a2a"] < plain.time["a2a"]
    assert hidden.time["step"] < plain.time["step"]


def test_halo_wins_for_small_blocks_across_nodes():
    # EP over 32 nodes (stride etp=8 -> one rank per node... use tp=1): ep=256 over 32 nodes,
    # micro_batch 1: 4096*8/256 rows of 7168 bf16 per peer ~ 1.8 MB (bandwidth-bound) vs
    # a short sequence (latency-bound)
    s = Strategy(dp=256, tp=1, pp=1, ep=256, micro_batch=1, global_batch=256, seq_len=128,
                 recompute="full")
    flat = estimate(V3, H100, s)
    halo = estimate(V3, H100, dataclasses.replace(s, a2a="halo"))
    assert halo.time["a2a"] < flat.time["a2a"]


def test_plan_ranks_fitting_strategies():
    r = plan(load_model("deepseek-v2-lite"), H100, 16, top=3)
    assert 0 < len(r.plans) <= 3 and r.num_fit >= len(r.plans)
    steps = [e.time["step"] for e in r.plans]
    assert steps == sorted(steps)
    assert all(e.fits for e in r.plans)
    assert r.num_candidates == r.num_valid + sum(
        v for k, v in r.rejected.items() if k != "does not fit")


def test_plan_cli_json(tmp_path, capsys):
    out = tmp_path / "plans.json"
    rc = plan_cli.main(["--model", "tiny-moe", "--platform", "cpu-host", "--gpus", "8",
                        "--top", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "#1" in text and "bottleneck" in text and "memory GiB" in text
    data = json.loads(out.read_text())
    assert len(data["plans"]) == 2 and data["plans"][0]["strategy"]["dp"] * data["plans"][0][
        "strategy"]["tp"] * data["plans"][0]["strategy"]["pp"] == 8


# -- the chunked MoE layer (moe_chunks, chunk_memory)
TINY = load_model("tiny-moe")
CPU = load_platform("cpu-host")
TINY_EP = dict(dp=4, tp=1, pp=1, ep=4, micro_batch=2, global_batch=16, seq_len=128)


def test_chunked_layer_time_terms():
    """The chunked layer recomputes its experts in backward (recompute grows by exactly the
    routed experts' forward GEMM time per MoE layer and micro-batch) and "recompute" adds one
    dispatch exchange in backward, a quarter of an unchunked layer's four exchanges when one
    piece is latency-free."""
    from piper_moe.resource_model.compute import routed_expert_gemm_time
    from piper_moe.resource_model.memory import stage_layer_kinds

    base = Strategy(**TINY_EP)
    save = dataclasses.replace(base, moe_chunks=4)
    redo = dataclasses.replace(save, chunk_memory="recompute")
    e0, e1, e2 = (estimate(TINY, CPU, s) for s in (base, save, redo))
    n_moe = stage_layer_kinds(TINY, base, 0)[1]
    X = routed_expert_gemm_time(TINY, CPU, save)
    assert e1.time["recompute"] - e0.time["recompute"] == pytest.approx(
        base.num_micro * n_moe * X, rel=1e-9)
    assert e2.time["a2a"] > e1.time["a2a"]
    # no latency: C pieces cost one exchange, so recompute's extra dispatch is a2a0 / 4
    flat = dataclasses.replace(CPU, intra=dataclasses.replace(CPU.intra, latency=0.0),
                               inter=dataclasses.replace(CPU.inter, latency=0.0))
    a0, a1, a2 = (estimate(TINY, flat, s).time["a2a"] for s in (base, save, redo))
    assert a2 - a1 == pytest.approx(a0 / 4, rel=1e-9)


def test_chunked_layer_memory_terms():
    """Chunking drops the experts' FFN internals (4 R f per MoE layer, bf16 activations: 2
    bytes; one micro-batch in flight without PP); "recompute" and "offload" also drop the kept
    rows (R h)."""
    from piper_moe.resource_model.memory import shapes, stage_layer_kinds, stage_memory

    base = Strategy(**TINY_EP)
    save = dataclasses.replace(base, moe_chunks=4)
    redo = dataclasses.replace(save, chunk_memory="recompute")
    off = dataclasses.replace(save, chunk_memory="offload")
    m0, m1, m2, m3 = (stage_memory(TINY, CPU, s, 0) for s in (base, save, redo, off))
    n_moe, e = stage_layer_kinds(TINY, base, 0)[1], 2
    R = shapes(TINY, base).expert_rows
    f, h = TINY.moe.expert_ffn, TINY.hidden
    assert m0["activations"] - m1["activations"] == pytest.approx(n_moe * 4 * R * f * e)
    assert m1["moe_buffers"] - m2["moe_buffers"] == pytest.approx(n_moe * R * h * e)
    assert m3["moe_buffers"] == m2["moe_buffers"]
    with pytest.raises(ValueError, match="moe_chunks"):
        Strategy(dp=2, tp=2, pp=1, ep=2, micro_batch=1, global_batch=2, seq_len=64,
                 dispatcher="ppmoe", moe_chunks=2)
    with pytest.raises(ValueError, match="chunk_memory"):
        dataclasses.replace(save, chunk_memory="disk")


def test_planner_falls_back_to_the_chunked_layer_when_memory_is_short():
    """On a device just too small for every unchunked plan, the planner still finds plans: the
    chunked layer's (re-dispatching its rows where keeping them does not fit)."""
    from piper_moe.resource_model.memory import memory
    from piper_moe.resource_model.planner import candidates

    kw = dict(global_batch=16, seq_len=128)
    smallest = min(memory(TINY, CPU, s)[0]["total"] for s in candidates(TINY, CPU, 4, **kw)
                   if s.moe_chunks == 1 and s.ep > 1 and s.recompute == "none")
    tight = dataclasses.replace(CPU, device_memory=smallest - 1)
    res = plan(TINY, tight, 4, top=50, **kw)
    ep_plans = [p for p in res.plans if p.strategy.ep > 1 and p.strategy.recompute == "none"]
    assert ep_plans and all(p.strategy.moe_chunks > 1 for p in ep_plans)
    assert "chunks=4/" in plan_cli.describe(ep_plans[0].strategy)


def test_scaled_fp8_expert_gemms():
    """fp8_gemm: on an FP8 platform "auto" is "scaled": the experts' up projections run
    forward at the FP8 peak (the backward stays bf16: the compute term drops by exactly the
    forward seconds saved, once per MoE layer and micro-batch), and their weights are kept as
    e4m3 + scales instead of bf16 copies; without an FP8 peak "auto" changes nothing."""
    from piper_moe.resource_model.compute import layer_compute
    from piper_moe.resource_model.memory import (
        moe_layer_linears,
        rank_params,
        stage_layer_kinds,
        weight_copies,
    )
    from piper_moe.resource_model.strategy import resolve_fp8_gemm

    base = dataclasses.replace(V3_STRAT, precision="bf16-mixed", fp8_dispatch=True)
    runs = {g: dataclasses.replace(base, fp8_gemm=g) for g in ("auto", "scaled", "dequantize")}
    est = {g: estimate(V3, H100, s) for g, s in runs.items()}
    assert est["auto"].time == est["scaled"].time
    saved = layer_compute(V3, H100, runs["scaled"], True).fp8_saved
    assert saved > 0 and layer_compute(V3, H100, runs["dequantize"], True).fp8_saved == 0
    drop = est["dequantize"].time["compute"] - est["scaled"].time["compute"]
    n_moe = max(stage_layer_kinds(V3, base, st)[1] for st in range(base.pp))
    assert drop == pytest.approx(base.num_micro * n_moe * saved, rel=1e-9)
    # memory: the up projections' bf16 copies (2 bytes) become e4m3 + scales (1 + 4/128)
    moe = moe_layer_linears(V3)
    s_fp8, s_bf16 = (resolve_fp8_gemm(V3, H100, runs[g]) for g in ("auto", "dequantize"))
    assert s_fp8.fp8_gemm == "scaled" and s_bf16.fp8_gemm == "dequantize"
    up = [lin for lin in moe if lin.name == "expert_up"]
    up_params = sum(rank_params(tuple(up), base))
    assert weight_copies(moe, s_bf16) - weight_copies(moe, s_fp8) == pytest.approx(
        up_params * (2 - (1 + 4 / 128)))
    assert est["scaled"].memory["total"] < est["dequantize"].memory["total"]
    # no FP8 peak (Frontier's MI250X): auto is dequantize, the estimate unchanged
    frontier = load_platform("frontier")
    assert H100.peak_flops_fp8 and frontier.peak_flops_fp8 is None
    assert (estimate(V3, frontier, runs["auto"]).time
            == estimate(V3, frontier, runs["dequantize"]).time)
    with pytest.raises(ValueError, match="fp8_gemm 'scaled' needs fp8_dispatch"):
        dataclasses.replace(V3_STRAT, precision="bf16-mixed", fp8_gemm="scaled")
