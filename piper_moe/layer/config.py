"""MoEConfig: the shape and routing policy of one MoE layer, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

ROUTERS = ("softmax", "sigmoid")
# FP8 dispatch wire format (layer/precision.py; here without torch, for the resource model):
# one float32 scale per FP8_BLOCK hidden elements of a row
FP8_BLOCK = 128
FP8_SCALE_BYTES = 4


def fp8_blocks(hidden: int) -> int:
    """Scale blocks per row of the FP8 dispatch: ceil(hidden / FP8_BLOCK)."""
    return -(-hidden // FP8_BLOCK)


def fp8_row_bytes(hidden: int) -> int:
    """Bytes of one FP8-dispatched row on the wire: hidden e4m3 bytes + its float32 scales."""
    return hidden + FP8_SCALE_BYTES * fp8_blocks(hidden)


@dataclass(frozen=True)
class MoEConfig:
    """One DeepSeek-style MoE layer.

    hidden, ffn_hidden: model width and per-expert SwiGLU width.
    num_experts, top_k: routed experts and how many each token picks.
    num_shared_experts: dense SwiGLU experts every token passes through (width
        ffn_hidden * num_shared_experts, replicated on every rank).
    router: "softmax" (DeepSeek-V2: weights are the top-k softmax probabilities, not
        renormalised) or "sigmoid" (DeepSeek-V3: weights are the top-k sigmoid scores
        renormalised to sum to 1).
    num_groups, topk_groups: group-limited routing; experts form num_groups equal groups and
        each token chooses among the experts of its topk_groups best groups only.
    aux_loss_coef: weight of the batch-level load-balancing loss (0: none).
    bias_update_rate: step of the aux-loss-free balancing bias (0: bias stays zero).
    capacity_factor: None (padding-free, no token dropped) or a factor c > 0: each expert keeps
        at most ceil(c * tokens * top_k / num_experts) of a rank's (token, choice) pairs.
    """

    hidden: int
    ffn_hidden: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    router: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn_hidden", "num_experts", "top_k", "num_groups",
                     "topk_groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError("MoEConfig.num_shared_experts must be an int >= 0, got "
                             f"{self.num_shared_experts!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if self.num_experts % self.num_groups:
            raise ValueError(f"MoEConfig.num_experts={self.num_experts} is not divisible by "
                             f"num_groups={self.num_groups}")
        if self.topk_groups > self.num_groups:
            raise ValueError(f"MoEConfig.topk_groups={self.topk_groups} exceeds "
                             f"num_groups={self.num_groups}")
        selectable = self.topk_groups * (self.num_experts // self.num_groups)
        if self.top_k > selectable:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds the {selectable} experts "
                             f"in topk_groups={self.topk_groups} groups of "
                             f"{self.num_experts // self.num_groups}")
        if self.aux_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError("MoEConfig.aux_loss_coef and bias_update_rate must be >= 0, got "
                             f"{self.aux_loss_coef} and {self.bias_update_rate}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError("MoEConfig.capacity_factor must be None or > 0, got "
                             f"{self.capacity_factor}")

    @property
    def group_size(self) -> int:
        return self.num_experts // self.num_groups
