"""Precision policies of the MoE layer and the trainer, and FP8 (e4m3) token dispatch.

Policies (``precision=``; the names the layer, the model and ``python -m piper_moe.train``
accept):

- ``fp32``: parameters, optimizer state and compute in the parameter dtype (float32, or
  float64 for the exactness tests).
- ``bf16-mixed``: parameters and AdamW state in float32 (the master weights), compute in
  bfloat16: expert and shared-expert GEMMs (weights cast per forward, the cast's backward
  returns a float32 gradient), attention and dense layers (the model runs them under
  ``torch.autocast``), the dispatched rows and the combine exchange. What stays float32, and
  why: the router logits, softmax / sigmoid and top-k (a bf16 logit has 8 significant bits,
  so near ties the chosen experts would flip between runs and layouts, and the combine
  weights and the balancing loss are probabilities summed over many tokens), the combine's
  weighted sum over a token's top-k outputs (accumulated in float32, then cast), RMSNorm and
  RoPE (they already compute in float32), the residual stream between blocks, the logits'
  cross-entropy and the loss. Gradients: every parameter's ``.grad`` is float32 (the master
  dtype), so micro-batch accumulation and the data-parallel all-reduce sum in float32; a
  bf16 reduction would halve the gradient bytes but round each partial sum to 8 bits, which
  costs more than it saves on this library's CPU transports, where the gradient all-reduce
  is a small part of a step.
- ``bf16``: everything in bfloat16, parameters and AdamW state included (what Piper did
  before mixed precision: half the memory, and updates smaller than 2^-8 of a weight are
  lost). The router logits, the combine sum and the loss are still computed in float32.
- ``auto`` (trainer config and ``resolve``): ``bf16-mixed`` where bfloat16 GEMMs are native
  (a CUDA device with bf16, or a CPU with AVX512-BF16 / AMX as oneDNN reports), else
  ``fp32``.

FP8 dispatch (``fp8_dispatch=True``, with ``bf16-mixed`` or ``bf16``): the dispatch
all-to-all carries each token row as float8 e4m3 (torch.float8_e4m3fn) with one float32 scale
per block of ``FP8_BLOCK`` = 128 consecutive hidden elements (DeepSeek-V3's 1x128 activation
tiles; the last block of a row may be shorter), packed into one uint8 row of
``fp8_row_bytes(hidden)`` bytes so that one all-to-all moves both. Scales are powers of two
(the smallest with amax(block) / scale <= 448, as DeepGEMM's UE8M0 scales), so
dequantization (``q * scale``, exact in bfloat16) and re-quantization of a dequantized row
are lossless. A token row is quantized once, before it is replicated for its k experts, and
the packed rows travel through every gather and all-to-all of the dispatch (both stages of
node dedup: the gateway forwards them as they are; ``Fp8RowMoves``) until the expert's rank
dequantizes them. The expert input is the dequantized bf16 row, or with a scaled FP8 GEMM
the delivered e4m3 rows and scales themselves (``fp8_gemm``, layer/fp8_gemm.py).
The combine exchange carries bf16. Backward: the dispatch's gradient (combine direction)
travels in bf16, with the quantization treated as the identity (straight-through), as
DeepEP's combine and DeepSeek-V3's backward do: gradients have a wider dynamic range than
activations and feed the weight updates directly.
"""

from __future__ import annotations

import torch

from ..common import PRECISIONS
from .config import FP8_BLOCK, FP8_SCALE_BYTES, MoEOptions, fp8_blocks, fp8_row_bytes

__all__ = [
    "FP8_BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "PRECISIONS",
    "AllToAll",
    "Fp8RowMoves",
    "Gather",
    "accumulate_dtype",
    "bf16_native",
    "check_precision",
    "compute_dtype",
    "dequantize_fp8",
    "fake_quantize_fp8",
    "fp8_blocks",
    "fp8_row_bytes",
    "pack_fp8",
    "param_dtype",
    "quantize_fp8",
    "resolve",
    "unpack_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


# -- policies
def check_precision(precision: str, fp8_dispatch: bool = False) -> None:
    """ValueError unless precision is one of PRECISIONS and fp8_dispatch is used with a
    bfloat16 compute precision (MoEOptions' rule)."""
    MoEOptions(precision=precision, fp8_dispatch=fp8_dispatch)


def bf16_native(device) -> bool:
    """True when bfloat16 GEMMs run natively on device: CUDA with bf16 support, or a CPU
    whose oneDNN has bf16 kernels (AVX512-BF16 / AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve(precision: str, device) -> str:
    """'auto' -> 'bf16-mixed' where bf16 is native on device (bf16_native), else 'fp32';
    any other name is checked and returned."""
    if precision == "auto":
        return "bf16-mixed" if bf16_native(device) else "fp32"
    check_precision(precision)
    return precision


def param_dtype(precision: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of parameters and optimizer state: dtype for 'fp32' (float32 or float64),
    float32 for 'bf16-mixed', bfloat16 for 'bf16'."""
    check_precision(precision)
    if precision == "bf16":
        return torch.bfloat16
    if precision == "bf16-mixed":
        return torch.float32
    return dtype


def compute_dtype(precision: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype GEMMs and dispatched rows use: dtype for 'fp32', bfloat16 otherwise."""
    check_precision(precision)
    return dtype if precision == "fp32" else torch.bfloat16


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over a token's experts and the router run in: float32 for 16-bit
    dtypes, dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


# -- FP8 quantization (fp8_blocks, fp8_row_bytes: layer/config.py)
def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] (any float dtype, finite) -> (q float8_e4m3fn [N, H], scales float32 [N, nb]),
    nb = fp8_blocks(H), such that x ~= q * scale of its block. scale = the smallest power of
    two with amax(block) / scale <= 448 (1.0 for an all-zero block); q = x / scale rounded to
    nearest even. Error: |dequantized - x| <= max(|x| * 2^-4, scale * 2^-10) per element
    (3 mantissa bits; subnormals below 2^-6 * scale). Non-finite inputs give NaN rows."""
    N, H = x.shape
    nb = fp8_blocks(H)
    xf = x.detach().float()
    if nb * FP8_BLOCK != H:
        xf = torch.nn.functional.pad(xf, (0, nb * FP8_BLOCK - H))
    blocks = xf.view(N, nb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # amax = m * 2^e, m in [0.5, 1): the smallest 2^s with amax / 2^s <= 448 = 0.875 * 2^9
    # is s = e - 9, or e - 8 when m > 0.875 (exact: frexp / ldexp only move the exponent).
    m, e = torch.frexp(amax)
    e = e - 9 + (m > FP8_MAX / 512).to(e.dtype)
    scales = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), e),
                         torch.ones_like(amax))
    q = (blocks / scales.unsqueeze(-1)).to(FP8_DTYPE).view(N, nb * FP8_BLOCK)[:, :H]
    return q.contiguous(), scales


_E4M3_VALUES: dict = {}


def _e4m3_values(dtype: torch.dtype, device) -> torch.Tensor:
    """The 256 e4m3 codes' values in dtype (a lookup table: torch's own float8 -> float
    conversion is an unvectorised loop on CPU, 2-3x slower than a table lookup)."""
    key = (dtype, torch.device(device))
    if key not in _E4M3_VALUES:
        codes = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(FP8_DTYPE)
        _E4M3_VALUES[key] = codes.float().to(dtype).to(device)
    return _E4M3_VALUES[key]


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                   ) -> torch.Tensor:
    """(q float8_e4m3fn [N, H], scales float32 [N, nb]) -> [N, H] in dtype: q * scale.
    Exact in bfloat16 and float32 (3 mantissa bits times a power of two): computed in bf16
    for a bf16 result, else in float32."""
    N, H = q.shape
    nb = scales.shape[1]
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    qf = torch.take(_e4m3_values(work, q.device), q.view(torch.uint8).long())
    if nb * FP8_BLOCK != H:
        qf = torch.nn.functional.pad(qf, (0, nb * FP8_BLOCK - H))
    out = qf.view(N, nb, FP8_BLOCK) * scales.to(work).unsqueeze(-1)
    return out.view(N, nb * FP8_BLOCK)[:, :H].to(dtype)


def pack_fp8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q [N, H] e4m3, scales float32 [N, nb]) -> uint8 [N, fp8_row_bytes(H)]: each row's H
    e4m3 bytes, then its nb scales' bytes (native byte order; both ends are one machine
    architecture)."""
    N, nb = scales.shape
    return torch.cat([q.view(torch.uint8), scales.contiguous().view(torch.uint8)
                      .view(N, nb * FP8_SCALE_BYTES)], dim=1)


def unpack_fp8(buf: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, fp8_row_bytes(hidden)] -> (q e4m3 [N, hidden], scales float32 [N, nb])."""
    q = buf[:, :hidden].contiguous().view(FP8_DTYPE)
    scales = buf[:, hidden:].contiguous().view(torch.float32)
    return q, scales


def fake_quantize_fp8(x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """dequantize_fp8(*quantize_fp8(x), dtype): the values an FP8 dispatch delivers, without
    any exchange (the reference for the layer's FP8 path)."""
    return dequantize_fp8(*quantize_fp8(x), dtype)


# -- moving packed FP8 rows
class Gather:
    """A row move: rows [n_in, *] -> rows[index] ([len(index), *]); adjoint: the gradient
    rows summed back into [n_in, *] (index_add, as index_select's backward)."""

    def __init__(self, index: torch.Tensor, n_in: int):
        self.index, self.n_in = index, n_in

    def forward(self, rows: torch.Tensor, comm) -> torch.Tensor:
        return rows.index_select(0, self.index)

    def adjoint(self, grad: torch.Tensor, comm) -> torch.Tensor:
        return grad.new_zeros((self.n_in, *grad.shape[1:])).index_add(0, self.index, grad)


class AllToAll:
    """A row move: the all-to-all-v of rows (send[r] rows to rank r, recv[r] from rank r;
    the identity without a communicator); adjoint: the reverse all-to-all-v. Collective."""

    def __init__(self, send: list[int], recv: list[int]):
        self.send, self.recv = send, recv

    def forward(self, rows: torch.Tensor, comm) -> torch.Tensor:
        if comm is None:
            return rows
        return comm.all_to_all_v(rows.contiguous(), self.send, recv_counts=self.recv)[0]

    def adjoint(self, grad: torch.Tensor, comm) -> torch.Tensor:
        if comm is None:
            return grad
        return comm.all_to_all_v(grad.contiguous(), self.recv, recv_counts=self.send)[0]


class Fp8RowMoves(torch.autograd.Function):
    """rows = dequantize(M(quantize(x))): x [T, H] is quantized once, the packed uint8 rows
    go through the row moves M (a list of Gather / AllToAll, applied in order: gathers copy
    packed rows, all-to-alls carry them) and are dequantized to `dtype` where they land.
    Backward: the adjoint moves in reverse order on the gradient in its own dtype (bf16), the
    quantization taken as the identity (straight-through), exactly the backward of the same
    moves done on unquantized rows. apply(x, moves, comm, dtype) -> [rows out, H];
    collective when M has an AllToAll (forward and backward). Also returns the moved rows as
    delivered, (q e4m3 [rows out, H], scales float32 [rows out, nb]), not differentiable: the
    input of a scaled FP8 GEMM (layer/fp8_gemm.py)."""

    @staticmethod
    def forward(ctx, x, moves, comm, dtype):
        ctx.moves, ctx.comm, ctx.x_dtype = moves, comm, x.dtype
        buf = pack_fp8(*quantize_fp8(x))
        for m in moves:
            buf = m.forward(buf, comm)
        q, scales = unpack_fp8(buf, x.shape[1])
        ctx.mark_non_differentiable(q, scales)
        return dequantize_fp8(q, scales, dtype), q, scales

    @staticmethod
    def backward(ctx, grad, _q, _scales):
        g = grad
        for m in reversed(ctx.moves):
            g = m.adjoint(g, ctx.comm)
        return g.to(ctx.x_dtype), None, None, None
