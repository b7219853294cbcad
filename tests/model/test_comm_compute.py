"""Alpha-beta communication and compute formulas against hand-computed values."""

import dataclasses

import numpy as np
import pytest

from piper_comm import cost
from piper_moe.resource_model import comm, load_model, load_platform
from piper_moe.resource_model.compute import gemm_efficiency, gemm_time, model_flops_per_token
from piper_moe.resource_model.spec import GemmSpec, LinkSpec

PLAT = dataclasses.replace(
    load_platform("cpu-host"),
    intra=LinkSpec(latency=1e-6, bandwidth=1e9), inter=LinkSpec(latency=1e-5, bandwidth=1e8),
    copy_bandwidth=1e10, peak_flops=1e12, peak_flops_fp32=None, hbm_bandwidth=1e11,
    gemm=GemmSpec(max_efficiency=0.5, half_dim=100.0, launch_overhead=0.0))


def test_per_node():
    assert comm.per_node(8, 1, 8) == 8
    assert comm.per_node(16, 2, 8) == 4
    assert comm.per_node(64, 8, 8) == 1
    assert comm.per_node(4, 1, 8) == 4


def test_a2a_flat_and_halo_by_hand():
    # 8 ranks, 4 per node (2 nodes), 8 MB per rank -> 1 MB per peer; the barrier defaults to
    # one intra-node latency
    flat = 3 * (1e-6 + 1e6 / 1e9) + 4 * (1e-5 + 1e6 / 1e8)
    assert comm.a2a_flat(8e6, 8, 4, PLAT) == pytest.approx(flat)
    # 2 barriers, pack 8 MB, one 4 MB message to the other node, copy out 4 MB
    halo = 2 * 1e-6 + 8e6 / 1e10 + (1e-5 + 4e6 / 1e8) + 4e6 / 1e10
    assert comm.a2a_halo(8e6, 8, 4, PLAT) == pytest.approx(halo)
    assert halo < flat  # copies 10x faster than the intra link: HALO's 12 MB beat flat's 3 MB
    slow_copy = dataclasses.replace(PLAT, copy_bandwidth=1e9)
    assert comm.a2a_flat(8e6, 8, 4, slow_copy) < comm.a2a_halo(8e6, 8, 4, slow_copy)
    # 8 kB per rank -> 1 kB per peer: latency-bound, HALO's 1 network message wins over 4
    assert comm.a2a_halo(8e3, 8, 4, slow_copy) < comm.a2a_flat(8e3, 8, 4, slow_copy)
    assert comm.a2a_halo(8e6, 8, 4, dataclasses.replace(PLAT, barrier_latency=1e-3)) == (
        pytest.approx(halo - 2 * 1e-6 + 2 * 1e-3))


def test_a2a_is_the_cost_model_of_the_uniform_matrix():
    links = comm.cost_links(PLAT)
    node_of = np.repeat(np.arange(4), 4)
    for algo in ("flat", "halo"):
        per_call = cost.predict(np.full((16, 16), 1e5), node_of, links)[algo]
        assert comm.all_to_all(1.6e6, 16, 4, PLAT, algo) == pytest.approx(per_call, rel=1e-12)


def test_a2a_one_node_and_one_rank():
    # one node: HALO is the two barriers, the pack and the copy-out
    assert comm.a2a_halo(8e6, 4, 4, PLAT) == pytest.approx(2 * 1e-6 + 2 * 8e6 / 1e10)
    # one rank per node: the executor runs flat
    assert comm.a2a_halo(8e6, 4, 1, PLAT) == comm.a2a_flat(8e6, 4, 1, PLAT)
    assert comm.a2a_flat(8e6, 1, 1, PLAT) == 0.0 == comm.a2a_halo(8e6, 1, 1, PLAT)
    with pytest.raises(ValueError, match="'ring'"):
        comm.all_to_all(1.0, 2, 2, PLAT, "ring")


def test_ring_collectives_by_hand():
    # one node of 8: all-reduce = 2 * 7 * (alpha + S/8/beta)
    assert comm.all_reduce(8e6, 8, 8, PLAT) == pytest.approx(2 * 7 * (1e-6 + 1e6 / 1e9))
    # 2 nodes x 4: RS intra on S, then inter ring of 2 on S/4
    rs = 3 * (1e-6 + 2e6 / 1e9) + 1 * (1e-5 + 1e6 / 1e8)
    assert comm.reduce_scatter(8e6, 8, 4, PLAT) == pytest.approx(rs)
    assert comm.all_gather(8e6, 8, 4, PLAT) == pytest.approx(rs)
    assert comm.p2p(1e6, PLAT, inter_node=True) == pytest.approx(1e-5 + 1e-2)


def test_gemm_time_by_hand():
    # large square: compute-bound at 0.5 * 1000/1100 of 1 TFLOP/s
    t = gemm_time(1000, 1000, 1000, PLAT, 2)
    assert t == pytest.approx(2e9 / (1e12 * 0.5 * 1000 / 1100))
    # skinny: 8 rows run at 0.5 * 8/108 of peak
    t = gemm_time(8, 1000, 1000, PLAT, 2)
    assert t == pytest.approx(2 * 8 * 1e6 / (1e12 * 0.5 * 8 / 108))
    # with slow memory it is memory-bound: 2 B * (8*1000 + 1000*1000 + 8*1000) / 1e9
    slow = dataclasses.replace(PLAT, hbm_bandwidth=1e9)
    assert gemm_time(8, 1000, 1000, slow, 2) == pytest.approx(2 * (8000 + 1e6 + 8000) / 1e9)
    assert gemm_efficiency(100.0, PLAT) == 0.25


def test_a_gemm_runs_at_the_peak_of_its_element_size():
    """fp32 inputs at peak_flops_fp32 (None: peak_flops), 16-bit at peak_flops; an estimate in
    fp32 on an H100 computes at its fp32 rate and reports MFU against it."""
    fp32 = dataclasses.replace(PLAT, peak_flops_fp32=2.5e11, hbm_bandwidth=1e15)
    assert gemm_time(1000, 1000, 1000, fp32, 4) == pytest.approx(
        4 * gemm_time(1000, 1000, 1000, fp32, 2))
    assert gemm_time(1000, 1000, 1000, PLAT, 4) == pytest.approx(
        gemm_time(1000, 1000, 1000, dataclasses.replace(PLAT, hbm_bandwidth=1e15), 2))
    from piper_moe.resource_model import Strategy, estimate

    model, h100 = load_model("tiny-moe"), load_platform("dgx-h100")
    runs = {precision: estimate(model, h100, Strategy(
        dp=1, tp=1, pp=1, ep=1, micro_batch=64, global_batch=64, seq_len=512,
        precision=precision)) for precision in ("fp32", "bf16-mixed")}
    fp32_run, bf16_run = runs["fp32"], runs["bf16-mixed"]
    assert fp32_run.time["compute"] > 3 * bf16_run.time["compute"]  # 989 / 67 TFLOP/s at best
    flops = 3 * model_flops_per_token(model, 512) * 64 * 512
    assert fp32_run.mfu == pytest.approx(flops / (fp32_run.time["step"] * h100.peak_flops_fp32))
    assert bf16_run.mfu == pytest.approx(flops / (bf16_run.time["step"] * h100.peak_flops))


def test_skinny_expert_gemms_are_slower_per_flop():
    p = load_platform("dgx-h100")
    rate = lambda m: 2 * m * 2048 * 7168 / gemm_time(m, 2048, 7168, p)  # noqa: E731
    assert rate(16) < 0.3 * rate(4096)


def test_model_flops_per_token_by_hand():
    # tiny: 2 * (matmul params a token uses, head included, embedding lookup not) + attention
    attn = 49152
    dense = attn + 3 * 128 * 256
    moe = attn + 128 * 8 + 3 * 128 * 64 + 2 * 3 * 128 * 64
    matmul = dense + 3 * moe + 512 * 128
    attention = 4 * 128 * 4 * (32 + 32)  # layers * s * heads * (d_qk + d_v)
    assert model_flops_per_token(load_model("tiny-moe"), 128) == 2 * matmul + attention
