"""Rank-side cases of the chunked-pipeline tests (run through tests/launch.py).

Every rank builds the same global batch and output gradient from a seed and runs its slice
through MoELayer with pipeline_chunks=1 and with C > 1 (fresh layers from the same seed),
then compares output, aux loss and every gradient bitwise (float64). The chunk_memory
strategies (save / offload / recompute, and "auto" under a faked memory shortage) are covered
the same way, plus the bytes each one keeps for backward.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

import piper_comm as pc
from piper_moe import MoEConfig, MoELayer
from piper_moe.layer import chunk_memory
from piper_moe.layer.saved import SavedTensors

BASE = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "top_k": 2}
SCENARIOS = {
    "softmax-shared-aux": {**BASE, "num_shared_experts": 1, "aux_loss_coef": 0.01},
    "sigmoid-grouped": {**BASE, "top_k": 3, "router": "sigmoid", "num_groups": 4,
                        "topk_groups": 2, "aux_loss_coef": 0.02},
    "capacity": {**BASE, "capacity_factor": 0.5},
}
STATS_KEYS = ("chunks", "comm_seconds_exposed", "comm_seconds_total", "chunk_memory")
MEMORY = ("save", "offload", "recompute")  # the forced chunk_memory strategies


def _splits(P: int) -> list[list[int]]:
    """Token counts per rank: uneven with rank P // 2 empty; and all ranks smaller than the
    largest chunk count (4), one of them holding a single token."""
    uneven = [(r % 3 + 1) * 7 for r in range(P)]
    uneven[P // 2] = 0
    return [uneven, [3, 1, 2, 1][:P]]


def _run(comm, cfg: MoEConfig, dtype, counts: list[int], chunks, seed: int,
         slot_of=None, layer=None, memory: str = "auto", saved=None) -> tuple[dict, MoELayer]:
    """saved: a SavedTensors counter around the forward, or None."""
    me = comm.rank
    lo, hi, total = sum(counts[:me]), sum(counts[:me + 1]), sum(counts)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    G = torch.randn(total, cfg.hidden, generator=g).to(dtype)
    if layer is None:
        layer = MoELayer(cfg, comm, seed=seed, dtype=dtype, dedup=False, slot_of=slot_of,
                         pipeline_chunks=chunks, chunk_memory=memory)
    layer.zero_grad(set_to_none=True)
    x = X[lo:hi].clone().requires_grad_()
    if saved is None:
        y = layer(x)
    else:
        with saved:
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
    largest difference is measured and returned. The forced chunk_memory strategies rotate
    with C so that each scenario and each split runs every one of them (same number of runs).
    Also returns the bytes saved for backward by each strategy (_saved)."""
    comm = pc.init(local_size=local_size)
    checks, f32, used = 0, 0.0, set()
    for si, counts in enumerate(_splits(comm.size)):
        for ni, (name, kw) in enumerate(SCENARIOS.items()):
            cfg = MoEConfig(**kw)
            slot_of = (np.random.default_rng(si).permutation(cfg.num_experts)
                       if name == "capacity" else None)
            ref, _ = _run(comm, cfg, torch.float64, counts, 1, seed, slot_of)
            for ci, chunks in enumerate((2, 3, 4)):
                memory = MEMORY[(ci + ni + si) % len(MEMORY)]
                got, layer = _run(comm, cfg, torch.float64, counts, chunks, seed, slot_of,
                                  memory=memory)
                checks += _equal(ref, got, f"{name} split {counts} C={chunks} {memory} "
                                 f"rank {comm.rank}")
                assert all(k in layer.stats for k in STATS_KEYS), layer.stats
                st = layer.stats
                assert st["chunks"] == chunks
                assert st["chunk_memory"] == memory, (st["chunk_memory"], memory)
                used.add((si, name, memory))
                assert 0 <= st["comm_seconds_exposed"] <= st["comm_seconds_total"] + 1e-3, st
            if si == 0 and name == "softmax-shared-aux":  # float32: measured, not asserted
                ref32, _ = _run(comm, cfg, torch.float32, counts, 1, seed, slot_of)
                got32, _ = _run(comm, cfg, torch.float32, counts, 4, seed, slot_of)
                f32 = max([f32] + [float((ref32[k] - got32[k]).abs().max()) for k in ref32
                                   if ref32[k] is not None and ref32[k].numel()])
    assert len(used) == 2 * len(SCENARIOS) * len(MEMORY), sorted(used)
    return {"checks": checks, "float32_max_abs_diff": f32, "saved": _saved(comm, seed)}


def _saved(comm, seed: int) -> dict:
    """Bytes saved for backward by one forward (each storage once, parameters excluded), at
    C = 1 and C = 4 under each forced strategy, and the host-copy share of offload. Asserts
    recompute < save on this rank (it receives rows) and that offload's host copy is exactly
    what recompute does not keep; returns the bytes and ratios."""
    cfg = MoEConfig(**{**SCENARIOS["softmax-shared-aux"], "hidden": 32, "ffn_hidden": 32})
    counts = [(r % 3 + 2) * 8 for r in range(comm.size)]
    out = {}
    for memory in ("C=1", *MEMORY):
        layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=False,
                         pipeline_chunks=1 if memory == "C=1" else 4,
                         chunk_memory="auto" if memory == "C=1" else memory)
        out[memory] = _count_saved(comm, cfg, counts, seed, layer)
    save, off, rec = (out[m]["saved"] for m in ("save", "offload", "recompute"))
    assert rec < save, out
    assert off == save and out["offload"]["offloaded"] == save - rec > 0, out
    unchunked = out["C=1"]["saved"]
    out["ratios_vs_unchunked"] = {m: out[m]["saved"] / unchunked for m in MEMORY}
    out["ratios_vs_unchunked"]["offload_device_only"] = (
        (off - out["offload"]["offloaded"]) / unchunked)
    out["recompute_vs_save"] = rec / save
    return out


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
    seen, choices = [], []
    with _logged() as records:
        for _ in range(6 + recheck + 6 + 1):  # tune, run, re-tune, decide again
            got, layer = _run(comm, cfg, torch.float64, counts, None, seed, layer=layer)
            _equal(ref, got, f"auto forward {len(seen)} rank {comm.rank}")
            seen.append(layer.stats["chunks"])
            if layer.pipeline.choice is not None:
                choices.append(layer.pipeline.choice)
    assert seen[:6] == [1, 2, 4, 1, 2, 4], seen
    all_choices = np.asarray(comm.all_to_all(np.tile(np.array(choices, dtype=np.int64),
                                                     (comm.size, 1))))
    assert (all_choices == all_choices[0]).all(), all_choices
    if comm.rank == 0:
        assert sum("chose C=" in r.getMessage() for r in records) == 2, records
    _dedup_fallback(comm, seed)
    return {"seen": seen, "choices": choices}


@contextlib.contextmanager
def _logged(name: str = "piper.moe"):
    """Yields the list of log records `name` emits (INFO and up) inside the block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _count_saved(comm, cfg, counts, seed: int, layer: MoELayer) -> dict:
    """{saved: bytes of the storages one forward saves for backward (parameters excluded,
    each once), offloaded: those of them that are chunk_memory="offload" host copies}."""
    saved = SavedTensors(exclude=layer.parameters())
    _run(comm, cfg, torch.float64, counts, None, seed, layer=layer, saved=saved)
    return {"saved": saved.bytes, "offloaded": saved.host_bytes}


def memory_auto(local_size: int | None = 2, seed: int = 13) -> dict:
    """chunk_memory="auto": with the real probe every rank keeps the rows ("save"); when the
    free-memory probe of ONE rank (the last one with tokens) reports 0 bytes, that rank alone
    wishes "recompute" and every rank recomputes (the decision rides on the count exchange),
    still bitwise equal to C = 1; with the probe restored, back to "save". Changes are logged
    on rank 0."""
    comm = pc.init(local_size=local_size)
    cfg = MoEConfig(**SCENARIOS["capacity"])
    counts = _splits(comm.size)[0]
    short = max(r for r in range(comm.size) if counts[r])
    ref, _ = _run(comm, cfg, torch.float64, counts, 1, seed)
    layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=False,
                     pipeline_chunks=3, chunk_memory="auto")
    real = chunk_memory.free_bytes
    seen, wishes = [], []
    with _logged() as records:
        try:
            for step in range(3):
                if step == 1 and comm.rank == short:
                    chunk_memory.free_bytes = lambda device: 0
                got, layer = _run(comm, cfg, torch.float64, counts, None, seed, layer=layer)
                chunk_memory.free_bytes = real
                _equal(ref, got, f"auto memory step {step} rank {comm.rank}")
                seen.append(layer.stats["chunk_memory"])
                wishes.append(layer.chunk_memory.last_wish)
        finally:
            chunk_memory.free_bytes = real
    assert seen == ["save", "recompute", "save"], seen
    mine = [0, 2 if comm.rank == short else 0, 0]
    assert wishes == mine, (wishes, mine)
    if comm.rank == 0:
        msgs = [r.getMessage() for r in records if "chunk_memory" in r.getMessage()]
        assert len(msgs) == 3 and "recomputed" in msgs[1], msgs
    # without autograd nothing is kept: no probe (it would say 0 bytes free here), "save"
    chunk_memory.free_bytes = _no_probe
    try:
        with torch.no_grad():
            layer(torch.randn(counts[comm.rank], cfg.hidden, dtype=torch.float64))
    finally:
        chunk_memory.free_bytes = real
    assert layer.stats["chunk_memory"] == "save", layer.stats["chunk_memory"]
    return {"seen": seen, "wishes": wishes, "short_rank": short}


def _no_probe(device) -> int:
    raise AssertionError("a forward under no_grad must not probe the free memory")


def _dedup_fallback(comm, seed: int) -> None:
    """On the node-dedup path pipeline_chunks > 1 runs C = 1 and says so once."""
    cfg = MoEConfig(**SCENARIOS["sigmoid-grouped"])
    with _logged() as records:
        layer = MoELayer(cfg, comm, seed=seed, dtype=torch.float64, dedup=True,
                         pipeline_chunks=4)
        assert layer.dedup
        for _ in range(2):
            layer(torch.randn(5, cfg.hidden, dtype=torch.float64)).sum().backward()
            assert layer.stats["chunks"] == 1
    assert sum("node-dedup" in r.getMessage() for r in records) == 1, records
