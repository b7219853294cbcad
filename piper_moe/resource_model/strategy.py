"""A parallel training strategy: the mesh, the batch, and the memory/schedule choices.

World = dp * tp * pp ranks. Dense weights (attention, dense MLP, shared experts, embedding, head)
are split by TP inside a stage and replicated over DP; routed experts are laid out over the same
dp * tp ranks of a stage as EP (whole experts) x ETP (FFN dimension) x EDP (expert data-parallel),
so ``ep * etp`` must divide ``dp * tp`` and ``edp = dp * tp / (ep * etp)`` (Megatron's "MoE parallel
folding"). Rank order, innermost first: tp, dp, pp (experts: etp, ep, edp).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..common import CHUNK_MEMORY, DISPATCHERS, FP8_GEMMS, PRECISIONS, SCHEDULES, even_split
from ..layer.config import FP8_BLOCK
from .spec import ModelSpec

RECOMPUTE = ("none", "selective", "full")
A2A = ("flat", "halo")


@dataclass(kw_only=True, frozen=True)
class Strategy:
    """One configuration to estimate.

    ``micro_batch`` sequences of ``seq_len`` tokens per micro-batch; ``global_batch`` sequences per
    step over all DP replicas, so a step runs ``num_micro = global_batch / (micro_batch * dp)``
    micro-batches per pipeline. ``zero`` 0-3 shards optimizer states (1), gradients (2) and weights
    (3) over DP (dense) and EDP (experts). ``precision`` "bf16": bf16 weights and activations, fp32
    gradients and Adam (master, m, v) (Megatron's mixed precision); "bf16-mixed": Piper's
    runtime policy (``piper_moe/layer/precision.py``): fp32 weights, gradients and Adam (no
    separate master), bf16 GEMM inputs and outputs, fp32 residual stream, norms, router and
    combine sums, and a bf16 copy of every GEMM weight made by each micro-batch's forward and
    kept for its backward; "fp32": everything fp32, no master copy. ``fp8_dispatch``: the
    dispatch all-to-all carries e4m3 rows with a float32 scale per 128 elements (bf16
    precisions only). ``fp8_gemm`` (with fp8_dispatch; ``piper_moe/layer/fp8_gemm.py``):
    "scaled" runs the experts' up (gate|up) projections forward as FP8 GEMMs on the
    platform's FP8 peak and keeps their weights for backward as e4m3 (1 byte + a scale per
    128), "dequantize" as bf16 GEMMs, "auto" scaled where the platform has an FP8 peak
    (``peak_flops_fp8``) and the hidden size is a multiple of 128 (``scaled_fp8_gemm``).
    ``capacity_factor`` None means padding-free (dropless) expert buffers, a number means buffers
    padded to ``capacity_factor * tokens * top_k / num_experts`` rows per expert.
    ``expert_imbalance`` is max/mean routed rows per rank for padding-free buffers (1 = balanced).
    ``layers_per_stage`` gives an uneven pipeline split (None: as even as possible, extra layers to
    the first stages). ``overlap_a2a`` lets the schedule hide all-to-all behind another
    micro-batch's compute (not with gpipe or a single micro-batch). ``dispatcher`` "alltoall"
    (expert-parallel all-to-all, ``a2a``) or "ppmoe" (the TP group is the EP group, ``ep == tp``,
    ``etp == 1``, inside one node: the MoE block's TP collective sums the experts' partial
    outputs and no all-to-all runs; ``dispatch_cost.py``); ppmoe needs ``sequence_parallel``
    (the expert-row model assumes each TP rank routes T / tp tokens' worth of rows).
    ``moe_chunks`` C > 1: the runtime's MPipeMoE-style chunked MoE layer (``pipeline_chunks``;
    alltoall dispatcher only): each layer's all-to-all is split into C pieces whose transfer
    overlaps the experts of the other chunks in forward, the backward recomputes the experts
    (no expert intermediates are kept), and ``chunk_memory`` says what is kept of the dispatched
    expert input rows: "save" (on the device), "offload" (to host: not counted in device
    memory) or "recompute" (a second dispatch all-to-all in backward). Needs ep > 1 and a
    schedule other than zb-h1 (whose split backward would run the chunked experts twice).
    """

    dp: int
    tp: int
    pp: int
    ep: int
    etp: int = 1
    vpp: int = 1
    micro_batch: int
    global_batch: int
    seq_len: int
    zero: int = 1
    recompute: str = "none"
    schedule: str = "1f1b"
    a2a: str = "flat"
    precision: str = "bf16"
    capacity_factor: float | None = None
    expert_imbalance: float = 1.0
    layers_per_stage: tuple[int, ...] | None = None
    overlap_a2a: bool = False
    sequence_parallel: bool = True
    dispatcher: str = "alltoall"
    moe_chunks: int = 1
    chunk_memory: str = "save"
    fp8_dispatch: bool = False
    fp8_gemm: str = "auto"

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep", "etp", "vpp", "micro_batch", "global_batch",
                     "seq_len", "moe_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Strategy.{name} must be a positive int (got {value!r})")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"Strategy.zero must be 0, 1, 2 or 3 (got {self.zero!r})")
        for name, allowed in (("recompute", RECOMPUTE), ("schedule", SCHEDULES), ("a2a", A2A),
                              ("precision", PRECISIONS), ("dispatcher", DISPATCHERS),
                              ("chunk_memory", CHUNK_MEMORY)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Strategy.{name} must be one of {allowed} (got {getattr(self, name)!r})"
                )
        if self.global_batch % (self.micro_batch * self.dp):
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch "
                f"({self.micro_batch}) x dp ({self.dp})"
            )
        if (self.dp * self.tp) % (self.ep * self.etp):
            raise ValueError(
                f"ep ({self.ep}) x etp ({self.etp}) must divide dp ({self.dp}) x tp ({self.tp})"
            )
        if self.dispatcher == "ppmoe" and not (self.tp > 1 and self.ep == self.tp
                                               and self.etp == 1 and self.sequence_parallel):
            raise ValueError(
                f"dispatcher 'ppmoe' needs tp > 1, ep == tp, etp == 1 and sequence_parallel "
                f"(got tp={self.tp}, ep={self.ep}, etp={self.etp}, "
                f"sequence_parallel={self.sequence_parallel})"
            )
        if self.moe_chunks > 1 and (self.dispatcher != "alltoall" or self.ep == 1
                                    or self.schedule == "zb-h1"):
            raise ValueError(f"moe_chunks ({self.moe_chunks}) > 1 needs dispatcher 'alltoall', "
                             f"ep > 1 and a schedule other than zb-h1 (the runtime's chunked "
                             f"layer; got dispatcher={self.dispatcher!r}, ep={self.ep}, "
                             f"schedule={self.schedule!r})")
        if self.vpp > 1 and self.schedule != "interleaved":
            raise ValueError(f"vpp ({self.vpp}) > 1 needs schedule 'interleaved' "
                             f"(got {self.schedule!r})")
        if self.schedule == "interleaved":
            if self.vpp < 2 or self.pp < 2:
                raise ValueError(
                    f"schedule 'interleaved' needs vpp >= 2 and pp >= 2 (got vpp={self.vpp}, "
                    f"pp={self.pp})"
                )
            if self.num_micro % self.pp:
                raise ValueError(
                    f"schedule 'interleaved' needs num_micro ({self.num_micro}) to be a multiple "
                    f"of pp ({self.pp})"
                )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (got {self.capacity_factor})")
        if self.expert_imbalance < 1:
            raise ValueError(f"expert_imbalance must be >= 1 (got {self.expert_imbalance})")
        if self.fp8_dispatch and self.precision == "fp32":
            raise ValueError("fp8_dispatch needs precision 'bf16' or 'bf16-mixed' (got 'fp32')")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS} (got {self.fp8_gemm!r})")
        if self.fp8_gemm == "scaled" and not self.fp8_dispatch:
            raise ValueError("fp8_gemm 'scaled' needs fp8_dispatch")
        if self.layers_per_stage is not None:
            object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))
            if len(self.layers_per_stage) != self.pp or min(self.layers_per_stage) < self.vpp:
                raise ValueError(
                    f"layers_per_stage {self.layers_per_stage} must have pp ({self.pp}) entries, "
                    f"each >= vpp ({self.vpp})"
                )

    @property
    def world(self) -> int:
        """Number of ranks."""
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard."""
        return self.dp * self.tp // (self.ep * self.etp)

    @property
    def num_micro(self) -> int:
        """Micro-batches per step per pipeline."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def sp(self) -> int:
        """Divisor of hidden-sized activations: tp with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers held by each pipeline rank (the union of its virtual chunks)."""
        if self.layers_per_stage is not None:
            if sum(self.layers_per_stage) != num_layers:
                raise ValueError(
                    f"layers_per_stage {self.layers_per_stage} sums to "
                    f"{sum(self.layers_per_stage)}, the model has {num_layers} layers"
                )
            return self.layers_per_stage
        return tuple(even_split(num_layers, self.pp))

    def check(self, model: ModelSpec) -> None:
        """Raise ValueError if this strategy cannot run ``model``."""
        a, m = model.attention, model.moe
        if a.num_heads % self.tp:
            raise ValueError(f"tp ({self.tp}) must divide num_heads ({a.num_heads})")
        if m.num_experts % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide num_experts ({m.num_experts})")
        if m.expert_ffn % self.etp:
            raise ValueError(f"etp ({self.etp}) must divide expert_ffn ({m.expert_ffn})")
        if model.num_layers < self.pp * self.vpp:
            raise ValueError(
                f"pp ({self.pp}) x vpp ({self.vpp}) exceeds num_layers ({model.num_layers})"
            )
        if model.vocab % self.tp:
            raise ValueError(f"tp ({self.tp}) must divide vocab ({model.vocab})")
        self.stage_layers(model.num_layers)


def scaled_fp8_gemm(model: ModelSpec, platform, s: Strategy) -> bool:
    """Whether the experts' up projections run as scaled FP8 GEMMs: fp8_dispatch with
    fp8_gemm "scaled", or "auto" on a platform with an FP8 peak and hidden % 128 == 0 (the
    runtime's rule, ``piper_moe/layer/fp8_gemm.py``)."""
    if not s.fp8_dispatch or s.fp8_gemm == "dequantize":
        return False
    return s.fp8_gemm == "scaled" or (platform.peak_flops_fp8 is not None
                                      and model.hidden % FP8_BLOCK == 0)


def resolve_fp8_gemm(model: ModelSpec, platform, s: Strategy) -> Strategy:
    """s with fp8_gemm "scaled" or "dequantize" as scaled_fp8_gemm decides on platform (s
    itself without fp8_dispatch): what the memory model reads."""
    if not s.fp8_dispatch:
        return s
    return replace(s, fp8_gemm="scaled" if scaled_fp8_gemm(model, platform, s) else "dequantize")
