"""mpirun cases: bytes one MoE layer saves for backward, measured, for tests/model/
test_layer_memory.py to set against piper_moe.resource_model.memory's formulas."""

from __future__ import annotations

import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.saved import SavedTensors

# hidden 256, expert ffn 128, 16 experts top-4, one shared expert, group-limited routing
LAYER = dict(hidden=256, ffn_hidden=128, num_experts=16, top_k=4, num_shared_experts=1,
             router="sigmoid", num_groups=4, topk_groups=2)
TOKENS = 512  # per rank
VARIANTS = {"alltoall": {},
            "chunks4-save": {"pipeline_chunks": 4, "chunk_memory": "save"},
            "chunks4-recompute": {"pipeline_chunks": 4, "chunk_memory": "recompute"},
            "ppmoe": {"dispatcher": "ppmoe", "sequence_sharded": True},
            "alltoall-bf16-mixed": {"precision": "bf16-mixed"},
            "alltoall-bf16-mixed-fp8-scaled": {"precision": "bf16-mixed", "fp8_dispatch": True,
                                               "fp8_gemm": "scaled"}}


def _saved(layer, x: torch.Tensor) -> int:
    """Bytes of the storages one forward saves for backward (parameters excluded, each
    storage once); runs the backward (collective)."""
    x = x.clone().requires_grad_()
    with SavedTensors(exclude=layer.parameters()) as saved:
        y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    return saved.bytes


def saved(local_size: int = 2) -> dict:
    """Per variant: saved bytes, the rows this rank's experts received (R) and the (token,
    choice) pairs it routed (N), float32, TOKENS tokens per rank."""
    comm = pc.init(local_size=local_size)
    torch.manual_seed(comm.rank)
    x = torch.randn(TOKENS, LAYER["hidden"])
    out = {}
    for name, kw in VARIANTS.items():
        layer = MoELayer(MoEConfig(**LAYER), comm, seed=0, dtype=torch.float32, dedup=False,
                         **kw)
        b = _saved(layer, x)
        rows = int(sum(layer.stats["tokens_per_expert"][e] for e in layer.local_experts))
        out[name] = {"saved": b, "rows": rows, "chunks": layer.stats.get("chunks"),
                     "chunk_memory": layer.stats.get("chunk_memory")}
    return out
