"""SwiGLU experts: this rank's routed experts (stacked) and the dense shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .fp8_gemm import ScaledLinear, native_scaled_gemm
from .init import SHARED_ID, generator, swiglu_weights
from .precision import quantize_fp8


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """(silu(x w1) * (x w3)) w2 for x [N, hidden], w1/w3 [hidden, ffn], w2 [ffn, hidden],
    computed in x's dtype (weights of another dtype are cast: bf16 compute over float32
    master weights, whose gradients come back float32 through the cast)."""
    w1, w3, w2 = (_as(w, x.dtype) for w in (w1, w3, w2))
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _as(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w if w.dtype == dtype else w.to(dtype)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm wants float32/bf16/fp16 and 16-byte aligned row strides (checked
    on torch 2.8+ CPU; float64 is refused); the weights are used in x's dtype."""
    return (hasattr(torch, "_grouped_mm") and x.dtype in (torch.float32, torch.bfloat16,
                                                            torch.float16)
            and all(d * x.element_size() % 16 == 0 for d in (w.shape[1], w.shape[2])))


class Experts(nn.Module):
    """The E_local routed experts of one rank: global ids first .. first + E_local - 1, or
    `ids` (the logical expert of each local slot, under a non-identity placement).

    Parameters w1, w3 [E_local, hidden, ffn] and w2 [E_local, ffn, hidden]; the expert in
    local slot j is initialised from generator(seed, its global id) alone.
    """

    def __init__(self, cfg: MoEConfig, first: int, count: int, seed: int, dtype, device,
                 ids: list[int] | None = None):
        super().__init__()
        ids = list(range(first, first + count)) if ids is None else [int(i) for i in ids]
        ws = [swiglu_weights(generator(seed, e), cfg.hidden, cfg.ffn_hidden, dtype) for e in ids]
        self.first, self.count = first, count
        self.w1 = nn.Parameter(torch.stack([w[0] for w in ws]).to(device))
        self.w3 = nn.Parameter(torch.stack([w[1] for w in ws]).to(device))
        self.w2 = nn.Parameter(torch.stack([w[2] for w in ws]).to(device))

    def forward(self, x: torch.Tensor, counts: list[int], grouped: bool | None = None,
                fp8_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [sum(counts), hidden], rows grouped by local expert (counts[j] rows for expert j,
        no padding) -> [sum(counts), hidden] in the same order.

        grouped: use torch._grouped_mm (None: when dtype and shapes allow it); else a loop of
        one GEMM chain per non-empty expert. Computed in x's dtype: with bf16 rows over float32
        weights the weights are cast once per call (their gradients are float32).
        fp8_rows: (q e4m3 [sum(counts), hidden], scales float32 [sum(counts), hidden / 128]),
        the same rows as delivered by an FP8 dispatch (x == dequantize_fp8(q, scales)): the
        first GEMMs then run as scaled FP8 GEMMs (layer/fp8_gemm.py), one per expert.
        """
        if fp8_rows is not None:
            return self._forward_scaled(x, counts, *fp8_rows)
        if grouped is None:
            grouped = _grouped_mm_ok(x, self.w1) and _grouped_mm_ok(x, self.w2)
        if grouped and x.shape[0] > 0:
            w1, w3, w2 = (_as(w, x.dtype) for w in (self.w1, self.w3, self.w2))
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(
                x, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        outs, start = [], 0
        for j, n in enumerate(counts):
            if n:
                outs.append(swiglu(x[start:start + n], self.w1[j], self.w3[j], self.w2[j]))
            start += n
        return self._join(outs, x)

    def _forward_scaled(self, x: torch.Tensor, counts: list[int], q: torch.Tensor,
                        scales: torch.Tensor) -> torch.Tensor:
        """forward with fp8_rows: per non-empty expert j, [h1 | h3] = ScaledLinear(rows,
        [w1_j | w3_j]) (one FP8 GEMM of width 2 * ffn), then silu(h1) * h3 @ w2_j in x's
        dtype. Every expert's [w1 | w3] is quantized in one call."""
        native = native_scaled_gemm(x.device)
        E, hidden, ffn = self.w1.shape
        w13 = torch.cat([self.w1, self.w3], dim=2)  # [E, hidden, 2 ffn]
        # every expert's w13^T as rows [E * 2 ffn, hidden]: quantize_weight of each, at once
        wq, sw = quantize_fp8(w13.detach().transpose(1, 2).reshape(E * 2 * ffn, hidden))
        wq, sw = wq.view(E, 2 * ffn, hidden), sw.view(E, 2 * ffn, -1)
        outs, start = [], 0
        for j, n in enumerate(counts):
            if n:
                r = slice(start, start + n)
                h13 = ScaledLinear.apply(x[r], q[r], scales[r], w13[j], wq[j], sw[j], native)
                h = F.silu(h13[:, :ffn]) * h13[:, ffn:]
                outs.append(h @ _as(self.w2[j], x.dtype))
            start += n
        return self._join(outs, x)

    def _join(self, outs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The experts' outputs concatenated; with no rows here, an empty result still tied
        to x and the weights, so every rank's backward runs the same collectives (the combine
        all-to-all's backward)."""
        if not outs:
            return swiglu(x, self.w1[0], self.w3[0], self.w2[0])
        return torch.cat(outs)


class SharedExpert(nn.Module):
    """num_shared_experts dense experts fused into one SwiGLU of width ffn_hidden * count,
    replicated on every rank (its gradients are per-rank partial sums, like any data-parallel
    parameter)."""

    def __init__(self, cfg: MoEConfig, seed: int, dtype, device):
        super().__init__()
        w1, w3, w2 = swiglu_weights(generator(seed, SHARED_ID), cfg.hidden,
                                    cfg.ffn_hidden * cfg.num_shared_experts, dtype)
        self.w1 = nn.Parameter(w1.to(device))
        self.w3 = nn.Parameter(w3.to(device))
        self.w2 = nn.Parameter(w2.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], computed in x's dtype (swiglu)."""
        return swiglu(x, self.w1, self.w3, self.w2)
