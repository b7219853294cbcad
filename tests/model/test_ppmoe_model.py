"""PPMoE vs all-to-all communication model against hand-computed values, and its planner hook."""

import dataclasses

import pytest

from piper_moe.resource_model import Strategy, estimate, load_model, load_platform, plan
from piper_moe.resource_model import dispatch_cost as pm
from piper_moe.resource_model.memory import stage_layer_kinds
from piper_moe.resource_model.planner import candidates
from piper_moe.resource_model.spec import LinkSpec

PLAT = dataclasses.replace(load_platform("cpu-host"), intra=LinkSpec(latency=1e-6, bandwidth=1e9),
                           inter=LinkSpec(latency=1e-5, bandwidth=1e8))
TINY = load_model("tiny-moe")


def test_ppmoe_vs_a2a_by_hand():
    # T = 1024 tokens of h = 512 in bf16: S = 2^20 bytes, a TP group of g = 4 in one node.
    # all-reduce: 2 (g-1) (a + S/g/b) = 6 (1e-6 + 262144/1e9) = 1.578864e-3 s
    assert pm.ppmoe_time(1024, 512, 2, 4, PLAT) == pytest.approx(1.578864e-3)
    assert pm.ppmoe_time(1024, 512, 2, 4, PLAT, sequence_sharded=True) == pytest.approx(
        1.578864e-3)  # all-gather + reduce-scatter: the same two ring passes
    assert pm.ppmoe_bytes(1024, 512, 2, 4) == 2 * 3 / 4 * 2**20 == 1572864
    # all-to-all, T/g = 256 tokens per rank, top_k 2: m = 256*2*512*2 = 524288 bytes per rank;
    # flat in one node, dispatch + combine: 2 * 3 (1e-6 + 131072/1e9) = 7.92432e-4 s
    assert pm.a2a_time(256, 2, 512, 2, 4, 4, PLAT) == pytest.approx(7.92432e-4)
    assert pm.a2a_bytes(256, 2, 512, 2, 4) == 786432  # = ppmoe bytes * top_k / g
    # top_k == g: the same bytes and time; top_k 8 > g: 6 (1e-6 + 524288/1e9) = 3.151728e-3 s
    assert pm.a2a_time(256, 4, 512, 2, 4, 4, PLAT) == pytest.approx(1.578864e-3)
    assert pm.a2a_time(256, 8, 512, 2, 4, 4, PLAT) == pytest.approx(3.151728e-3)
    assert pm.ppmoe_time(1024, 512, 2, 1, PLAT) == 0.0 == pm.ppmoe_bytes(1024, 512, 2, 1)
    with pytest.raises(ValueError, match="must fit one node"):
        pm.ppmoe_time(1024, 512, 2, 16, PLAT)


def test_strategy_validation():
    base = {"dp": 1, "pp": 1, "micro_batch": 1, "global_batch": 2, "seq_len": 128}
    Strategy(tp=4, ep=4, dispatcher="ppmoe", **base)
    with pytest.raises(ValueError, match=r"dispatcher must be one of"):
        Strategy(tp=4, ep=4, dispatcher="ring", **base)
    for kw in ({"tp": 1, "ep": 1}, {"tp": 4, "ep": 2},
               {"tp": 4, "ep": 4, "etp": 4, "dp": 4, "global_batch": 4},
               {"tp": 4, "ep": 4, "sequence_parallel": False}):
        with pytest.raises(ValueError, match=r"'ppmoe' needs tp > 1, ep == tp"):
            Strategy(dispatcher="ppmoe", **{**base, **kw})


def test_estimate_replaces_a2a_by_the_tp_sum():
    s = Strategy(dp=1, tp=4, pp=1, ep=4, micro_batch=2, global_batch=4, seq_len=128)
    a2a = estimate(TINY, PLAT, s)
    pp = estimate(TINY, PLAT, dataclasses.replace(s, dispatcher="ppmoe"))
    _, n_moe = stage_layer_kinds(TINY, s, 0)
    e = 2  # bf16 activations
    # all-to-all: per MoE layer and micro-batch, forward + backward of dispatch + combine of
    # T/tp = 64 tokens per rank
    one = pm.a2a_time(2 * 128 / 4, 2, 128, e, 4, 4, PLAT)
    assert a2a.time["a2a"] == pytest.approx(s.num_micro * n_moe * 2 * one)
    # PPMoE: no all-to-all; its all-gather + reduce-scatter is the MoE block's TP collective
    assert pp.time["a2a"] == 0
    assert pp.time["tp_comm"] == pytest.approx(a2a.time["tp_comm"])
    assert pp.time["compute"] == a2a.time["compute"]
    assert pp.time["step"] < a2a.time["step"]


def test_planner_weighs_ppmoe():
    gen = list(candidates(TINY, PLAT, 4, global_batch=8, seq_len=128))
    pp = [s for s in gen if s.dispatcher == "ppmoe"]
    assert pp and all(s.ep == s.tp > 1 and s.etp == 1 for s in pp)
    # every (tp, ep == tp, etp 1) point is offered with both dispatchers
    both = {(s.tp, s.pp, s.micro_batch, s.recompute, s.schedule) for s in pp}
    assert both <= {(s.tp, s.pp, s.micro_batch, s.recompute, s.schedule) for s in gen
                    if s.dispatcher == "alltoall" and s.ep == s.tp and s.etp == 1}
    best = plan(TINY, PLAT, 4, global_batch=8, seq_len=128, top=50).plans
    assert any(e.strategy.dispatcher == "ppmoe" for e in best)
