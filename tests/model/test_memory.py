"""Memory formulas, each against a hand-computed case."""

import dataclasses

import pytest

from piper_moe.resource_model import Strategy, load_model, load_platform
from piper_moe.resource_model.memory import (
    attention_activations,
    dense_mlp_activations,
    layer_activations,
    moe_activations,
    p2p_buffers,
    rank_params,
    stage_layer_kinds,
    stage_memory,
)
from piper_moe.resource_model.params import moe_layer_linears
from piper_moe.resource_model.pipeline import bubble, in_flight

TINY = load_model("tiny-moe")
CPU = load_platform("cpu-host")


def strat(**kw):
    base = dict(dp=1, tp=1, pp=1, ep=1, micro_batch=2, global_batch=2, seq_len=16)
    return Strategy(**{**base, **kw})


def test_routed_experts_split_by_ep_etp_never_tp():
    m = load_model("deepseek-v3")
    lin = moe_layer_linears(m)
    e1 = rank_params(lin, strat(dp=8, tp=1, ep=8, micro_batch=1, global_batch=8))[1]
    e8 = rank_params(lin, strat(dp=1, tp=8, ep=8, micro_batch=1, global_batch=1))[1]
    assert e1 == e8 == 256 / 8 * 3 * 7168 * 2048  # 32 experts of 3 x [7168, 2048]
    e_etp = rank_params(lin, strat(dp=1, tp=8, ep=4, etp=2, micro_batch=1, global_batch=1))[1]
    assert e_etp == 256 / 4 * 3 * 7168 * 2048 / 2
    d1 = rank_params(lin, strat(dp=8, tp=1, ep=8, micro_batch=1, global_batch=8))[0]
    d8 = rank_params(lin, strat(dp=1, tp=8, ep=8, micro_batch=1, global_batch=1))[0]
    replicated = 7168 * 1536 + 7168 * 576 + 7168 * 256  # q_down, kv_down, router
    assert d8 == pytest.approx((d1 - replicated) / 8 + replicated)


def test_weights_grads_optimizer_zero_stages():
    # tiny, one stage, bf16: 2 B weights, 4 B grads, 12 B Adam; dp=4, ep=2 -> edp=2
    dense = TINY.params_total - 3 * 8 * 3 * 128 * 64
    expert = 3 * 8 * 3 * 128 * 64 / 2  # 3 MoE layers, 8 experts over ep=2
    for zero in (0, 1, 2, 3):
        mem = stage_memory(TINY, CPU, strat(dp=4, ep=2, global_batch=8, zero=zero), 0)
        full = dense + expert
        shard = dense / 4 + expert / 2
        assert mem["optimizer"] == pytest.approx(12 * (full if zero == 0 else shard))
        assert mem["gradients"] == pytest.approx(4 * (shard if zero >= 2 else full))
        assert mem["weights"] == pytest.approx(2 * (shard if zero == 3 else full))


def test_dense_mlp_activations_by_hand():
    # T = 2*16 = 32 tokens, h = 128, f = 256, bf16: RMSNorm 3*T*h (input, normalised, output)
    # + SwiGLU 4*T*f elements
    assert dense_mlp_activations(TINY, strat()) == 2 * (3 * 32 * 128 + 4 * 32 * 256)
    # tp=2 with sequence parallelism halves both
    assert dense_mlp_activations(TINY, strat(tp=2, dp=1, global_batch=2)) == 2 * (
        3 * 32 * 128 + 4 * 32 * 256) / 2
    # selective recompute drops the norm output and the SiLU output
    assert dense_mlp_activations(TINY, strat(recompute="selective")) == 2 * (
        32 * 128 + 3 * 32 * 256)


def test_moe_buffers_padding_free_vs_capacity_by_hand():
    T, k, E, h = 32, 2, 8, 128
    free = moe_activations(TINY, strat())
    router = T * E * 4 + T * k * (8 + 8)
    rows = T * k
    dispatch = rows * (h * 2 + 16)
    combine = T * k * (2 * h * 2 + 4 + 16)  # rows in token order, rows * weights, w, 2 orders
    assert free["moe_buffers"] == router + dispatch + combine
    padded = moe_activations(TINY, strat(capacity_factor=1.5))
    assert padded["moe_buffers"] - free["moe_buffers"] == pytest.approx(0.5 * rows * (2 * h + 16))
    # expert FFN internals scale with the padded rows: 4 * R * f
    assert padded["activations"] - free["activations"] == pytest.approx(4 * 0.5 * rows * 64 * 2)


def test_attention_activations_gqa_by_hand():
    # tiny: a = 4 query heads, 2 KV heads, d = 32, h = 128, T = 32, bf16. The runtime repeats
    # K/V to all 4 heads before SDPA: norm 3*T*h + Q,K,V 3*T*a*d + output T*a*d, + fp32 LSE
    T, h, a, d = 32, 128, 4, 32
    want = 2 * (3 * T * h + 3 * T * a * d + T * a * d) + 4 * T * a
    assert attention_activations(TINY, strat()) == want


def test_p2p_buffers_by_hand():
    # pp=2, m=4, T=32, h=128, bf16: stage 0 sends 4 forward activations, stage 1 4 input grads
    s = strat(pp=2, global_batch=8)
    assert p2p_buffers(TINY, s, 0) == p2p_buffers(TINY, s, 1) == 4 * 32 * 128 * 2
    assert p2p_buffers(TINY, strat(), 0) == 0.0
    # pp=4 inner stage: both directions
    assert p2p_buffers(TINY, strat(pp=4, global_batch=8), 1) == 2 * 4 * 32 * 128 * 2
    # interleaved pp=2 vpp=2 (4 virtual stages), rank 0 holds 0 and 2: forward from both,
    # backward from 2 only -> 3 sends per micro-batch
    inter = strat(pp=2, vpp=2, schedule="interleaved", global_batch=8)
    assert p2p_buffers(TINY, inter, 0) == 3 * 4 * 32 * 128 * 2


def test_gradient_lifetime():
    big = dict(micro_batch=8, seq_len=256)  # activations (~13 MB) outweigh gradients (~4 MB)
    held = stage_memory(TINY, CPU, strat(**big, global_batch=8), 0)
    # one micro-batch: the peak is the first backward, before any gradient exists
    freed = stage_memory(TINY, CPU, strat(**big, global_batch=8), 0, persistent_grads=False)
    assert freed["gradients"] == 0 and held["gradients"] > 0
    assert freed["total"] == pytest.approx(held["total"] - held["gradients"])
    # 1F1B, 4 micro-batches on one stage: later backwards run with every gradient allocated
    s4 = strat(**big, global_batch=32)
    assert stage_memory(TINY, CPU, s4, 0, persistent_grads=False) == stage_memory(TINY, CPU, s4, 0)
    # GPipe: the first backward has all micro-batches in flight and no gradient
    g4 = strat(**big, global_batch=32, schedule="gpipe")
    assert stage_memory(TINY, CPU, g4, 0, persistent_grads=False)["gradients"] == 0
    # tiny batches: the end of the backward (every gradient, no activation) is the peak
    small = stage_memory(TINY, CPU, strat(), 0, persistent_grads=False)
    assert small["gradients"] == held["gradients"] and small["activations"] == 0


def test_full_recompute_keeps_layer_input():
    act = layer_activations(TINY, strat(recompute="full"), moe_layer=True)
    assert act == {"activations": 32 * 128 * 2, "moe_buffers": 0.0}


def test_in_flight_per_schedule():
    s = strat(pp=4, global_batch=16)  # m = 8
    assert [in_flight(s, st) for st in range(4)] == [4, 3, 2, 1]
    assert in_flight(dataclasses.replace(s, schedule="zb-h1"), 0) == 4
    assert in_flight(dataclasses.replace(s, schedule="gpipe"), 3) == 8
    inter = dataclasses.replace(s, schedule="interleaved", vpp=2)
    # Megatron warm-up: 2*(P-s-1) + (v-1)*P + 1 = 6 + 4 + 1 = 11 chunks of half a stage
    assert in_flight(inter, 0) == 5.5
    assert in_flight(inter, 3) == (0 + 4 + 1) / 2
    assert in_flight(strat(pp=4, global_batch=4), 0) == 2  # m = 2 caps it


def test_bubble_per_schedule():
    s = strat(pp=4, global_batch=16)
    assert bubble(s, 1.0, 2.0, 1.0) == 9.0  # (P-1)(F+B)
    # runtime/schedules.py's ZB-H1 under unit costs: 3 M + 2 (pp - 1), 2/3 of 1F1B's bubble
    assert bubble(dataclasses.replace(s, schedule="zb-h1"), 1.0, 2.0, 1.0) == 6.0
    inter = dataclasses.replace(s, schedule="interleaved", vpp=3)
    assert bubble(inter, 1.0, 2.0, 1.0) == 3.0
    assert bubble(strat(), 1.0, 2.0, 1.0) == 0.0


def test_uneven_pipeline_split():
    s = strat(pp=2, global_batch=4, layers_per_stage=(1, 3))
    assert stage_layer_kinds(TINY, s, 0) == (1, 0)
    assert stage_layer_kinds(TINY, s, 1) == (0, 3)
    even = strat(pp=2, global_batch=4)
    assert stage_layer_kinds(TINY, even, 0) == (1, 1)
    # stage 0 holds 2 micro-batches in flight, stage 1 one: activations follow
    m0 = stage_memory(TINY, CPU, s, 0)
    m1 = stage_memory(TINY, CPU, s, 1)
    assert m1["moe_buffers"] > 0 == m0["moe_buffers"]


def test_total_is_sum_and_includes_reserve():
    mem = stage_memory(TINY, CPU, strat(), 0)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    assert mem["reserved"] == CPU.memory_reserved


def test_zb_h1_holds_one_micro_batch_of_weight_output_gradients():
    """ZB-H1 on stages > 0: one micro-batch between B and W also holds dY of every weight
    (torch's split backward keeps them for the deferred W). Hand count for tiny-moe, pp=2,
    stage 1 = two MoE layers + head, T = 512 tokens, R = T*k = 1024 rows, fp32: per layer
    T*(q 128 + k 64 + v 64 + o 128) + T*router 8 + T*shared (128 + 128) + R*experts (128 + 128)
    = 593,920 elements; head logits T*V = 512*512 fp32."""
    base = dict(dp=1, tp=1, pp=2, ep=1, micro_batch=4, global_batch=16, seq_len=128,
                precision="fp32")
    zb = Strategy(**base, schedule="zb-h1")
    f1 = Strategy(**base, schedule="1f1b")
    per_layer = 512 * (128 + 64 + 64 + 128) + 512 * 8 + 512 * 256 + 1024 * 256
    expected = (2 * per_layer * 4) + 512 * 512 * 4
    assert expected == 5_799_936
    m_zb, m_f1 = (stage_memory(TINY, CPU, s, 1) for s in (zb, f1))
    assert m_zb["activations"] - m_f1["activations"] == pytest.approx(expected)
    assert stage_memory(TINY, CPU, zb, 0) == stage_memory(TINY, CPU, f1, 0)
