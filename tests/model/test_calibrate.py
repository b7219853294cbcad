"""Calibration fits recover known parameters; the written platform loads."""

import dataclasses

import pytest
import yaml

from piper_moe.cli import calibrate
from piper_moe.resource_model import comm, load_platform
from piper_moe.resource_model.spec import LinkSpec


def test_fit_gemm_recovers_curve():
    a, half = 5e11, 64.0
    pts = [{"m": d, "n": 1024, "k": 1024, "flops_per_s": a * d / (d + half)}
           for d in (8, 32, 128, 512)]
    fa, fh = calibrate.fit_gemm(pts)
    assert fa == pytest.approx(a, rel=1e-6) and fh == pytest.approx(half, rel=1e-6)
    # a second dtype on the same curve: its asymptote alone, the half dimension given
    slow = [{**p, "flops_per_s": p["flops_per_s"] / 2.5} for p in pts]
    fa, fh = calibrate.fit_gemm(slow, half_dim=half)
    assert fa == pytest.approx(a / 2.5, rel=1e-9) and fh == half


@pytest.mark.parametrize("rates", [(1e6, 5e9, 6e9), (9e9, 7e9, 6e9)],
                         ids=["a slow first point", "falling rate"])
def test_fit_gemm_without_a_curve_takes_the_best_rate_for_every_dtype(rates):
    """Noisy short timings can rise faster than any saturating curve (a negative intercept)
    or fall with size (a negative slope): no curve, the best measured rate, and a second dtype
    fitted on that (flat) curve is treated alike."""
    pts = [{"m": d, "n": 128, "k": 128, "flops_per_s": r} for d, r in zip((8, 32, 64), rates)]
    assert calibrate.fit_gemm(pts) == (max(rates), 0.0)
    slow = [{**p, "flops_per_s": p["flops_per_s"] / 2} for p in pts]
    assert calibrate.fit_gemm(slow, half_dim=0.0) == (max(rates) / 2, 0.0)


def _timings(plat, n: int, g: int, node_rows: bool) -> list[dict]:
    """What the resource model predicts for flat and HALO on n ranks in nodes of g (and on one
    node's own communicator, marked with its layout, when node_rows), as calibrate records it."""
    layouts = [(n, g, {})] + ([(g, g, {"ranks": g, "ranks_per_node": g})] if node_rows else [])
    return [{"algorithm": algo, "block": block, "seconds": comm.all_to_all(block * k, k, h,
                                                                           plat, algo), **mark}
            for k, h, mark in layouts for algo in ("flat", "halo")
            for block in (1e3, 1e4, 1e5, 1e6)]


@pytest.mark.parametrize(("n", "g"), [(8, 4), (4, 4), (16, 2), (4, 1)])
def test_fit_a2a_recovers_alpha_beta_and_the_barrier(n, g):
    """Every parameter back from the model's own timings: on several nodes of several ranks
    with the node's own timings beside the job's (what calibrate measures there), on one node
    from the job's alone (the barrier priced apart from the intra latency: 35x it here)."""
    plat = dataclasses.replace(load_platform("cpu-host"),
                               intra=LinkSpec(latency=2e-6, bandwidth=4e9),
                               inter=LinkSpec(latency=3e-5, bandwidth=5e8), copy_bandwidth=8e9,
                               barrier_latency=7e-5)
    fit = calibrate.fit_a2a(_timings(plat, n, g, node_rows=1 < g < n), n, g, plat.copy_bandwidth)
    if g > 1:
        assert fit["latency_intra"] == pytest.approx(2e-6, rel=1e-6)
        assert fit["bandwidth_intra"] == pytest.approx(4e9, rel=1e-6)
        assert fit["latency_barrier"] == pytest.approx(7e-5, rel=1e-6)
    else:
        assert "latency_intra" not in fit and "latency_barrier" not in fit
    if n > g:
        assert fit["latency_inter"] == pytest.approx(3e-5, rel=1e-6)
        assert fit["bandwidth_inter"] == pytest.approx(5e8, rel=1e-6)
        assert "copy_bandwidth" not in fit  # charged at the measured rate, not fitted
    else:
        assert "latency_inter" not in fit


def test_fit_a2a_without_the_nodes_own_timings_charges_barriers_at_the_intra_latency():
    """Several nodes, the job's layout only (the files of earlier calibrations): the two
    latencies and the barrier cannot be told apart, so the barrier is one intra latency (the
    model the platform file then states with barrier_latency null) and the fit is exact when
    that is the truth."""
    plat = dataclasses.replace(load_platform("cpu-host"),
                               intra=LinkSpec(latency=2e-6, bandwidth=4e9),
                               inter=LinkSpec(latency=3e-5, bandwidth=5e8), copy_bandwidth=8e9)
    fit = calibrate.fit_a2a(_timings(plat, 8, 4, node_rows=False), 8, 4, plat.copy_bandwidth)
    assert "latency_barrier" not in fit
    assert fit["latency_intra"] == pytest.approx(2e-6, rel=1e-6)
    assert fit["latency_inter"] == pytest.approx(3e-5, rel=1e-6)


def test_measure_and_write_platform(tmp_path):
    gemm = {dtype: calibrate.measure_gemm(dims=(8, 64), width=128, iters=1, device="cpu",
                                          dtype=dtype) for dtype in calibrate.DTYPES}
    copy = calibrate.measure_copy(nbytes=2**20, iters=1, device="cpu")
    assert all(p["flops_per_s"] > 0 for pts in gemm.values() for p in pts)
    assert copy["copy_bandwidth"] > 0
    fit = {"latency_intra": 1e-6, "bandwidth_intra": 2e9, "latency_inter": 1e-5,
           "bandwidth_inter": float("inf")}
    attention = {dtype: calibrate.measure_attention(1, 2, 32, 16, iters=1, device="cpu",
                                                    dtype=dtype) for dtype in calibrate.DTYPES}
    op = calibrate.measure_op_overhead(iters=1)
    for measured in attention.values():
        # one timing each: under load the backward can time at or below 0 (then the base's
        # factor stays, test_a_noisy_attention_backward_keeps_the_base_factor)
        assert measured["flops_per_s"] > 0 and measured["backward_ratio"] >= 0, attention
    assert op["ops"] > 500 and 0 < op["op_overhead"] < 1e-3, op  # tiny-moe: ~1,000 per step
    data = calibrate.build_platform("cpu-host", "mine", gemm, copy, fit, attention, op)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    p = load_platform(str(path))
    assert p.name == "mine" and p.intra.bandwidth == 2e9
    assert p.inter.bandwidth == float("inf")  # latency-only fit: no size dependence
    assert comm.a2a_flat(1e6, 4, 1, p) == pytest.approx(3 * 1e-5)
    assert p.copy_bandwidth == copy["copy_bandwidth"]
    assert p.barrier_latency is None  # no barrier fitted: one intra latency
    path.write_text(yaml.safe_dump(calibrate.build_platform(
        "cpu-host", "mine", gemm, copy, {**fit, "latency_barrier": 5e-5}, attention, op)))
    assert load_platform(str(path)).barrier_latency == 5e-5
    path.write_text(yaml.safe_dump(data))
    assert p.op_overhead == op["op_overhead"]
    assert p.attention_flops == attention["bf16"]["flops_per_s"]
    base = load_platform("cpu-host")
    assert p.attention_backward == (attention["bf16"]["backward_ratio"]
                                    or base.attention_backward)
    assert p.attention_flops_fp32 == attention["fp32"]["flops_per_s"]
    assert p.attention_backward_fp32 == (attention["fp32"]["backward_ratio"]
                                         or base.attention_backward_fp32)
    # each peak is its dtype's fitted asymptote over the one efficiency curve
    for dtype, e in (("bf16", 2), ("fp32", 4)):
        half = calibrate.fit_gemm(gemm["bf16"])[1]
        rate = calibrate.fit_gemm(gemm[dtype], half)[0]
        assert p.peak(e) * p.gemm.max_efficiency == pytest.approx(rate, rel=1e-9), dtype


def test_model_gemm_shapes_are_the_layers_at_the_micro_batch():
    """tiny-moe, 4 x 64 tokens: its projections on 256 rows, an expert's on 256 * top_k / E."""
    from piper_moe.resource_model import load_model

    m = load_model("tiny-moe")
    shapes = calibrate.model_gemm_shapes(m, 4, 64)
    h, a = m.hidden, m.attention
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    assert (256, qkv, h) in shapes and (256, h, a.num_heads * a.head_dim) in shapes
    rows = 256 * m.moe.top_k // m.moe.num_experts
    assert (rows, 2 * m.moe.expert_ffn, h) in shapes and (rows, h, m.moe.expert_ffn) in shapes
    assert (256, m.moe.num_experts, h) in shapes  # the router


def test_fit_a2a_is_nonnegative_and_relative():
    # a latency-only truth plus noise that would drive an unconstrained 1/beta negative
    pts = [{"algorithm": "flat", "block": b, "seconds": 1e-3 * (1.1 if b < 1e5 else 1.0)}
           for b in (1e3, 1e4, 1e5, 1e6)]
    fit = calibrate.fit_a2a(pts, 2, 2)
    assert fit["bandwidth_intra"] == float("inf") and fit["latency_intra"] > 0
    # relative residuals: a 10 ms row does not drown a 0.1 ms row
    plat = dataclasses.replace(load_platform("cpu-host"), intra=LinkSpec(latency=1e-4,
                                                                         bandwidth=1e8))
    pts = [{"algorithm": "flat", "block": b, "seconds": comm.a2a_flat(2 * b, 2, 2, plat)}
           for b in (1e3, 1e6)]
    fit = calibrate.fit_a2a(pts, 2, 2)
    assert fit["latency_intra"] == pytest.approx(1e-4, rel=1e-6)


def test_a_noisy_attention_backward_keeps_the_base_factor():
    """forward + backward timed no slower than forward alone (noise): the written file keeps
    the base's attention_backward (a factor <= 0 would not load), and its rate is recorded."""
    gemm = {"bf16": [{"m": 8, "n": 1024, "k": 1024, "flops_per_s": 1e10}]}
    copy = {"copy_bandwidth": 1e9, "memory_bandwidth": 2e9}
    attention = {"bf16": {"flops_per_s": 3e10, "backward_ratio": 0.0},
                 "fp32": {"flops_per_s": 4e10, "backward_ratio": -0.5}}
    data = calibrate.build_platform("cpu-host", "noisy", gemm, copy, {}, attention, None)
    base = load_platform("cpu-host")
    assert data["attention_backward"] == base.attention_backward
    assert data["attention_backward_fp32"] == base.attention_backward_fp32
    assert data["attention_flops"] == 3e10 and data["attention_flops_fp32"] == 4e10
    assert data["peak_flops_fp32"] == base.peak_flops_fp32  # no fp32 GEMMs measured: the base's


@pytest.mark.parametrize(("bf16", "fp32"), [(30e9, 90e9), (300e9, 90e9), (96e9, 48e9)],
                         ids=["no bf16 units", "above both base peaks", "bf16 closer"])
def test_the_dtype_nearest_its_base_peak_sets_the_efficiency(bf16, fp32):
    """A CPU without bf16 units (bf16 GEMMs far below the base's bf16 peak, fp32 near its
    own): the efficiency comes from fp32, so its peak stays the base's and an fp32 run's MFU
    is not understated; each dtype's peak x efficiency is still its measured rate."""
    def points(rate):
        return [{"m": d, "n": 1024, "k": 1024, "flops_per_s": rate * d / (d + 32)}
                for d in (8, 64, 512)]

    base = load_platform("cpu-host")
    data = calibrate.build_platform("cpu-host", "mine", {"bf16": points(bf16),
                                                         "fp32": points(fp32)},
                                    {"copy_bandwidth": 1e9, "memory_bandwidth": 2e9}, {})
    eff = data["gemm"]["max_efficiency"]
    assert eff == pytest.approx(min(1.0, max(bf16 / base.peak(2), fp32 / base.peak(4))))
    assert data["peak_flops"] * eff == pytest.approx(bf16)
    assert data["peak_flops_fp32"] * eff == pytest.approx(fp32)
    assert data["peak_flops"] >= base.peak(2) or data["peak_flops_fp32"] >= base.peak(4)
