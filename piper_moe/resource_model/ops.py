"""Framework operations a training step dispatches: what ``platform.op_overhead`` is charged on.

Each aten operation the runtime dispatches (a GEMM, a view, an element-wise op, a cast under
autocast, the autograd node's backward) costs host time beyond its arithmetic: dispatch,
autograd bookkeeping and the Python around it. On a CPU host that time adds to the compute (the
same core runs both); a tiny model's step is mostly this. The counts below are Piper's runtime
as it is (``piper_moe.transformer.Stage`` with ``piper_moe.layer.MoELayer``), counted with a
``TorchDispatchMode`` on tiny-moe at EP = 1; they do not depend on the widths, and an MoE
layer's do not depend on its expert count (the experts run as one grouped GEMM). EP > 1 adds
the dispatch's own few operations (not counted). ``tests/model/test_ops.py`` recounts them
and fails when the runtime has drifted from this table by more than 10%.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartOps:
    """Operations of one model part per micro-batch, forward and backward, and the parameter
    tensors it holds (the optimizer's per-step work is per tensor)."""

    forward: int
    backward: int
    tensors: int


# precision -> part -> ops (dense / moe: one transformer block; embed: the embedding lookup;
# head: final norm, LM head and the loss)
PART_OPS: dict[str, dict[str, PartOps]] = {
    "fp32": {"dense": PartOps(82, 128, 7), "moe": PartOps(120, 165, 11),
             "embed": PartOps(12, 5, 1), "head": PartOps(22, 38, 2)},
    "bf16-mixed": {"dense": PartOps(94, 142, 7), "moe": PartOps(134, 182, 11),
                   "embed": PartOps(12, 5, 1), "head": PartOps(24, 42, 2)},
    "bf16": {"dense": PartOps(90, 138, 7), "moe": PartOps(131, 180, 11),
             "embed": PartOps(12, 7, 1), "head": PartOps(24, 42, 2)},
}

# Per parameter tensor and step: gradient clipping, AdamW's update, zeroing the gradients
# (706 operations for tiny-moe's 43 tensors on one rank).
OPS_PER_TENSOR_STEP = 16.4


def part_ops(precision: str, part: str) -> PartOps:
    """The counts of ``part`` ("dense", "moe", "embed", "head") under ``precision``."""
    return PART_OPS[precision][part]
