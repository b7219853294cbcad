"""ReferenceMoE: the plain single-process MoE the tests (and the benchmark) compare against.

Same parameters, names and initialisation as MoELayer with comm=None (so state dicts move
between them), but the textbook computation: for each expert, index_select its tokens, run the
SwiGLU, index_add the weighted result. No sorting, no all-to-all.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import Experts, SharedExpert, swiglu
from .fp8_gemm import resolve_fp8_gemm
from .precision import (
    accumulate_dtype,
    check_precision,
    compute_dtype,
    fake_quantize_fp8,
    param_dtype,
)
from .router import Router, balance_loss, capacity_keep


class ReferenceMoE(nn.Module):
    """y = ref(x) for the whole batch x [T, hidden] -> [T, hidden]; ref.aux_loss after it.
    Training-mode bias updates behave as in MoELayer.

    precision, fp8_dispatch: MoELayer's policy (layer/precision.py) applied the textbook way:
    the router on x as given (in float32 at least), the experts and the shared expert on x
    in the compute dtype (with fp8_dispatch: the experts on fake_quantize_fp8 of it, the
    gradient passing straight through), the weighted sum in float32 at least, the output in
    x's dtype. fp8_gemm="scaled" (with fp8_dispatch): the experts' w1 and w3 as the scaled
    FP8 GEMM sees them (layer/fp8_gemm.py: each column fake-quantized per 128-element block,
    the gradient passing straight through)."""

    def __init__(self, cfg: MoEConfig, seed: int = 0, dtype=torch.float32, device="cpu",
                 precision: str = "fp32", fp8_dispatch: bool = False,
                 fp8_gemm: str = "dequantize"):
        super().__init__()
        check_precision(precision, fp8_dispatch)
        self.compute_dtype = compute_dtype(precision, dtype)
        self.fp8_dispatch = fp8_dispatch
        self.scaled = fp8_dispatch and resolve_fp8_gemm(fp8_gemm, device, cfg.hidden) == "scaled"
        dtype = param_dtype(precision, dtype)
        self.cfg = cfg
        self.router = Router(cfg, seed, dtype, device)
        self.experts = Experts(cfg, 0, cfg.num_experts, seed, dtype, device)
        self.shared = (SharedExpert(cfg, seed, dtype, device) if cfg.num_shared_experts
                       else None)
        self.aux_loss = torch.zeros((), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        routing = self.router(x)
        chosen = routing.experts
        if cfg.capacity_factor is not None:
            chosen = chosen.masked_fill(~capacity_keep(chosen, cfg), -1)
        x_in, x = x, x.to(self.compute_dtype)
        x_e = x
        if self.fp8_dispatch:  # the values an FP8 dispatch delivers; straight-through grad
            x_e = x + (fake_quantize_fp8(x.detach(), x.dtype) - x).detach()
        acc = torch.promote_types(accumulate_dtype(x.dtype), routing.weights.dtype)
        out = torch.zeros(x.shape, dtype=acc, device=x.device)
        for e in range(cfg.num_experts):
            token, choice = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                w1, w3 = self.experts.w1[e], self.experts.w3[e]
                if self.scaled:
                    w1, w3 = (w + (fake_quantize_fp8(w.detach().t(), w.dtype).t() - w).detach()
                              for w in (w1, w3))
                h = swiglu(x_e.index_select(0, token), w1, w3, self.experts.w2[e])
                out = out.index_add(0, token, h.to(acc)
                                    * routing.weights[token, choice].unsqueeze(1).to(acc))
        load = torch.bincount(chosen[chosen >= 0], minlength=cfg.num_experts)
        self.aux_loss = balance_loss(routing.probs, load, x.shape[0], cfg)
        if self.training and cfg.bias_update_rate:
            self.router.update_bias(load)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.to(x_in.dtype)
