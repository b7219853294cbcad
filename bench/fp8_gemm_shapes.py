"""Which [M, K] x [K, N] shapes the native block-scaled FP8 GEMM accepts on this device, and
its error (and the composed form's) against the float64 product of the dequantized operands,
as a fraction of sum |a||b| (the bound of a float32-accumulated sum is ~K * 2^-24 of it).

    python bench/fp8_gemm_shapes.py          # a CUDA device with a native block-scaled GEMM

Prints one line per shape: the unpadded native GEMM's verdict (accepted, or the library's
refusal) and error, and the error of scaled_mm_1x128's composed form (padded on CUDA). For the
padding in piper_moe/layer/fp8_gemm.py and the tolerances of tests/gpu/test_fp8_gemm_cuda.py.
"""

from __future__ import annotations

import torch

from piper_moe.layer import fp8_gemm as G
from piper_moe.layer import precision as P

SHAPES = [(m, 256, 384) for m in (1, 2, 4, 8, 15, 16, 32, 64, 77, 128, 256)] + \
         [(128, 256, n) for n in (8, 16, 100, 130, 200)] + \
         [(128, 128, 128), (128, 1024, 2048), (1024, 1024, 2048), (1000, 2048, 1024)]


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}"
          f"  native available: {G.native_scaled_gemm('cuda')}")
    print(f"# {'M':>5} {'K':>5} {'N':>5}  {'native':<40} {'err native':>10} {'err composed':>12}")
    for M, K, N in SHAPES:
        g = torch.Generator().manual_seed(M * 7 + N)
        x = (torch.randn(M, K, generator=g) * torch.logspace(-3, 2, K)).cuda()
        w = (torch.randn(K, N, generator=g) / K ** 0.5).cuda()
        q, sa = P.quantize_fp8(x)
        wq, sw = G.quantize_weight(w)
        a = P.dequantize_fp8(q, sa, torch.float32).double()
        b = P.dequantize_fp8(wq, sw, torch.float32).double()
        ref, scale = a @ b.t(), a.abs() @ b.abs().t() + 1e-30

        def err(out, ref=ref, scale=scale):
            return float(((out.double() - ref).abs() / scale).max())

        composed = err(G.scaled_mm_1x128(q, sa, wq, sw, torch.float32, native=False))
        try:  # the library's own verdict: no padding here
            native = G.native_block_scaled_mm(q, sa, wq, sw, torch.float32)
            verdict, e_native = "accepted", f"{err(native):10.2e}"
        except (RuntimeError, ValueError) as e:
            verdict, e_native = f"refused: {str(e).split(' when ')[0][:30]}", f"{'-':>10}"
        print(f"  {M:>5} {K:>5} {N:>5}  {verdict:<40} {e_native} {composed:12.2e}", flush=True)


if __name__ == "__main__":
    main()
