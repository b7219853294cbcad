"""The scaled FP8 GEMM path of the experts (piper_moe/layer/fp8_gemm.py), in one process.

The native block-scaled GEMM needs a Hopper GPU (tests/gpu and bench/gpu_moe_check.py run it
there); here the composed row-wise form runs on CPU, and the native call's argument layouts
are checked against torch's own shape and stride rules on meta tensors."""

from __future__ import annotations

import pytest
import torch

from piper_moe import MoEConfig, MoELayer, MoEOptions
from piper_moe.layer import fp8_gemm as G
from piper_moe.layer import precision as P
from piper_moe.layer.experts import Experts
from piper_moe.layer.reference import ReferenceMoE


def _operands(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 2, K)  # blocks of unlike ranges
    w = torch.randn(K, N, generator=g) / K ** 0.5
    return x, w


@pytest.mark.parametrize(("M", "K", "N"), [(1, 128, 8), (37, 256, 64), (64, 512, 130)])
def test_composed_scaled_mm_equals_the_dequantized_product(M, K, N):
    """scaled_mm_1x128 on CPU = dequantize(q) @ dequantize(wq)^T, up to float32 accumulation."""
    x, w = _operands(M, K, N)
    q, sa = P.quantize_fp8(x)
    wq, sw = G.quantize_weight(w)
    assert wq.shape == (N, K) and sw.shape == (N, K // 128)
    out = G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=False)
    ref = (P.dequantize_fp8(q, sa, torch.float32).double()
           @ P.dequantize_fp8(wq, sw, torch.float32).double().t())
    scale = (P.dequantize_fp8(q, sa, torch.float32).double().abs()
             @ P.dequantize_fp8(wq, sw, torch.float32).double().abs().t())
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert bool(((out.double() - ref).abs() <= 1e-6 * scale + 1e-30).all())
    bf = G.scaled_mm_1x128(q, sa, wq, sw, torch.bfloat16, native=False)
    assert torch.equal(bf, out.to(torch.bfloat16))


def test_native_call_layouts_pass_torchs_checks():
    """The native call's scale layouts (outer-dim-major) pass torch's meta checks of
    F.scaled_mm BlockWise1x128 x BlockWise1x128; the row-major layout does not (so the check
    is real)."""
    M, K, N = 100, 512, 384
    meta = {"device": "meta"}
    q = torch.empty(M, K, dtype=P.FP8_DTYPE, **meta)
    wq = torch.empty(N, K, dtype=P.FP8_DTYPE, **meta)
    sa, sw = torch.empty(M, K // 128, **meta), torch.empty(N, K // 128, **meta)
    out = G.scaled_mm_1x128(q, sa, wq, sw, torch.bfloat16, native=True)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    st = torch.nn.functional.ScalingType.BlockWise1x128
    with pytest.raises(RuntimeError, match="stride"):
        torch.nn.functional.scaled_mm(q, wq.t(), sa, st, sw, st, output_dtype=torch.bfloat16)


def test_k_not_multiple_of_128_is_refused():
    q = torch.zeros(4, 200, dtype=P.FP8_DTYPE)
    with pytest.raises(ValueError, match="multiple of 128"):
        G.scaled_mm_1x128(q, torch.ones(4, 2), q, torch.ones(4, 2), native=False)


def test_resolve_and_options():
    assert not G.native_scaled_gemm("cpu")
    assert G.resolve_fp8_gemm("auto", "cpu", 256) == "dequantize"
    assert G.resolve_fp8_gemm("scaled", "cpu", 256) == "scaled"
    assert G.resolve_fp8_gemm("dequantize", "cpu", 256) == "dequantize"
    with pytest.raises(ValueError, match="hidden % 128"):
        G.resolve_fp8_gemm("scaled", "cpu", 200)
    with pytest.raises(ValueError, match="fp8_gemm must be one of"):
        MoEOptions(fp8_gemm="fast")
    with pytest.raises(ValueError, match="needs fp8_dispatch"):
        MoEOptions(precision="bf16-mixed", fp8_gemm="scaled")
    cfg = MoEConfig(hidden=256, ffn_hidden=64, num_experts=4, top_k=2)
    assert MoELayer(cfg, precision="bf16-mixed", fp8_dispatch=True).fp8_gemm == "dequantize"
    assert MoELayer(cfg, precision="bf16-mixed").fp8_gemm is None
    layer = MoELayer(cfg, precision="bf16-mixed", fp8_dispatch=True, fp8_gemm="scaled")
    assert layer.fp8_gemm == "scaled"


def test_scaled_linear_is_the_product_with_rounded_weights():
    """ScaledLinear = x @ w8 (w8: w's e4m3 rounding, exact in bf16) in value and gradients,
    the weight's gradient passed straight through to w (float32)."""
    x, w = _operands(48, 256, 96, seed=3)
    q, sa = P.quantize_fp8(x)
    xd = P.dequantize_fp8(q, sa, torch.bfloat16)
    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    a, wa = xd.clone().requires_grad_(), w.clone().requires_grad_()
    y = G.ScaledLinear.apply(a, q, sa, wa, *G.quantize_weight(wa), False)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    w8 = P.fake_quantize_fp8(w.t(), torch.float32).t()
    b, wb = xd.clone().requires_grad_(), w.clone().requires_grad_()
    yb = b @ (wb + (w8 - wb).detach()).to(torch.bfloat16)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad) and torch.equal(wa.grad, wb.grad)
    assert wa.grad.dtype == torch.float32
    # the forward: the same exact operands, float32 sums in another blocking
    torch.testing.assert_close(y.float(), yb.float(), rtol=2 ** -7, atol=1e-6)


def test_experts_scaled_vs_dequantize():
    """Experts with fp8_rows differ from the bf16 path by the weights' e4m3 rounding only;
    an empty batch still returns a result tied to the weights."""
    cfg = MoEConfig(hidden=256, ffn_hidden=64, num_experts=3, top_k=1)
    ex = Experts(cfg, 0, 3, seed=1, dtype=torch.float32, device="cpu")
    x, _ = _operands(50, 256, 1, seed=5)
    q, sa = P.quantize_fp8(x)
    xd = P.dequantize_fp8(q, sa, torch.bfloat16)
    counts = [20, 0, 30]
    y_s = ex(xd, counts, fp8_rows=(q, sa))
    y_d = ex(xd, counts)
    rel = float((y_s - y_d).detach().float().abs().max() / y_d.detach().float().abs().max())
    y_s.sum().backward()  # differentiable
    assert 0 < rel < 0.15, rel
    empty = ex(xd[:0], [0, 0, 0], fp8_rows=(q[:0], sa[:0]))
    assert empty.shape == (0, 256) and empty.requires_grad


def test_single_process_layer_equals_scaled_reference():
    """EP = 1: the layer with fp8_gemm='scaled' equals ReferenceMoE(fp8_gemm='scaled') to bf16
    rounding order (forward and gradients), and differs from the dequantize path."""
    cfg = MoEConfig(hidden=256, ffn_hidden=64, num_experts=8, top_k=2, num_shared_experts=1)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    kw = {"precision": "bf16-mixed", "fp8_dispatch": True}
    layer = MoELayer(cfg, fp8_gemm="scaled", **kw)
    ref = ReferenceMoE(cfg, fp8_gemm="scaled", **kw)
    deq = ReferenceMoE(cfg, **kw)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    ys = [m(xi) for m, xi in zip((layer, ref, deq), xs)]
    for y in ys:
        y.square().sum().backward()
    ys = [y.detach() for y in ys]
    tol = 2e-2
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=tol * float(ys[1].abs().max()))
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0,
                               atol=tol * float(xs[1].grad.abs().max()))
    for name in ("w1", "w3", "w2"):
        a, b = getattr(layer.experts, name).grad, getattr(ref.experts, name).grad
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))
    assert not torch.equal(ys[0], ys[2])


def test_native_refusal_falls_back_when_chosen_automatically(monkeypatch, caplog):
    """Where the native GEMM was picked by capability and refuses a shape, the composed form
    runs (logged once); asked for explicitly, the refusal is raised. (Here the "native" call
    is torch's CPU scaled_mm, which refuses block scaling.)"""
    x, w = _operands(16, 256, 32)
    q, sa = P.quantize_fp8(x)
    wq, sw = G.quantize_weight(w)
    monkeypatch.setattr(G, "native_scaled_gemm", lambda device: True)
    G._WARNED.clear()
    with caplog.at_level("WARNING", logger="piper.moe"):
        out = G.scaled_mm_1x128(q, sa, wq, sw, torch.float32)
        G.scaled_mm_1x128(q, sa, wq, sw, torch.float32)
    assert torch.equal(out, G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=False))
    assert sum("refused" in r.message for r in caplog.records) == 1
    with pytest.raises((RuntimeError, ValueError)):
        G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=True)
