"""Model/platform loading, parameter counts (hand-checked and published), Strategy validation."""

import dataclasses

import pytest

from piper_moe.resource_model import Strategy, load_model, load_platform
from piper_moe.resource_model.spec import model_from_dict, platform_from_dict, shipped


def test_every_shipped_file_loads():
    assert set(shipped("models")) >= {"deepseek-v3", "deepseek-v2-lite", "deepseek-moe-16b",
                                      "mixtral-8x7b", "qwen3-30b-a3b", "tiny-moe"}
    assert set(shipped("platforms")) >= {"frontier", "dgx-h100", "cpu-host"}
    for name in shipped("models"):
        assert load_model(name).params_total > load_model(name).params_active > 0
    for name in shipped("platforms"):
        p = load_platform(name)
        assert 0 < p.usable_memory < p.device_memory


def test_unknown_name_lists_known():
    with pytest.raises(FileNotFoundError, match="tiny-moe"):
        load_model("no-such-model")


def test_unknown_key_is_named():
    m = dataclasses.asdict(load_model("tiny-moe"))
    m["hiddden"] = 3
    with pytest.raises(ValueError, match="hiddden"):
        model_from_dict(m)


def test_platform_barrier_latency():
    data = dataclasses.asdict(load_platform("cpu-host"))
    assert data["barrier_latency"] is None  # none given: the model charges one intra latency
    assert platform_from_dict({**data, "barrier_latency": "5e-6"}).barrier_latency == 5e-6
    with pytest.raises(ValueError, match="barrier_latency"):
        platform_from_dict({**data, "barrier_latency": -1.0})


@pytest.mark.parametrize(("key", "value"), [("op_overhead", -1e-6), ("attention_flops", 0.0),
                                            ("attention_backward", 0.0),
                                            ("peak_flops_fp32", 0.0),
                                            ("attention_flops_fp32", -1.0),
                                            ("attention_backward_fp32", 0.0)])
def test_platform_host_costs_are_checked(key, value):
    data = dataclasses.asdict(load_platform("cpu-host"))
    with pytest.raises(ValueError, match=key):
        platform_from_dict({**data, key: value})
    for name in ("dgx-h100", "frontier"):  # GPU platforms: host dispatch not modelled
        assert load_platform(name).op_overhead == 0.0


def test_tiny_param_counts_by_hand():
    # h=128, V=512, 4 heads x 32 (2 KV heads), dense f=256, 8 experts f=64 top-2, 1 shared f=64
    attn = 128 * 128 + 2 * 128 * 64 + 128 * 128  # q, k, v, o = 49152
    norms = 2 * 128
    dense_layer = attn + 3 * 128 * 256 + norms  # 147712
    expert = 3 * 128 * 64  # 24576
    moe_layer = attn + 128 * 8 + expert + 8 * expert + norms  # 271616
    total = dense_layer + 3 * moe_layer + 2 * 512 * 128 + 128
    active = dense_layer + 3 * (attn + 128 * 8 + expert + 2 * expert + norms) + 2 * 512 * 128 + 128
    m = load_model("tiny-moe")
    assert m.params_total == total == 1_093_760
    assert m.params_active == active == 651_392
    assert m.params_active_no_embedding == active - 512 * 128


@pytest.mark.parametrize(("name", "total", "active", "tol"), [
    ("mixtral-8x7b", 46.7e9, 12.9e9, 0.01),      # Mistral AI: 46.7B total, 12.9B active
    ("deepseek-v3", 671e9, None, None),          # arXiv 2412.19437: 671B total
    ("deepseek-moe-16b", 16.4e9, 2.8e9, 0.02),   # arXiv 2401.06066
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 0.02),      # model card (3.35B, published truncated)
    ("deepseek-v2-lite", 15.7e9, None, None),    # arXiv 2405.04434
])
def test_published_counts(name, total, active, tol):
    # totals within 1%; active counts are published with two significant digits
    m = load_model(name)
    assert abs(m.params_total / total - 1) < 0.01
    if active is not None:
        assert abs(m.params_active / active - 1) < tol


def test_deepseek_v3_active():
    # DeepSeek counts activated parameters without the input embedding; the published "37B" is
    # rounded to two digits: 36.63B (no embedding) rounds to it, 37.55B (all) does not.
    m = load_model("deepseek-v3")
    assert round(m.params_active_no_embedding / 1e9) == 37
    assert abs(m.params_active_no_embedding / 37e9 - 1) < 0.011
    assert abs(m.params_active / 37e9 - 1) < 0.016
    assert abs(load_model("mixtral-8x7b").params_active / 12.9e9 - 1) < 0.01


BASE = dict(dp=4, tp=2, pp=2, ep=4, micro_batch=1, global_batch=16, seq_len=128)


def test_strategy_derived_sizes():
    s = Strategy(**BASE)
    assert (s.world, s.edp, s.num_micro, s.sp) == (16, 2, 4, 2)
    assert s.stage_layers(5) == (3, 2)


@pytest.mark.parametrize(("change", "pattern"), [
    ({"ep": 3}, r"ep \(3\) x etp \(1\) must divide dp \(4\) x tp \(2\)"),
    ({"global_batch": 10}, r"global_batch \(10\).*micro_batch \(1\).*dp \(4\)"),
    ({"zero": 4}, r"zero must be 0, 1, 2 or 3 \(got 4\)"),
    ({"recompute": "some"}, r"recompute must be one of .* \(got 'some'\)"),
    ({"vpp": 2}, r"vpp \(2\) > 1 needs schedule 'interleaved'"),
    ({"tp": 0}, r"tp must be a positive int \(got 0\)"),
    ({"layers_per_stage": (4,)}, r"layers_per_stage \(4,\) must have pp \(2\) entries"),
])
def test_strategy_errors_name_values(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        Strategy(**{**BASE, **change})


def test_strategy_model_checks():
    m = load_model("tiny-moe")
    with pytest.raises(ValueError, match=r"ep \(16\) must divide num_experts \(8\)"):
        Strategy(**{**BASE, "dp": 8, "ep": 16, "global_batch": 32}).check(m)
    with pytest.raises(ValueError, match=r"sums to 5, the model has 4 layers"):
        Strategy(**{**BASE, "layers_per_stage": (3, 2)}).check(m)


def test_deepseek_v3_active_hand_count():
    # DeepSeek-V3 config.json: hidden 7168, 61 layers (first 3 dense, ffn 18432), MLA with
    # q_lora 1536, kv_lora 512, 128 heads, qk_nope 128 + qk_rope 64, v 128; 256 routed experts
    # (8 active) + 1 shared of ffn 2048, router with a per-expert bias; vocab 129280, untied.
    h, heads, nope, rope, v = 7168, 128, 128, 64, 128
    attn = (h * 1536 + 1536 + 1536 * heads * (nope + rope)  # q down, its norm, q up
            + h * (512 + rope) + 512 + 512 * heads * (nope + v)  # kv down (+ k rope), norm, up
            + heads * v * h)  # output projection
    norms = 2 * h
    swiglu = 3 * h  # parameters per unit of ffn width
    dense = swiglu * 18432
    moe = swiglu * 2048 * (1 + 8) + 256 * h + 256  # shared + 8 routed + router weight and bias
    head = 129280 * h
    want = 61 * (attn + norms) + 3 * dense + 58 * moe + h + head
    assert want == 36_625_618_432
    m = load_model("deepseek-v3")
    assert m.params_active_no_embedding == want
    # "37B" is two significant digits (36.5B-37.5B); the exact count is 1.01% under 37e9, so
    # the 1% target on the rounded figure is missed by the rounding, not by the formula
    assert round(want / 1e9) == 37 and abs(want / 37e9 - 1) < 0.0102
