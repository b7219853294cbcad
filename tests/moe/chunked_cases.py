"""Rank-side cases of the chunked-pipeline tests (run through tests/launch.py).

Every rank builds the same global batch and output gradient from a seed and runs its slice
through MoELayer with pipeline_chunks=1 and with C > 1 (fresh layers from the same seed),
then compares output, aux loss and every gradient bitwise (float64).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer

BASE = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "top_k": 2}
SCENARIOS = {
    "softmax-shared-aux": {**BASE, "num_shared_experts": 1, "aux_loss_coef": 0.01},
    "sigmoid-grouped": {**BASE, "top_k": 3, "router": "sigmoid", "num_groups": 4,
                        "topk_groups": 2, "aux_loss_coef": 0.02},
    "capacity": {**BASE, "capacity_factor": 0.5},
}
STATS_KEYS = ("chunks", "comm_seconds_exposed", "comm_seconds_total")


def _splits(P: int) -> list[list[int]]:
    """Token counts per rank: uneven with rank P // 2 empty; and all ranks smaller than the
    largest chunk count (4), one of them holding a single token."""
    uneven = [(r % 3 + 1) * 7 for r in range(P)]
    uneven[P // 2] = 0
    return [uneven, [3, 1, 2, 1][:P]]


def _run(comm, cfg: MoEConfig, dtype, counts: list[int], chunks, seed: int,
         slot_of=None, layer=None) -> tuple[dict, MoELayer]:
    me = comm.rank
    lo, hi, total = sum(counts[:me]), sum(counts[:me + 1]), sum(counts)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    G = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    if layer is None:
        layer = MoELayer(cfg, comm, seed=seed, dtype=dtype, dedup=False, slot_of=slot_of,
                         pipeline_chunks=chunks)
    layer.zero_grad(set_to_none=True)
    x = X[lo:hi].clone().requires_grad_()
    y = layer(x)
    ((y * G[lo:hi]).sum() + layer.aux_loss).backward()
    out = {"y": y.detach(), "aux": layer.aux_loss.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in layer.named_parameters()})
    return out, layer


def _equal(a: dict, b: dict, what: str) -> int:
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, f"{what}: {key} is None on one side"
            continue
        assert torch.equal(a[key], b[key]), (
            f"{what}: {key} differs, max |diff| {(a[key] - b[key]).abs().max().item():.3e}")
    return 1


def exact(local_size: int | None = 2, seed: int = 7) -> dict:
    """C in (2, 3, 4) vs C = 1, bitwise in float64, over scenarios, token splits (an empty
    rank, ranks with fewer tokens than chunks) and a non-identity placement; float32's
    largest difference is measured and returned."""
    comm = pc.init(local_size=local_size)
    checks, f32 = 0, 0.0
    for si, counts in enumerate(_splits(comm.size)):
        for name, kw in SCENARIOS.items():
            cfg = MoEConfig(**kw)
            slot_of = (np.random.default_rng(si).permutation(cfg.num_experts)
                       if name == "capacity" else None)
            ref, _ = _run(comm, cfg, torch.float64, counts, 1, seed, slot_of)
            for chunks in (2, 3, 4):
                got, layer = _run(comm, cfg, torch.float64, counts, chunks, seed, slot_of)
                checks += _equal(ref, got, f"{name} split {counts} C={chunks} rank {comm.rank}")
                assert all(k in layer.stats for k in STATS_KEYS), layer.stats
                st = layer.stats
                assert st["chunks"] == chunks
                assert 0 <= st["comm_seconds_exposed"] <= st["comm_seconds_total"] + 1e-3, st
            if si == 0 and name == "softmax-shared-aux":  # float32: measured, not asserted
                ref32, _ = _run(comm, cfg, torch.float32, counts, 1, seed, slot_of)
                got32, _ = _run(comm, cfg, torch.float32, counts, 4, seed, slot_of)
                f32 = max([f32] + [float((ref32[k] - got32[k]).abs().max()) for k in ref32
                                   if ref32[k] is not None and ref32[k].numel()])
    return {"checks": checks, "float32_max_abs_diff": f32}


def auto(local_size: int | None = 2, seed: int = 11, recheck: int = 3) -> dict:
    """pipeline_chunks="auto": every forward stays bitwise equal to C = 1, every rank picks
    the same C (checked by an all-to-all of the choices), and it re-measures after `recheck`
    forwards."""
    comm = pc.init(local_size=local_size)
    cfg = MoEConfig(**SCENARIOS["softmax-shared-aux"])
    counts = _splits(comm.size)[0]
    ref, _ = _run(comm, cfg, torch.float64, counts, 1, seed)
    layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=False,
                     pipeline_chunks="auto", pipeline_recheck=recheck)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("piper.moe")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    seen, choices = [], []
    try:
        for _ in range(6 + recheck + 6 + 1):  # tune, run, re-tune, decide again
            got, layer = _run(comm, cfg, torch.float64, counts, None, seed, layer=layer)
            _equal(ref, got, f"auto forward {len(seen)} rank {comm.rank}")
            seen.append(layer.stats["chunks"])
            if layer.pipeline.choice is not None:
                choices.append(layer.pipeline.choice)
    finally:
        logger.removeHandler(handler)
    assert seen[:6] == [1, 2, 4, 1, 2, 4], seen
    all_choices = np.asarray(comm.all_to_all(np.tile(np.array(choices, dtype=np.int64),
                                                     (comm.size, 1))))
    assert (all_choices == all_choices[0]).all(), all_choices
    if comm.rank == 0:
        assert sum("chose C=" in r.getMessage() for r in records) == 2, records
    _dedup_fallback(comm, seed)
    return {"seen": seen, "choices": choices}


def _dedup_fallback(comm, seed: int) -> None:
    """On the node-dedup path pipeline_chunks > 1 runs C = 1 and says so once."""
    cfg = MoEConfig(**SCENARIOS["sigmoid-grouped"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("piper.moe").addHandler(handler)
    layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=True, pipeline_chunks=4)
    assert layer.dedup
    for _ in range(2):
        layer(torch.randn(5, cfg.hidden, dtype=torch.float64)).sum().backward()
        assert layer.stats["chunks"] == 1
    logging.getLogger("piper.moe").removeHandler(handler)
    assert sum("node-dedup" in r.getMessage() for r in records) == 1, records
