"""Router: scores, group-limited top-k with the aux-loss-free bias, and the balancing loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .init import router_weight
from .precision import accumulate_dtype


@dataclass(frozen=True)
class Routing:
    """What the router decided for T tokens.

    experts: int64 [T, top_k], chosen global expert ids.
    weights: [T, top_k], combine weights (from the unbiased scores).
    probs: [T, num_experts], per-token expert probabilities the balancing loss uses.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


class Router(nn.Module):
    """Gate [num_experts, hidden] (a parameter) and the balancing bias [num_experts] (a buffer).

    Selection ranks experts by score + bias (DeepSeek-V3 aux-loss-free balancing); the weights
    are the scores themselves. The bias never gets a gradient: the layer calls `update_bias`
    with the global load after each training forward.
    """

    def __init__(self, cfg: MoEConfig, seed: int, dtype, device):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(router_weight(seed, cfg.num_experts, cfg.hidden, dtype)
                                   .to(device))
        self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, hidden] -> Routing for those T tokens. Logits, scores, weights and probs are
        computed in at least float32 (precision.accumulate_dtype: bf16 inputs and weights are
        upcast; see layer/precision.py for why)."""
        cfg = self.cfg
        dt = accumulate_dtype(x.dtype)
        logits = x.to(dt) @ self.weight.to(dt).t()
        if cfg.router == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        experts = select(scores.detach() + self.bias, cfg)
        weights = scores.gather(1, experts)
        if cfg.router == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(experts, weights, probs)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """bias += rate * sign(mean(load) - load), load [num_experts]: global tokens per expert.
        Every rank must pass the same load (the layer passes the all-reduced counts)."""
        load = load.to(self.bias.dtype)
        self.bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


def select(biased: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Group-limited top-k (DeepSeek-V3): biased [T, E] -> int64 [T, top_k] expert ids.

    A group's score is the sum of its two best biased scores (its best one for groups of one
    expert); each token keeps its topk_groups best groups and picks top_k experts among them.
    """
    if cfg.num_groups == 1:
        return biased.topk(cfg.top_k, dim=-1).indices
    T = biased.shape[0]
    grouped = biased.view(T, cfg.num_groups, cfg.group_size)
    group_score = grouped.topk(min(2, cfg.group_size), dim=-1).values.sum(dim=-1)
    keep = group_score.topk(cfg.topk_groups, dim=-1).indices
    mask = torch.zeros(T, cfg.num_groups, dtype=torch.bool, device=biased.device)
    mask.scatter_(1, keep, True)
    masked = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(T, cfg.num_experts)
    return masked.topk(cfg.top_k, dim=-1).indices


def balance_loss(probs: torch.Tensor, global_load: torch.Tensor, global_tokens: int,
                 cfg: MoEConfig) -> torch.Tensor:
    """This rank's share of the batch-level switch-style loss coef * E * sum_e f_e * P_e, with
    f_e = global_load[e] / (global_tokens * top_k) and P_e = mean over the global batch of
    probs[:, e]. Each rank sums its own tokens' probs; the shares add up over ranks to the
    loss of the whole batch, so summing per-rank losses (what data-parallel gradient summing
    does) gives the same gradient under every EP layout. probs [T, E]; returns a 0-d tensor."""
    if global_tokens == 0:
        return probs.sum() * 0
    f = global_load.to(probs.dtype) / (global_tokens * cfg.top_k)
    p = probs.sum(dim=0) / global_tokens
    return cfg.aux_loss_coef * cfg.num_experts * (f * p).sum()


def capacity_keep(experts: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Bool [T, top_k]: which (token, choice) pairs fit when capacity_factor is set; each expert
    keeps its first ceil(c * T * top_k / E) pairs in (token, choice) order and drops the rest
    (a dropped pair contributes nothing to the token's output). Per rank, so which pairs drop
    depends on how the batch is split."""
    T, k = experts.shape
    cap = math.ceil(cfg.capacity_factor * T * k / cfg.num_experts)
    flat = experts.reshape(-1)
    onehot = F.one_hot(flat, cfg.num_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
    return (position < cap).view(T, k)
