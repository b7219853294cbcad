"""A peer MoE layer for bench/moe_layer.py: torchtitan's MoE (torchtitan 0.3.0,
torchtitan.models.common.moe) with its expert-parallel all-to-all token dispatcher, as shipped:
fp32 parameters, router in fp32, tokens dispatched and combined in fp32, the routed experts'
grouped GEMMs in bf16 (GroupedExperts casts tokens and weights), the shared expert in fp32.

    layer = torchtitan_layer(cfg, sd, comm_size, rank, ep_mesh)   # collective: nothing
    y = layer(x)            # x [T, hidden] -> [T, hidden]; layer.aux_loss: a 0-d zero

sd: the global state dict of Piper's layer (MoELayer.global_state_dict() or ReferenceMoE's
state_dict()): the peer gets the same router, the same experts (this rank's contiguous block
e * rank .. e * (rank + 1) - 1, torchtitan's layout) and the same shared expert, so both
layers compute the same function. ep_mesh: a 1-D torch DeviceMesh over the EP ranks (gloo
on CPU), or None for EP = 1. Routing matches MoELayer's: sigmoid scores renormalised over the
top-k (route_norm) or softmax probabilities as they are, group-limited by the sum of each
group's two best scores; no balancing loss or bias. Imported only when the benchmark asks for
the peer (torchtitan is not a dependency of Piper).
"""

from __future__ import annotations

import torch
from torch import nn


class PeerLayer(nn.Module):
    """[T, hidden] -> [T, hidden] around torchtitan's [B, L, D] MoE; aux_loss is zero (the
    peer has no balancing loss here, as MoELayer with aux_loss_coef = 0)."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.aux_loss = torch.zeros(())
        self.stats: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x.unsqueeze(0)).squeeze(0)


def torchtitan_layer(cfg, sd: dict, comm_size: int, rank: int, ep_mesh) -> PeerLayer:
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    H, F, E, k = cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k
    e = E // comm_size
    Fs = F * cfg.num_shared_experts
    grouped = cfg.num_groups > 1
    mc = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=H, hidden_dim=F, num_experts=e),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=E, top_k=k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=H, out_features=E),
            num_expert_groups=cfg.num_groups if grouped else None,
            num_limited_groups=cfg.topk_groups if grouped else None, top_k=k,
            score_func=cfg.router, route_norm=cfg.router == "sigmoid"),
        load_balance_coeff=None,
        shared_experts=(FeedForward.Config(w1=Linear.Config(in_features=H, out_features=Fs),
                                           w2=Linear.Config(in_features=Fs, out_features=H),
                                           w3=Linear.Config(in_features=H, out_features=Fs))
                        if cfg.num_shared_experts else None))
    moe = mc.build()
    if ep_mesh is not None:
        from torchtitan.distributed.utils import set_spmd_backend

        # plain process groups and functional all_to_all_single (the "partial_dtensor"
        # backend), not the spmd_types meshes a full torchtitan job sets up
        set_spmd_backend("partial_dtensor")
        moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=ep_mesh)
    lo, hi = e * rank, e * (rank + 1)
    ex = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(sd["router.weight"])
        # Piper: w1/w3 [E, hidden, ffn], w2 [E, ffn, hidden]; torchtitan: [E, F, D], [E, D, F]
        ex.w1_EFD.copy_(sd["experts.w1"][lo:hi].transpose(1, 2))
        ex.w3_EFD.copy_(sd["experts.w3"][lo:hi].transpose(1, 2))
        ex.w2_EDF.copy_(sd["experts.w2"][lo:hi].transpose(1, 2))
        if cfg.num_shared_experts:
            sh = moe.shared_experts
            sh.w1.weight.copy_(sd["shared.w1"].t())
            sh.w3.weight.copy_(sd["shared.w3"].t())
            sh.w2.weight.copy_(sd["shared.w2"].t())
    return PeerLayer(moe)
