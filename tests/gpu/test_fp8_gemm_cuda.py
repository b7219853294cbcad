"""The experts' scaled FP8 GEMM on a CUDA device (piper_moe/layer/fp8_gemm.py).

The native block-scaled GEMM (F.scaled_mm, BlockWise1x128 on both operands; Hopper with CUDA
>= 12.9) against the float64 product of the dequantized operands and against the composed
row-wise form on the same device. Skipped, with the reason, where no such device is
(tests/moe/test_fp8_gemm.py runs the composed form and checks the native call's layouts on
meta tensors everywhere)."""

from __future__ import annotations

import pytest
import torch

from piper_moe.layer import fp8_gemm as G
from piper_moe.layer import precision as P

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    SKIP_REASON = "needs a CUDA device: torch.cuda.is_available() is False"
elif not G.native_scaled_gemm("cuda"):
    SKIP_REASON = (f"needs a native block-scaled FP8 GEMM (capability 9.x, CUDA >= 12.9): "
                   f"capability {torch.cuda.get_device_capability()}, CUDA {torch.version.cuda}")
else:
    SKIP_REASON = ""
needs_native = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)


# Hopper's FP8 tensor cores sum the products of a 128-wide block with a reduced-precision
# accumulator (about 14 bits, DeepSeek-V3 report section 3.3.2) before the block's scales are
# applied in float32: measured 1.3e-4 of sum |a||b| at K = 1024 on an H200 (float32 sums stay
# near K * 2^-24)
CUDA_FP8_TOL = 5e-4


@needs_native
@pytest.mark.parametrize(("M", "K", "N"), [(1, 128, 128), (77, 256, 384), (1024, 1024, 2048),
                                           (33, 128, 200)])
def test_native_equals_reference_and_composed(M, K, N):
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 2, K)).cuda()
    w = (torch.randn(K, N, generator=g) / K ** 0.5).cuda()
    q, sa = P.quantize_fp8(x)
    wq, sw = G.quantize_weight(w)
    native = G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=True)
    composed = G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=False)
    a = P.dequantize_fp8(q, sa, torch.float32).double()
    b = P.dequantize_fp8(wq, sw, torch.float32).double()
    ref, scale = a @ b.t(), a.abs() @ b.abs().t()
    for name, out in (("native", native), ("composed", composed)):
        err = float(((out.double() - ref).abs() / (scale + 1e-30)).max())
        assert err <= CUDA_FP8_TOL, f"{name}: max error {err:.3g} of sum |a||b|"
    # shapes off cuBLASLt's multiple of 16 (M = 1, 33, 77; N = 200) run padded
    bf = G.scaled_mm_1x128(q, sa, wq, sw, torch.bfloat16, native=True)
    assert bf.dtype == torch.bfloat16 and bf.shape == (M, N)
