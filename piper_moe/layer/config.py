"""MoEConfig (what the layer computes: shape and routing) and MoEOptions (how it runs:
dispatch, chunking, precision), both validated on construction; no torch needed."""

from __future__ import annotations

from dataclasses import dataclass

from ..common import CHUNK_MEMORY, DISPATCHERS, FP8_GEMMS, PRECISIONS

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


@dataclass(kw_only=True, frozen=True)
class MoEOptions:
    """How one MoELayer runs. Every choice computes the same function of the same weights (up
    to summation order, and to the precision chosen), so a model moves between them freely.

    dispatcher: "alltoall" (expert parallel over comm: padding-free all-to-all-v dispatch and
        combine) or "ppmoe" (comm is a tensor-parallel group inside one node holding the same
        tokens; each rank computes its own experts' pairs and an all-reduce sums them;
        layer/ppmoe.py).
    dedup: node-level dedup on the alltoall path: a token bound for several experts on one node
        crosses to that node once and is replicated there, its partial outputs summed there
        before crossing back. Only used when comm spans several nodes.
    sequence_sharded: ppmoe only: each rank passes its shard of the group's tokens, all-gathered
        first (reduce-scatter at the end instead of an all-reduce).
    pipeline_chunks: 1, an int C > 1 or "auto": the alltoall path without dedup splits the
        tokens into C chunks and overlaps each chunk's experts with the other chunks'
        asynchronous all-to-alls (layer/chunked.py); "auto" times C in (1, 2, 4) and agrees
        on one C on every rank, again every pipeline_recheck forwards.
    chunk_memory: what a chunked forward keeps of its dispatched rows for backward: "save",
        "offload" (to host), "recompute" (re-dispatch in backward) or "auto" (per forward, from
        the free device memory: at most chunk_memory_headroom of it; layer/chunk_memory.py).
    precision: "fp32" (parameters and compute in the layer's dtype), "bf16-mixed" (float32
        parameters, bf16 GEMMs and exchanged rows) or "bf16" (layer/precision.py).
    fp8_dispatch: the dispatch carries rows as float8 e4m3 with a float32 scale per 128
        elements (half of bf16's bytes); needs a bf16 precision.
    fp8_gemm: with fp8_dispatch, how the experts' first GEMMs take the FP8 rows: "scaled"
        (FP8 GEMM against e4m3-rounded weights), "dequantize" (bf16 GEMM on the dequantized
        rows) or "auto" (scaled where a native block-scaled FP8 GEMM exists: Hopper;
        layer/fp8_gemm.py). Ignored without fp8_dispatch, except that "scaled" then is an
        error; PPMoE's experts always dequantize.
    """

    dispatcher: str = "alltoall"
    dedup: bool = True
    sequence_sharded: bool = False
    pipeline_chunks: int | str = 1
    pipeline_recheck: int = 50
    chunk_memory: str = "auto"
    chunk_memory_headroom: float = 0.25
    precision: str = "fp32"
    fp8_dispatch: bool = False
    fp8_gemm: str = "auto"

    def __post_init__(self) -> None:
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {self.dispatcher!r}")
        if self.sequence_sharded and self.dispatcher != "ppmoe":
            raise ValueError("sequence_sharded=True needs dispatcher='ppmoe'")
        c = self.pipeline_chunks
        if c != "auto" and not (isinstance(c, int) and not isinstance(c, bool) and c >= 1):
            raise ValueError(f"pipeline_chunks must be an int >= 1 or 'auto', got {c!r}")
        if not isinstance(self.pipeline_recheck, int) or self.pipeline_recheck < 1:
            raise ValueError("pipeline_recheck must be an int >= 1, got "
                             f"{self.pipeline_recheck!r}")
        modes = ("auto", *CHUNK_MEMORY)
        if self.chunk_memory not in modes:
            raise ValueError(f"chunk_memory must be one of {modes}, got {self.chunk_memory!r}")
        h = self.chunk_memory_headroom
        if not (isinstance(h, (int, float)) and 0 < h <= 1):
            raise ValueError(f"chunk_memory_headroom must be in (0, 1], got {h!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fp8_dispatch and self.precision == "fp32":
            raise ValueError("fp8_dispatch=True needs precision 'bf16-mixed' or 'bf16' (the "
                             "expert input is dequantized to bfloat16), got 'fp32'")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS}, got {self.fp8_gemm!r}")
        if self.fp8_gemm == "scaled" and not self.fp8_dispatch:
            raise ValueError("fp8_gemm='scaled' needs fp8_dispatch=True (it multiplies the "
                             "FP8-dispatched rows)")
