"""Names and small rules that the MoE layer, the resource model, the runtime and the trainer
share, defined here once (no torch, so the resource model stays light).

    DISPATCHERS     how an MoE layer moves tokens to its experts: "alltoall" (expert
                    parallel, piper_moe/layer/dispatch.py) or "ppmoe" (piper_moe/layer/ppmoe.py)
    PRECISIONS      "fp32", "bf16-mixed", "bf16" (piper_moe/layer/precision.py says what each
                    keeps in which dtype)
    CHUNK_MEMORY    what a chunked layer keeps of its dispatched rows for backward
                    (piper_moe/layer/chunk_memory.py); the layer also takes "auto"
    FP8_GEMMS       how the experts multiply FP8-dispatched rows: "auto", "scaled",
                    "dequantize" (piper_moe/layer/fp8_gemm.py)
    SCHEDULES       the pipeline schedules of piper_moe/runtime/schedules.py
    even_split(n, parts)  n items over `parts` consecutive parts, the first n % parts one
                    larger: pipeline stages' layers, PPMoE's reduce-scatter rows
"""

from __future__ import annotations

DISPATCHERS = ("alltoall", "ppmoe")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
CHUNK_MEMORY = ("save", "offload", "recompute")
FP8_GEMMS = ("auto", "scaled", "dequantize")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def even_split(n: int, parts: int) -> list[int]:
    """Sizes of `parts` consecutive parts of n items: n // parts each, the first n % parts one
    more (so sizes differ by at most one and sum to n)."""
    base, extra = divmod(n, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]
