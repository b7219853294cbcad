"""The MoE formulas of piper_moe.resource_model.memory against the bytes a real MoELayer saves for
backward (mpirun, 2 ranks on one emulated node): the all-to-all layer, the chunked layer
keeping or re-dispatching its rows, and PPMoE."""

import dataclasses

import pytest

from piper_moe.resource_model import Strategy, load_model
from piper_moe.resource_model.memory import FP32, moe_layer_saved
from piper_moe.resource_model.spec import MoESpec
from tests.launch import run_mpi
from tests.model.layer_memory_cases import LAYER, TOKENS

pytestmark = pytest.mark.mpi

E = 4  # float32


def _model():
    tiny = load_model("tiny-moe")
    moe = MoESpec(num_experts=LAYER["num_experts"], top_k=LAYER["top_k"],
                  expert_ffn=LAYER["ffn_hidden"], num_shared_experts=1,
                  shared_expert_ffn=LAYER["ffn_hidden"], num_groups=LAYER["num_groups"],
                  top_groups=LAYER["topk_groups"])
    return dataclasses.replace(tiny, hidden=LAYER["hidden"], moe=moe)


def _layer_prediction(variant: str, rows: int) -> float:
    """moe_layer_saved for one rank of the 2-rank run: the expert rows R set to what this
    rank's experts received (expert_imbalance = R / (T_m k), at least 1: a rank that
    received fewer rows than average is predicted at the average,
    a few tenths of a percent high)."""
    model, ranks, k = _model(), 2, LAYER["top_k"]
    imbalance = max(1.0, rows / (TOKENS * k))
    fp8 = variant.endswith("-fp8-scaled")
    variant = variant.removesuffix("-fp8-scaled")
    precision = "bf16-mixed" if variant.endswith("-bf16-mixed") else "fp32"
    variant = variant.removesuffix("-bf16-mixed")
    common = dict(pp=1, micro_batch=1, global_batch=2, seq_len=TOKENS, precision=precision,
                  expert_imbalance=imbalance,
                  **({"fp8_dispatch": True, "fp8_gemm": "scaled"} if fp8 else {}))
    if variant == "ppmoe":  # the EP group is the TP group: each rank routes T / tp of T
        s = Strategy(dp=1, tp=ranks, ep=ranks, dispatcher="ppmoe", **{
            **common, "seq_len": TOKENS * ranks, "global_batch": 1})
    else:
        chunks = {"alltoall": {}, "chunks4-save": {"moe_chunks": 4},
                  "chunks4-recompute": {"moe_chunks": 4, "chunk_memory": "recompute"}}[variant]
        s = Strategy(dp=ranks, tp=1, ep=ranks, **common, **chunks)
    return moe_layer_saved(model, s)


def test_hand_checked_terms():
    """Hand-derived bytes (T_m = 512 tokens, k = 4, h = 256, f = 128, E = 16, float32,
    balanced: R = N = 2048): what each variant keeps beyond the shared expert and the layer
    input (4*T_m*f*e + T_m*h*e)."""
    T, k, h, f, nE = TOKENS, 4, 256, 128, 16
    R = N = T * k
    base = 4 * T * f * E + T * h * E
    router = T * nE * FP32 + N * (8 + 2 * FP32)
    combine = N * (2 * h * E + FP32 + 16)
    assert _layer_prediction("alltoall", R) == pytest.approx(
        base + router + R * (h * E + 16) + 4 * R * f * E + combine, rel=1e-12)
    assert _layer_prediction("chunks4-save", R) == pytest.approx(
        base + router + R * (h * E + 32) + combine, rel=1e-12)
    assert _layer_prediction("chunks4-recompute", R) == pytest.approx(
        base + router + R * 32 + combine, rel=1e-12)
    G = 2 * T  # the group's tokens, all routed on every rank of the PPMoE group
    assert _layer_prediction("ppmoe", R) == pytest.approx(
        base + G * (nE * FP32 + k * (8 + 2 * FP32) + h * E) + R * (h * E + 16)
        + 4 * R * f * E + R * (2 * h * E + FP32), rel=1e-12)


def test_bf16_mixed_terms():
    """bf16-mixed (fp32 weights, bf16 compute): the layer input stays fp32 (the router reads
    it) and its bf16 copy feeds the shared expert; rows, FFN internals and expert outputs are
    bf16, the weighted product fp32; the bf16 copies of this rank's 8 experts' and the shared
    expert's weights are kept."""
    T, k, h, f, nE = TOKENS, 4, 256, 128, 16
    R = N = T * k
    e, r = 2, 4
    base = T * h * r + T * h * e + 4 * T * f * e
    router = T * nE * FP32 + N * (8 + 2 * FP32)
    combine = N * (h * e + h * r + FP32 + 16)
    copies = (nE // 2 + 1) * 3 * h * f * 2
    assert _layer_prediction("alltoall-bf16-mixed", R) == pytest.approx(
        base + router + R * (h * e + 16) + 4 * R * f * e + combine + copies, rel=1e-12)


def test_formulas_match_the_layer():
    """Within 3% on every rank (the plan's int64 row maps of the chunked layer live on
    autograd's ctx, which the saved-tensor hooks do not see: 32 bytes per row, < 1%)."""
    run = run_mpi(2, "model.layer_memory_cases:saved", {"local_size": 2})
    for rank, r in enumerate(run.ranks):
        for variant, m in r["result"].items():
            pred = _layer_prediction(variant, m["rows"])
            assert abs(pred / m["saved"] - 1) < 0.03, (
                f"rank {rank} {variant}: predicted {pred / 2**20:.3f} MiB, saved "
                f"{m['saved'] / 2**20:.3f} MiB ({m})")
        assert r["result"]["chunks4-save"]["chunks"] == 4
        assert r["result"]["chunks4-recompute"]["chunk_memory"] == "recompute"


def test_scaled_fp8_terms():
    """bf16-mixed with FP8 dispatch and scaled expert GEMMs keeps the expert input rows as the
    delivered e4m3 rows + a float32 scale per 128 (h + 4 h/128 bytes instead of 2h) and this
    rank's 8 experts' [w1 | w3] as e4m3 + scales (1 + 4/128 bytes instead of 2)."""
    T, k, h, f, nE = TOKENS, 4, 256, 128, 16
    R = T * k
    drop = (_layer_prediction("alltoall-bf16-mixed", R)
            - _layer_prediction("alltoall-bf16-mixed-fp8-scaled", R))
    assert drop == pytest.approx(R * (2 * h - (h + 4 * h // 128))
                                 + nE // 2 * h * 2 * f * (2 - (1 + 4 / 128)), rel=1e-12)
