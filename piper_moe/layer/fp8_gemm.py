"""Scaled FP8 GEMMs for the experts' first projections, when the dispatch delivers FP8 rows.

With ``fp8_dispatch`` every expert input row arrives as float8 e4m3 with one power-of-two
float32 scale per 128 hidden elements (layer/precision.py). Two ways to compute
``x @ w1`` and ``x @ w3`` on those rows (``MoEOptions.fp8_gemm``):

- ``dequantize``: the rows are dequantized to bfloat16 (exact: 3 mantissa bits times a power
  of two) and multiplied by the bf16 copies of the weights. Runs everywhere; the GEMMs run at
  bf16 speed.
- ``scaled``: the FP8 rows go straight into a scaled GEMM (``scaled_mm_1x128``) against the
  weights quantized per forward to e4m3 with one scale per output column and 128-element
  block of the contraction (``quantize_fp8`` of w^T: 1x128 tiles, as the activations):
  ``out[m, n] = sum_b sa[m, b] * sw[n, b] * sum_{k in b} q[m, k] * wq[n, k]``, accumulated in
  float32, returned in bfloat16. On Hopper (CUDA capability 9.x, torch built with CUDA >=
  12.9) this is one cuBLASLt block-scaled FP8 GEMM (``torch.nn.functional.scaled_mm`` with
  ``BlockWise1x128`` on both operands: FP8 tensor cores, twice bf16's rate); elsewhere it is
  composed of one row-wise scaled GEMM per 128-element block of K (``_scaled_mm`` on CUDA;
  a float32 GEMM of the e4m3 values on CPU), the same sum, for tests and CPUs. Only the
  first GEMMs take FP8 inputs: their outputs (the SwiGLU hidden) and the second GEMM stay
  bfloat16.
- ``auto``: ``scaled`` where the native block-scaled GEMM exists (``native_scaled_gemm``) and
  the hidden size is a multiple of 128, else ``dequantize``.

What the scaled path changes: the weights are rounded to e4m3 (relative error <= 2^-4 per
weight, against bf16's 2^-8), so its outputs differ from the dequantize path by about
e4m3's rounding; the tests bound it. Backward (``ScaledLinear``), in bfloat16: the input
gradient through the e4m3-rounded weights the forward used, the weight gradient from the
dequantized rows, passed straight through the weight's rounding to the master weight (as
the dispatch's quantization is).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..common import FP8_GEMMS
from .config import FP8_BLOCK
from .precision import dequantize_fp8, quantize_fp8

__all__ = ["FP8_GEMMS", "ScaledLinear", "native_block_scaled_mm", "native_scaled_gemm",
           "resolve_fp8_gemm", "scaled_mm_1x128"]

# torch's block-scaled cuBLASLt path (sm_90) needs CUDA 12.9+ (torch's own tests' condition).
_BLOCKWISE_CUDA = (12, 9)


def native_scaled_gemm(device) -> bool:
    """True when scaled_mm_1x128 runs as one native block-scaled FP8 GEMM on device: a CUDA
    device of capability 9.x (Hopper) and a torch built with CUDA >= 12.9 that has
    torch.nn.functional.scaled_mm."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or not torch.cuda.is_available():
        return False
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 and cuda >= _BLOCKWISE_CUDA


def resolve_fp8_gemm(setting: str, device, hidden: int) -> str:
    """MoEOptions.fp8_gemm -> 'scaled' or 'dequantize' for a layer of this hidden size on
    device ('auto': scaled where native_scaled_gemm and hidden % 128 == 0). ValueError for
    'scaled' with a hidden size that is not a multiple of 128 (a partial block of K would
    need its own scale handling in the native GEMM)."""
    if setting not in FP8_GEMMS:
        raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS}, got {setting!r}")
    fits = hidden % FP8_BLOCK == 0
    if setting == "scaled" and not fits:
        raise ValueError(f"fp8_gemm='scaled' needs hidden % {FP8_BLOCK} == 0, got hidden="
                         f"{hidden}")
    if setting == "auto":
        return "scaled" if fits and native_scaled_gemm(device) else "dequantize"
    return setting


CUBLAS_FP8_ALIGN = 16  # cuBLASLt FP8 GEMMs: M and N multiples of 16 (K is one of 128 here)


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """s [R, C] with strides (1, R): the scale layout cuBLASLt's block scaling reads."""
    return s.t().contiguous().t()


def native_block_scaled_mm(q: torch.Tensor, sa: torch.Tensor, wq: torch.Tensor,
                           sw: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The one cuBLASLt block-scaled FP8 GEMM (F.scaled_mm, BlockWise1x128 on both operands)
    of scaled_mm_1x128's operands, as they are: no padding, so a shape the library refuses
    raises (RuntimeError)."""
    st = F.ScalingType.BlockWise1x128
    return F.scaled_mm(q, wq.t(), _outer_major(sa), st, _outer_major(sw), st,
                       output_dtype=out_dtype)


def scaled_mm_1x128(q: torch.Tensor, sa: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                    out_dtype: torch.dtype = torch.bfloat16, native: bool | None = None
                    ) -> torch.Tensor:
    """q e4m3 [M, K] with scales sa float32 [M, K/128]; wq e4m3 [N, K] (the weight transposed:
    row n is output column n) with scales sw float32 [N, K/128]; K % 128 == 0 ->
    [M, N] in out_dtype: sum over blocks b of sa[:, b] sw[:, b]^T * (q_b @ wq_b^T), accumulated
    in float32. native (None: native_scaled_gemm(q.device)): one block-scaled GEMM
    (F.scaled_mm, BlockWise1x128 x BlockWise1x128); else K/128 row-wise scaled GEMMs summed
    in float32 (the same products; the summation order over blocks may differ). With native
    None, a shape the native GEMM refuses (RuntimeError, ValueError) runs composed, logged
    once; with native True the error is raised."""
    M, K = q.shape
    if K % FP8_BLOCK:
        raise ValueError(f"scaled_mm_1x128: K={K} is not a multiple of {FP8_BLOCK}")
    N = wq.shape[0]
    if q.is_cuda and (M % CUBLAS_FP8_ALIGN or N % CUBLAS_FP8_ALIGN):
        # cuBLASLt's FP8 GEMMs (block-scaled and row-wise) refuse dimensions off a multiple of
        # 16: zero rows with unit scales in, sliced off the result
        pm, pn = -M % CUBLAS_FP8_ALIGN, -N % CUBLAS_FP8_ALIGN
        out = scaled_mm_1x128(F.pad(q.view(torch.uint8), (0, 0, 0, pm)).view(q.dtype),
                              F.pad(sa, (0, 0, 0, pm), value=1.0),
                              F.pad(wq.view(torch.uint8), (0, 0, 0, pn)).view(wq.dtype),
                              F.pad(sw, (0, 0, 0, pn), value=1.0), out_dtype, native)
        return out[:M, :N].contiguous() if pn else out[:M]
    forced = native is not None
    if native is None:
        native = native_scaled_gemm(q.device)
    if native:
        try:
            return native_block_scaled_mm(q, sa, wq, sw, out_dtype)
        except (RuntimeError, ValueError) as e:
            if forced:
                raise
            _warn_once(f"piper.moe: the native block-scaled FP8 GEMM refused [{M}, {K}] x "
                       f"[{K}, {wq.shape[0]}] ({e}); running the composed form")
    out = torch.zeros(M, wq.shape[0], dtype=torch.float32, device=q.device)
    for b in range(K // FP8_BLOCK):
        cols = slice(b * FP8_BLOCK, (b + 1) * FP8_BLOCK)
        if q.is_cuda:  # FP8 tensor cores, row-wise scales
            out += torch._scaled_mm(q[:, cols].contiguous(), wq[:, cols].contiguous().t(),
                                    scale_a=sa[:, b:b + 1].contiguous(),
                                    scale_b=sw[:, b].reshape(1, -1).contiguous(),
                                    out_dtype=torch.float32)
        else:  # the same products in float32 (every e4m3 x e4m3 product is exact there;
            # torch's CPU _scaled_mm takes row-wise scales only from torch 2.12 on)
            out += (q[:, cols].float() @ wq[:, cols].float().t()) * sa[:, b:b + 1] * sw[:, b]
    return out.to(out_dtype)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Logs the first native-GEMM refusal of this process (later ones only differ in shape)."""
    if not _WARNED:
        _WARNED.add(message)
        logging.getLogger("piper.moe").warning("%s", message)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] (any float dtype) -> (wq e4m3 [N, K], sw float32 [N, K/128]): w^T quantized
    per output column and 128-element block of K (quantize_fp8's rule)."""
    return quantize_fp8(w.detach().t())


class ScaledLinear(torch.autograd.Function):
    """y = x @ w computed as scaled_mm_1x128(q, sa, wq, sw), (wq, sw) = quantize_weight(w).

    apply(x, q, sa, w, wq, sw, native) -> [M, N] in x's dtype (bfloat16). x [M, K]: the
    dequantized rows, exactly q * sa (they carry the gradient); q e4m3 [M, K], sa float32
    [M, K/128]: the same rows as delivered by the FP8 dispatch; w [K, N] (float32 master or
    bf16) and its quantization (made by the caller: one call for all experts). Backward,
    in x's dtype: grad_x = g @ w8^T with w8 the e4m3-rounded weight the forward used (exact
    in bf16), the gradient of the function computed; grad_w = x^T @ g, the gradient with
    respect to w8 passed straight through to w (in w's dtype). Saved for backward: the e4m3
    rows and weights with their scales (about 1 byte per element, half of the bf16 rows; x
    is dequantized again in backward, exactly)."""

    @staticmethod
    def forward(ctx, x, q, sa, w, wq, sw, native):
        ctx.save_for_backward(q, sa, wq, sw)
        ctx.w_dtype = w.dtype
        return scaled_mm_1x128(q, sa, wq, sw, x.dtype, native)

    @staticmethod
    def backward(ctx, g):
        q, sa, wq, sw = ctx.saved_tensors
        gx = g @ dequantize_fp8(wq, sw, g.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[3]:
            gw = (dequantize_fp8(q, sa, g.dtype).t() @ g).to(ctx.w_dtype)
        return gx, None, None, gw, None, None, None
