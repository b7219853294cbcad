"""Weight inventory of a model: every linear layer with its shape and how it is sharded.

A layer is a list of ``Linear`` (d_in, d_out, copies, shard) plus norm vectors. ``shard`` says which
parallel dimension splits the weight:

- ``"tp"``: tensor-parallel (attention projections, dense MLP, shared experts, vocab-parallel
  embedding and head), split by TP;
- ``"rep"``: replicated on every TP rank (router, MLA down-projections, norms);
- ``"expert"``: routed experts, ``copies`` = num_experts, split by EP (whole experts) x ETP (the
  FFN dimension), never by TP.

FLOPs of a linear on T tokens are 2*T*d_in*d_out per copy the token visits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .spec import ModelSpec


@dataclass(kw_only=True, frozen=True)
class Linear:
    """A [d_in, d_out] weight present ``copies`` times; a token visits ``active`` of the copies."""

    name: str
    d_in: int
    d_out: int
    shard: str
    copies: int = 1
    active: float = 1.0

    @property
    def params(self) -> int:
        return self.d_in * self.d_out * self.copies


@lru_cache(maxsize=64)
def attention_linears(model: ModelSpec) -> tuple[Linear, ...]:
    """Linears of one attention block (see ``AttentionSpec``)."""
    a, h = model.attention, model.hidden
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        out = []
        if a.q_lora_rank:
            out.append(Linear(name="q_down", d_in=h, d_out=a.q_lora_rank, shard="rep"))
            out.append(Linear(name="q_up", d_in=a.q_lora_rank, d_out=a.num_heads * qk, shard="tp"))
        else:
            out.append(Linear(name="q", d_in=h, d_out=a.num_heads * qk, shard="tp"))
        out.append(
            Linear(name="kv_down", d_in=h, d_out=a.kv_lora_rank + a.qk_rope_head_dim, shard="rep")
        )
        out.append(
            Linear(
                name="kv_up",
                d_in=a.kv_lora_rank,
                d_out=a.num_heads * (a.qk_nope_head_dim + a.v_head_dim),
                shard="tp",
            )
        )
        out.append(Linear(name="o", d_in=a.num_heads * a.v_head_dim, d_out=h, shard="tp"))
        return tuple(out)
    q = a.num_heads * a.head_dim
    kv = a.num_kv_heads * a.head_dim
    return (
        Linear(name="qkv", d_in=h, d_out=q + 2 * kv, shard="tp"),
        Linear(name="o", d_in=q, d_out=h, shard="tp"),
    )


def attention_norm_params(model: ModelSpec) -> int:
    """Norm vectors inside attention (MLA latent norms, Qwen3 q/k norms), replicated."""
    a = model.attention
    if a.kind == "mla":
        return a.kv_lora_rank + a.q_lora_rank
    return 2 * a.head_dim if a.qk_norm else 0


@lru_cache(maxsize=256)
def ffn_linears(d_model: int, d_ffn: int, gated: bool, name: str, shard: str, copies: int = 1,
                active: float = 1.0) -> tuple[Linear, ...]:
    """Linears of one FFN (gated: gate+up fused as [h, 2f], then down [f, h])."""
    width = 2 * d_ffn if gated else d_ffn
    return (
        Linear(name=f"{name}_up", d_in=d_model, d_out=width, shard=shard, copies=copies,
               active=active),
        Linear(name=f"{name}_down", d_in=d_ffn, d_out=d_model, shard=shard, copies=copies,
               active=active),
    )


@lru_cache(maxsize=64)
def dense_layer_linears(model: ModelSpec) -> tuple[Linear, ...]:
    """Linears of a dense transformer layer (attention + dense FFN)."""
    gated = model.ffn_kind == "swiglu"
    return attention_linears(model) + ffn_linears(model.hidden, model.dense_ffn, gated, "mlp", "tp")


@lru_cache(maxsize=64)
def moe_layer_linears(model: ModelSpec) -> tuple[Linear, ...]:
    """Linears of an MoE layer (attention + router + shared experts + routed experts)."""
    m, h = model.moe, model.hidden
    gated = model.ffn_kind == "swiglu"
    out = list(attention_linears(model))
    out.append(Linear(name="router", d_in=h, d_out=m.num_experts, shard="rep"))
    if m.num_shared_experts:
        out += ffn_linears(h, m.shared_expert_ffn * m.num_shared_experts, gated, "shared", "tp")
    out += ffn_linears(h, m.expert_ffn, gated, "expert", "expert", copies=m.num_experts,
                       active=m.top_k)
    return tuple(out)


def layer_norm_params(model: ModelSpec, moe_layer: bool) -> int:
    """Replicated vectors of one layer: two RMSNorms, attention norms, router bias."""
    extra = model.moe.num_experts if (moe_layer and model.moe.router_bias) else 0
    return 2 * model.hidden + attention_norm_params(model) + extra


@dataclass(kw_only=True, frozen=True)
class ParamCount:
    """Parameter counts of a whole model (counts, not bytes)."""

    total: int
    active: int
    active_no_embedding: int
    embedding: int
    head: int


def count_params(model: ModelSpec) -> ParamCount:
    """Total and per-token active parameter counts."""
    total = active = 0
    for moe_layer, n in ((False, model.num_dense_layers), (True, model.num_moe_layers)):
        linears = moe_layer_linears(model) if moe_layer else dense_layer_linears(model)
        norms = layer_norm_params(model, moe_layer)
        total += n * (sum(lin.params for lin in linears) + norms)
        active += n * (sum(lin.d_in * lin.d_out * lin.active for lin in linears) + norms)
    embedding = model.vocab * model.hidden
    head = 0 if model.tied_embeddings else model.vocab * model.hidden
    final_norm = model.hidden
    total += embedding + head + final_norm
    active_no_embedding = int(active) + final_norm + model.vocab * model.hidden
    return ParamCount(
        total=int(total),
        active=int(active) + embedding + head + final_norm,
        active_no_embedding=active_no_embedding,
        embedding=embedding,
        head=head,
    )
