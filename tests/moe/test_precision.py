"""Precision policies and FP8 dispatch: the quantizer against an independent reference (one
process), the policy checks, and the layer in bf16-mixed / FP8 on every EP layout of
test_layer.py (mpirun; tolerances documented in precision_cases.py)."""

import numpy as np
import pytest
import torch

from piper_moe import MoEConfig, MoELayer
from piper_moe.layer import precision as P
from piper_moe.layer.reference import ReferenceMoE
from tests.launch import run_mpi
from tests.moe.test_layer import LAYOUTS


# -- the quantizer, against a float64 reference built from the e4m3 code table
def _e4m3_grid() -> np.ndarray:
    """Every finite non-negative e4m3 value (float64), from the 256 codes themselves."""
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(P.FP8_DTYPE)
    v = codes.float().double().numpy()
    return np.unique(v[np.isfinite(v) & (v >= 0)])


GRID = _e4m3_grid()


def _ref_round(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest, ties to the value with an even code (mantissa LSB 0), on GRID."""
    a = np.abs(v)
    i = np.clip(np.searchsorted(GRID, a), 1, len(GRID) - 1)
    lo, hi = GRID[i - 1], GRID[i]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & (i % 2 == 0))
    return np.sign(v) * np.where(a >= GRID[-1], GRID[-1], np.where(pick_hi, hi, lo))


def _ref_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized values, scales) of x [N, H] float64 by the contract of quantize_fp8."""
    N, H = x.shape
    nb = -(-H // P.FP8_BLOCK)
    scales = np.ones((N, nb))
    out = np.empty_like(x)
    for n in range(N):
        for b in range(nb):
            blk = x[n, b * P.FP8_BLOCK:(b + 1) * P.FP8_BLOCK]
            amax = np.abs(blk).max()
            s = 1.0
            if amax > 0:
                s = 2.0 ** np.ceil(np.log2(amax / 448.0))
                while amax / (s / 2) <= 448.0:  # the smallest power of two that fits
                    s /= 2
                while amax / s > 448.0:
                    s *= 2
            scales[n, b] = s
            out[n, b * P.FP8_BLOCK:(b + 1) * P.FP8_BLOCK] = _ref_round(blk / s) * s
    return out, scales


def test_grid_is_e4m3():
    assert len(GRID) == 127 and GRID[-1] == 448.0 and GRID[1] == 2.0 ** -9


@pytest.mark.parametrize("hidden", [128, 300, 7])
def test_quantize_matches_reference(hidden):
    g = torch.Generator().manual_seed(hidden)
    # rows of very different magnitudes, an all-zero row, values exactly between grid points
    x = torch.randn(9, hidden, generator=g, dtype=torch.float64)
    x = x * torch.logspace(-6, 6, 9, dtype=torch.float64).unsqueeze(1)
    x[3] = 0
    x[4, :3] = torch.tensor([1.0625, 1.1875, -448.0 * 3])  # ties between 1, 1.125, 1.25
    x = x.float().double()  # the values quantize_fp8 sees
    q, scales = P.quantize_fp8(x)
    deq = P.dequantize_fp8(q, scales, torch.float64).numpy()
    ref, ref_scales = _ref_quantize(x.numpy())
    assert np.array_equal(scales.double().numpy(), ref_scales)
    assert np.array_equal(deq, ref)
    # the documented error bound
    s = np.repeat(ref_scales, P.FP8_BLOCK, axis=1)[:, :hidden]
    err = np.abs(deq - x.numpy())
    assert np.all(err <= np.maximum(np.abs(x.numpy()) * 2.0 ** -4, s * 2.0 ** -10))


def test_round_trip_bitwise_for_representable_values():
    """Values q * 2^e with q on the e4m3 grid (and the block max making 2^e the scale) come
    back bitwise, and quantization is idempotent (what the dedup gateway relies on)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, len(GRID), (6, 256), generator=g)
    signs = torch.randint(0, 2, (6, 256), generator=g) * 2 - 1
    vals = torch.from_numpy(GRID)[codes] * signs
    vals[:, 0], vals[:, 128] = 448.0, -448.0  # each block's amax is 448: scale = 2^e exactly
    x = (vals * torch.tensor([2.0 ** e for e in (-20, -3, 0, 1, 7, 30)]).unsqueeze(1)).float()
    for dtype in (torch.float32, torch.bfloat16):
        y = P.fake_quantize_fp8(x.to(dtype), dtype)
        assert torch.equal(y, x.to(dtype)), dtype
    r = torch.randn(5, 300, generator=g) * 37
    once = P.fake_quantize_fp8(r, torch.float32)
    assert torch.equal(P.fake_quantize_fp8(once, torch.float32), once)
    assert torch.equal(P.fake_quantize_fp8(once, torch.bfloat16).float(), once)  # exact bf16


def test_pack_unpack_and_row_bytes():
    x = torch.randn(4, 300)
    q, s = P.quantize_fp8(x)
    buf = P.pack_fp8(q, s)
    assert buf.dtype == torch.uint8 and buf.shape == (4, P.fp8_row_bytes(300)) == (4, 312)
    q2, s2 = P.unpack_fp8(buf, 300)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert P.fp8_row_bytes(7168) / (2 * 7168) == 0.515625  # DeepSeek-V3's hidden: 0.52x bf16


def test_policy():
    assert P.param_dtype("bf16-mixed") == torch.float32
    assert P.compute_dtype("bf16-mixed") == torch.bfloat16
    assert P.param_dtype("bf16") == P.compute_dtype("bf16") == torch.bfloat16
    assert P.param_dtype("fp32", torch.float64) == P.compute_dtype("fp32", torch.float64)
    assert P.resolve("auto", "cpu") == ("bf16-mixed" if P.bf16_native("cpu") else "fp32")
    cfg = MoEConfig(hidden=8, ffn_hidden=16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="precision must be one of"):
        MoELayer(cfg, precision="fp16")
    with pytest.raises(ValueError, match="fp8_dispatch=True needs precision"):
        MoELayer(cfg, fp8_dispatch=True)
    layer = MoELayer(cfg, precision="bf16-mixed", dtype=torch.float32)
    assert layer.experts.w1.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16


def test_single_process_layer_equals_reference():
    """EP = 1: the layer and ReferenceMoE apply the same policy; the forward and backward
    agree to bf16 rounding order, and FP8 differs from bf16-mixed."""
    cfg = MoEConfig(hidden=256, ffn_hidden=64, num_experts=8, top_k=2, num_shared_experts=1)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    outs = {}
    for kw in ({"precision": "bf16-mixed"}, {"precision": "bf16-mixed", "fp8_dispatch": True},
               {"precision": "bf16"}):
        layer, ref = MoELayer(cfg, **kw), ReferenceMoE(cfg, **kw)
        with torch.no_grad():
            y, yr = layer(x), ref(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, yr, rtol=0, atol=2e-2 * float(yr.abs().max()))
        outs[kw.get("fp8_dispatch", False), kw["precision"]] = y
    assert not torch.equal(outs[True, "bf16-mixed"], outs[False, "bf16-mixed"])


# -- the layer on every EP layout (mpirun)
@pytest.mark.mpi
@pytest.mark.parametrize(("nprocs", "local_size", "node_ids"), LAYOUTS,
                         ids=["np2-ls1", "np4-ls1", "np4-ls2", "np4-nodes1001", "np8-ls1",
                              "np8-ls2", "np8-ls4"])
def test_layouts_within_tolerance(nprocs, local_size, node_ids):
    run = run_mpi(nprocs, "moe.precision_cases:layouts", {"local_size": local_size,
                                                           "node_ids": node_ids})
    for r in run.ranks:
        # 3 variants x 2 (fp8 or not) x 2 references x (y, x grad, router, 3 expert weights,
        # and the softmax scenario's 3 shared-expert weights), + a bytes check per variant
        assert r["result"]["checks"] == 3 * 2 * 2 * (9 + 6) + 2 * 3
    print("worst relative errors:", run.ranks[0]["result"]["worst"])


@pytest.mark.mpi
def test_fp8_halves_dispatch_bytes():
    run = run_mpi(4, "moe.precision_cases:bytes_by_precision", {"local_size": 2})
    for r in run.ranks:
        b = r["result"]
        assert b["bf16-mixed"][0] * 2 == b["fp32"][0] and b["bf16-mixed"][0] > 0
        ratio = b["fp8"][0] / b["bf16-mixed"][0]
        assert ratio == P.fp8_row_bytes(512) / (2 * 512)  # 0.508: e4m3 + 4 scales per row
        assert b["fp8"][1] == b["bf16-mixed"][1]  # the combine stays bf16


@pytest.mark.mpi
def test_ppmoe_fp8_gather():
    run = run_mpi(2, "moe.precision_cases:ppmoe_fp8")
    assert all(r["result"] == 4 for r in run.ranks)


@pytest.mark.mpi
@pytest.mark.parametrize(("nprocs", "local_size", "node_ids"),
                         [(4, 2, None), (4, None, [1, 0, 0, 1])], ids=["np4-ls2", "np4-nodes1001"])
def test_scaled_fp8_gemm_layouts(nprocs, local_size, node_ids):
    """fp8_gemm='scaled' (the composed CPU form) through plain, dedup and chunked dispatch: the
    delivered FP8 rows reach the experts on every path (tests/moe/test_fp8_gemm.py: one rank)."""
    run = run_mpi(nprocs, "moe.precision_cases:scaled_layouts", {"local_size": local_size,
                                                                  "node_ids": node_ids})
    for r in run.ranks:
        # 2 scenarios x 3 variants x 2 references x (y, x grad, router, 3 expert weights, and
        # the softmax scenario's 3 shared-expert weights)
        assert r["result"]["checks"] == 3 * 2 * (9 + 6)
    print("worst relative errors:", run.ranks[0]["result"]["worst"])
