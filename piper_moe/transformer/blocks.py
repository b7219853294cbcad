"""Building blocks of the decoder: RMSNorm, rotary embedding, causal self-attention, dense FFN.

Shapes: b batch, s sequence, h hidden, H query heads, K key/value heads, d head dim. Every
module works on [b, s, h] and has no biases. Weights are created empty here; ``transformer.py``
initialises them (``init_weights``) from (seed, global layer index, parameter name) only.

Attention kinds (``AttentionSpec.kind``):
- ``mha``/``gqa``: one fused projection qkv [h -> (H + 2K) d]; GQA repeats each K/V head
  H / K times; optional ``qk_norm`` (Qwen3): an RMSNorm over d on q and on k before RoPE.
- ``mla`` (DeepSeek-V2/V3 multi-head latent attention, the plain non-absorbed form): q from
  ``q`` [h -> H(dn + dr)] or ``q_down`` [h -> q_lora_rank] + RMSNorm + ``q_up``; the joint
  ``kv_down`` [h -> kv_lora_rank + dr] gives the latent c (RMSNorm) and one rope key k_r
  shared by all heads; ``kv_up`` [kv_lora_rank -> H(dn + dv)] gives k_nope and v per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..resource_model.spec import AttentionSpec

ROPE_THETA = 10000.0
NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (size ``dim``), computed in
    float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope_tables(seq_len: int, dim: int, device, theta: float = ROPE_THETA
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 [seq_len, dim] for positions 0..seq_len-1 (rotate-half layout:
    frequency i at columns i and i + dim/2). dim must be even."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even (got {dim})")
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., s, dim] rotated by position (cos/sin [s, dim] from rope_tables), float32
    arithmetic, result in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _linear(d_in: int, d_out: int, dtype, device) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device)


class Attention(nn.Module):
    """Causal self-attention for ``mha``/``gqa``: x [b, s, h] -> [b, s, h].

    Parameters: qkv.weight [(H + 2K) d, h], o.weight [h, H d], and with qk_norm
    q_norm.weight / k_norm.weight [d] (the counts of ``params.attention_linears``).
    forward(x, rope): rope = rope_tables(s, d) (the Stage computes it once per forward).
    """

    def __init__(self, hidden: int, a: AttentionSpec, dtype=torch.float32, device="cpu"):
        super().__init__()
        if a.kind not in ("mha", "gqa"):
            raise ValueError(f"Attention handles mha/gqa (got {a.kind!r}); use MLAttention")
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.qkv = _linear(hidden, (a.num_heads + 2 * a.num_kv_heads) * a.head_dim, dtype, device)
        self.o = _linear(a.num_heads * a.head_dim, hidden, dtype, device)
        self.q_norm = RMSNorm(a.head_dim, dtype=dtype, device=device) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, dtype=dtype, device=device) if a.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        H, K, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * d, K * d, K * d], dim=-1)
        q = q.view(b, s, H, d)
        k = k.view(b, s, K, d)
        v = v.view(b, s, K, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # [b, heads, s, d] for SDPA; RoPE on q and k only
        q = apply_rope(q.transpose(1, 2), *rope)
        k = apply_rope(k.transpose(1, 2), *rope)
        v = v.transpose(1, 2)
        if K != H:  # GQA: query head j reads K/V head j // (H / K)
            k = k.repeat_interleave(H // K, dim=1)
            v = v.repeat_interleave(H // K, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, H * d))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention (training form, latent expanded per head):
    x [b, s, h] -> [b, s, h].

    Parameters (``params.attention_linears`` for ``mla``): q.weight [H(dn+dr), h], or
    q_down.weight [q_lora_rank, h] + q_norm.weight [q_lora_rank] + q_up.weight
    [H(dn+dr), q_lora_rank]; kv_down.weight [kv_lora_rank + dr, h], kv_norm.weight
    [kv_lora_rank], kv_up.weight [H(dn+dv), kv_lora_rank], o.weight [h, H dv].
    forward(x, rope): rope = rope_tables(s, dr). Softmax scale 1/sqrt(dn + dr) (no YaRN
    mscale).
    """

    def __init__(self, hidden: int, a: AttentionSpec, dtype=torch.float32, device="cpu"):
        super().__init__()
        H = a.num_heads
        self.a = a
        self.qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            self.q_down = _linear(hidden, a.q_lora_rank, dtype, device)
            self.q_norm = RMSNorm(a.q_lora_rank, dtype=dtype, device=device)
            self.q_up = _linear(a.q_lora_rank, H * self.qk_dim, dtype, device)
        else:
            self.q = _linear(hidden, H * self.qk_dim, dtype, device)
        self.kv_down = _linear(hidden, a.kv_lora_rank + a.qk_rope_head_dim, dtype, device)
        self.kv_norm = RMSNorm(a.kv_lora_rank, dtype=dtype, device=device)
        self.kv_up = _linear(a.kv_lora_rank, H * (a.qk_nope_head_dim + a.v_head_dim), dtype,
                             device)
        self.o = _linear(H * a.v_head_dim, hidden, dtype, device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a = self.a
        b, s, _ = x.shape
        H, dn, dr, dv = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        q = self.q_up(self.q_norm(self.q_down(x))) if a.q_lora_rank else self.q(x)
        q = q.view(b, s, H, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        c, k_rope = self.kv_down(x).split([a.kv_lora_rank, dr], dim=-1)
        kv = self.kv_up(self.kv_norm(c)).view(b, s, H, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        # the decoupled rope key: one [b, 1, s, dr] shared by every head
        k_rope = apply_rope(k_rope.unsqueeze(1), *rope).expand(b, H, s, dr)
        q = torch.cat([q_nope, apply_rope(q_rope, *rope)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, H * dv))


def make_attention(hidden: int, a: AttentionSpec, dtype=torch.float32, device="cpu"
                   ) -> nn.Module:
    """Attention for a.kind: Attention (mha/gqa) or MLAttention (mla)."""
    cls = MLAttention if a.kind == "mla" else Attention
    return cls(hidden, a, dtype=dtype, device=device)


def rope_dim(a: AttentionSpec) -> int:
    """Width the rotary tables need for this attention: head_dim, or qk_rope_head_dim (MLA)."""
    return a.qk_rope_head_dim if a.kind == "mla" else a.head_dim


class DenseFFN(nn.Module):
    """x [..., h] -> [..., h]. swiglu: w2(silu(w1 x) * w3 x); gelu: w2(gelu(w1 x)).
    Parameters w1.weight [ffn, h], (swiglu) w3.weight [ffn, h], w2.weight [h, ffn]."""

    def __init__(self, hidden: int, ffn: int, kind: str = "swiglu", dtype=torch.float32,
                 device="cpu"):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"DenseFFN kind must be 'swiglu' or 'gelu' (got {kind!r})")
        self.kind = kind
        self.w1 = _linear(hidden, ffn, dtype, device)
        self.w3 = _linear(hidden, ffn, dtype, device) if kind == "swiglu" else None
        self.w2 = _linear(ffn, hidden, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
