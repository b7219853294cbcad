"""A small PyTorch MoE transformer built from a ``ModelSpec``: the reference implementation whose
saved tensors ``piper_moe.resource_model.memory`` describes (used by ``bench/model_validation.py``
until the runtime's MoE layer exists).

Layer = RMSNorm -> attention (GQA/MHA, RoPE, causal flash SDPA) -> residual -> RMSNorm -> dense
SwiGLU FFN or MoE (softmax router, top-k, sort-by-expert dispatch, per-expert SwiGLU, weighted
combine, shared experts) -> residual. RMSNorm is a fused autograd function that keeps only its
input and the fp32 1/rms (as apex/TE fused kernels do). Single process (tp = ep = pp = 1).

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, E experts, K top-k, R routed rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from piper_moe.resource_model.spec import ModelSpec


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w; saves x and 1/rms only."""

    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, rstd)
        return x * rstd * w

    @staticmethod
    def backward(ctx, gy):
        x, w, rstd = ctx.saved_tensors
        xn = x * rstd
        gw = (gy * xn).reshape(-1, x.shape[-1]).sum(0)
        gxn = gy * w
        gx = rstd * (gxn - xn * (gxn * xn).mean(-1, keepdim=True))
        return gx, gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)


def _rope(x_BNSD, cos_SD, sin_SD):
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    return x_BNSD * cos_SD + torch.cat((-x2, x1), dim=-1) * sin_SD


class Attention(nn.Module):
    def __init__(self, m: ModelSpec):
        super().__init__()
        a = m.attention
        if a.kind == "mla":
            raise NotImplementedError("the reference model implements MHA/GQA only")
        self.a, self.kv, self.d = a.num_heads, a.num_kv_heads, a.head_dim
        self.q = nn.Linear(m.hidden, a.num_heads * a.head_dim, bias=False)
        self.k = nn.Linear(m.hidden, a.num_kv_heads * a.head_dim, bias=False)
        self.v = nn.Linear(m.hidden, a.num_kv_heads * a.head_dim, bias=False)
        self.o = nn.Linear(a.num_heads * a.head_dim, m.hidden, bias=False)

    def forward(self, x_BSH, cos, sin):
        B, S, _ = x_BSH.shape
        q = self.q(x_BSH).view(B, S, self.a, self.d).transpose(1, 2)
        k = self.k(x_BSH).view(B, S, self.kv, self.d).transpose(1, 2)
        v = self.v(x_BSH).view(B, S, self.kv, self.d).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.a)
        return self.o(out.transpose(1, 2).reshape(B, S, self.a * self.d))


class SwiGLU(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.up = nn.Linear(h, 2 * f, bias=False)  # fused gate | up
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x):
        g, u = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class MoE(nn.Module):
    """Top-k MoE; ``capacity_factor`` None = padding-free (dropless), else padded buffers of
    ceil(cf * T * K / E) rows per expert (overflow dropped)."""

    def __init__(self, m: ModelSpec, capacity_factor: float | None):
        super().__init__()
        moe = m.moe
        self.E, self.K, self.cf = moe.num_experts, moe.top_k, capacity_factor
        self.router = nn.Linear(m.hidden, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(m.hidden, moe.expert_ffn) for _ in range(self.E))
        self.shared = None
        if moe.num_shared_experts:
            self.shared = SwiGLU(m.hidden, moe.shared_expert_ffn * moe.num_shared_experts)

    def forward(self, x_BSH):
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        probs_TE = torch.softmax(self.router(x_TH), dim=-1)
        w_TK, idx_TK = probs_TE.topk(self.K, dim=-1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        flat_R = idx_TK.reshape(-1)
        order_R = torch.argsort(flat_R, stable=True)
        token_R = order_R // self.K
        counts = torch.bincount(flat_R, minlength=self.E).tolist()
        w_R = w_TK.reshape(-1)[order_R]
        if self.cf is None:
            x_RH = x_TH[token_R]
            parts, start = [], 0
            for e, n in enumerate(counts):
                parts.append(self.experts[e](x_RH[start:start + n]))
                start += n
            y_RH = torch.cat(parts)
        else:
            cap = math.ceil(self.cf * B * S * self.K / self.E)
            starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
            pos_R = torch.arange(flat_R.numel()) - starts[flat_R[order_R]]
            keep_R = pos_R < cap
            slot_R = flat_R[order_R] * cap + pos_R.clamp(max=cap - 1)
            # source token of every buffer slot; empty slots read an appended zero row (index T)
            src = torch.full((self.E * cap,), B * S, dtype=torch.long)
            src[slot_R[keep_R]] = token_R[keep_R]
            buf = F.pad(x_TH, (0, 0, 0, 1))[src]  # gather: autograd keeps only the indices
            y_buf = torch.cat([self.experts[e](buf[e * cap:(e + 1) * cap]) for e in range(self.E)])
            y_RH = y_buf[slot_R]
            w_R = w_R * keep_R
        out_TH = x_TH.new_zeros(B * S, H).index_add(0, token_R, y_RH * w_R[:, None])
        if self.shared is not None:
            out_TH = out_TH + self.shared(x_TH)
        return out_TH.view(B, S, H)


class Layer(nn.Module):
    def __init__(self, m: ModelSpec, moe_layer: bool, capacity_factor: float | None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(m.hidden), RMSNorm(m.hidden)
        self.attn = Attention(m)
        self.ffn = MoE(m, capacity_factor) if moe_layer else SwiGLU(m.hidden, m.dense_ffn)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.ffn(self.norm2(x))


class MoETransformer(nn.Module):
    """Decoder-only MoE LM; ``forward(ids_BS, target_BS)`` returns the mean cross-entropy."""

    def __init__(self, m: ModelSpec, *, capacity_factor: float | None = None,
                 recompute: str = "none"):
        super().__init__()
        if recompute not in ("none", "full"):
            raise ValueError(f"reference model supports recompute none/full (got {recompute!r})")
        if m.ffn_kind != "swiglu" or m.tied_embeddings:
            raise ValueError("reference model implements SwiGLU and untied embeddings only")
        self.recompute = recompute
        self.embed = nn.Embedding(m.vocab, m.hidden)
        self.layers = nn.ModuleList(
            Layer(m, i >= m.num_dense_layers, capacity_factor) for i in range(m.num_layers))
        self.norm = RMSNorm(m.hidden)
        self.head = nn.Linear(m.hidden, m.vocab, bias=False)
        d = m.attention.head_dim
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(m.seq_len).float(), inv)
        self.register_buffer("cos", torch.cat((ang.cos(), ang.cos()), -1), persistent=False)
        self.register_buffer("sin", torch.cat((ang.sin(), ang.sin()), -1), persistent=False)

    def forward(self, ids_BS, target_BS):
        S = ids_BS.shape[1]
        cos, sin = self.cos[:S], self.sin[:S]
        x = self.embed(ids_BS)
        for layer in self.layers:
            if self.recompute == "full":
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), target_BS.reshape(-1))
