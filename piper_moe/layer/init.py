"""Deterministic weights: every tensor is a function of (seed, what it is) only, so any EP
layout, and the reference, build the same global model."""

from __future__ import annotations

import torch

_STRIDE = 100003  # > any expert id; router and shared weights use ids past the experts
ROUTER_ID = 100001
SHARED_ID = 100002


def generator(seed: int, ident: int) -> torch.Generator:
    """The generator of global expert `ident` (or ROUTER_ID / SHARED_ID)."""
    return torch.Generator().manual_seed(seed * _STRIDE + ident)


def swiglu_weights(g: torch.Generator, hidden: int, ffn: int, dtype) -> tuple[torch.Tensor, ...]:
    """(w1 [hidden, ffn], w3 [hidden, ffn], w2 [ffn, hidden]) drawn in float32 from g, then cast
    (so a float64 model is exactly the float32 one, widened)."""
    w1 = torch.randn(hidden, ffn, generator=g) * hidden ** -0.5
    w3 = torch.randn(hidden, ffn, generator=g) * hidden ** -0.5
    w2 = torch.randn(ffn, hidden, generator=g) * ffn ** -0.5
    return w1.to(dtype), w3.to(dtype), w2.to(dtype)


def router_weight(seed: int, num_experts: int, hidden: int, dtype) -> torch.Tensor:
    """The gate [num_experts, hidden]."""
    g = generator(seed, ROUTER_ID)
    return (torch.randn(num_experts, hidden, generator=g) * hidden ** -0.5).to(dtype)
