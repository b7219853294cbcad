"""Pipeline schedules: every list is complete and deadlock-free, and they differ as the papers
say (simulated with unit costs; free communication)."""

import pytest

from piper_moe.runtime.schedules import Action, build, simulate

CASES = [(1, 1), (1, 3), (2, 1), (2, 2), (2, 4), (2, 7), (3, 5), (4, 4), (4, 8), (4, 16),
         (8, 8)]


@pytest.mark.parametrize(("pp", "M"), CASES)
@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved"])
def test_valid(name, pp, M):
    vpp = 2 if name == "interleaved" else 1
    if name == "interleaved" and M % pp:
        with pytest.raises(ValueError, match="multiple of"):
            build(name, pp, M, vpp)
        return
    sched = build(name, pp, M, vpp)
    res = simulate(sched, pp * vpp)  # raises on deadlock or a missing/duplicated action
    assert 0.0 <= res.bubble < 1.0
    # 1F1B's point: rank r never holds more than pp - r micro-batches (GPipe holds all M)
    if name in ("1f1b", "zb-h1"):
        assert res.peak_in_flight == [min(pp - r, M) for r in range(pp)]
    if name == "gpipe":
        assert res.peak_in_flight == [M] * pp


def test_bubbles_shrink_as_published():
    pp, M = 4, 8
    f1 = simulate(build("1f1b", pp, M), pp, cost_f=1, cost_b=1, cost_w=1)
    zb = simulate(build("zb-h1", pp, M), pp, cost_f=1, cost_b=1, cost_w=1)
    il = simulate(build("interleaved", pp, M, 2), 2 * pp, cost_f=.5, cost_b=.5, cost_w=.5)
    gp = simulate(build("gpipe", pp, M), pp, cost_f=1, cost_b=1, cost_w=1)
    # 1F1B and GPipe: (pp - 1) (F + B + W) of bubble per rank
    assert f1.makespan == gp.makespan == M * 3 + (pp - 1) * 3
    # ZB-H1 moves W off the critical path: the warm-up bubble shrinks to (pp - 1) (F + B)
    assert zb.makespan == M * 3 + (pp - 1) * 2
    # interleaving with vpp chunks divides the bubble by vpp
    assert il.makespan == M * 3 + (pp - 1) * 3 / 2
    assert il.bubble < zb.bubble < f1.bubble


def test_zb_h1_runs_each_w_after_its_b():
    for acts in build("zb-h1", 4, 8):
        seen_b = set()
        for a in acts:
            if a.kind == "B":
                seen_b.add(a.mb)
            if a.kind == "W":
                assert a.mb in seen_b


def test_deadlock_is_reported():
    bad = [[Action("B", 0, 0), Action("F", 0, 0)]]
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(bad, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        build("pipedream", 2, 4)
    with pytest.raises(ValueError, match="vpp=1"):
        build("1f1b", 2, 4, vpp=2)


@pytest.mark.parametrize(("pp", "M"), [(2, 4), (4, 8), (8, 16)])
def test_resource_model_bubble_is_the_runtime_schedules(pp, M):
    """resource_model.pipeline.bubble (what the planner ranks by) equals the idle time of the
    action lists the runtime executes, under several F / B (input gradient) / W costs (a
    chunk of vpp 2 costs half)."""
    from piper_moe.resource_model import Strategy
    from piper_moe.resource_model.pipeline import bubble

    for f, b, w in ((1, 1, 1), (1, 1, .5), (1, 1.5, 1), (1, .5, 1), (2, 1, 1)):
        for name, vpp in (("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 2)):
            sim = simulate(build(name, pp, M, vpp), pp * vpp, cost_f=f / vpp, cost_b=b / vpp,
                           cost_w=w / vpp)
            s = Strategy(dp=1, tp=1, pp=pp, ep=1, vpp=vpp, micro_batch=1, global_batch=M,
                         seq_len=8, schedule=name)
            assert sim.makespan - M * (f + b + w) == pytest.approx(
                bubble(s, f, b + w, w)), (name, f, b, w)
