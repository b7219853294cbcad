"""Strategy search: enumerate valid strategies for ``gpus`` ranks, drop those that do not fit,
rank by predicted step time.

Searched: tp in powers of two up to a node, pp dividing gpus/tp (at most num_layers), ep dividing
num_experts and dp*tp/etp, etp in {1, tp}, micro_batch in {1, 2, 4}, recompute in
{none, selective, full}, schedule in {1f1b, zb-h1, interleaved (vpp 2)} (1f1b only without PP),
all-to-all in {flat, halo} (flat only when the EP group fits one node), the PPMoE dispatcher
where it applies (ep == tp > 1, etp 1), and for the all-to-all dispatcher with ep > 1 (not
under zb-h1) the chunked MoE layer (``moe_chunks`` 4), which competes on predicted time like
every candidate and keeps its dispatched rows, or re-dispatches them in backward where keeping
them does not fit (host offload is not searched: the model does not charge its host copies).
ZeRO stage, global batch and sequence length are fixed by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from . import comm
from .estimate import Estimate, estimate
from .memory import memory
from .spec import ModelSpec, PlatformSpec
from .strategy import Strategy

log = logging.getLogger("piper")

CHUNKS = 4  # the chunked MoE layer's candidate chunk count (the runtime's "auto" tries 1, 2, 4)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(kw_only=True)
class PlanResult:
    """Ranked estimates (fastest first) and search counts."""

    plans: list[Estimate]
    num_candidates: int = 0
    num_valid: int = 0
    num_fit: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def candidates(model: ModelSpec, platform: PlatformSpec, gpus: int, *, global_batch: int,
               seq_len: int, zero: int = 1, overlap_a2a: bool = False,
               micro_batches: tuple[int, ...] = (1, 2, 4)):
    """Yield every strategy of the search space (valid by construction except model checks)."""
    a, moe = model.attention, model.moe
    tps = [t for t in (1, 2, 4, 8, 16) if t <= platform.devices_per_node and gpus % t == 0
           and a.num_heads % t == 0 and model.vocab % t == 0]
    for tp in tps:
        for pp in _divisors(gpus // tp):
            if pp > model.num_layers:
                continue
            dp = gpus // (tp * pp)
            for etp in sorted({1, tp}):
                if moe.expert_ffn % etp:
                    continue
                for ep in _divisors(moe.num_experts):
                    if (dp * tp) % (ep * etp):
                        continue
                    # Inside one node only flat is planned (HALO there is a copy through the
                    # node segment; the per-call choice of algorithm="auto" may still take it)
                    one_node = comm.per_node(ep, etp, platform.devices_per_node) >= ep
                    algos = [(a, "alltoall") for a in
                             (("flat",) if ep == 1 or one_node else ("flat", "halo"))]
                    if tp > 1 and ep == tp and etp == 1 and one_node:
                        algos.append(("flat", "ppmoe"))
                    for mb in micro_batches:
                        if global_batch % (mb * dp):
                            continue
                        num_micro = global_batch // (mb * dp)
                        schedules = [("1f1b", 1)]
                        if pp > 1:
                            schedules.append(("zb-h1", 1))
                            if num_micro % pp == 0 and model.num_layers >= 2 * pp:
                                schedules.append(("interleaved", 2))
                        for recompute in ("none", "selective", "full"):
                            for schedule, vpp in schedules:
                                for algo, dispatcher in algos:
                                    chunked = (1, CHUNKS) if (
                                        dispatcher == "alltoall" and ep > 1
                                        and schedule != "zb-h1") else (1,)
                                    for chunks in chunked:
                                        yield Strategy(
                                            dp=dp, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp,
                                            micro_batch=mb, global_batch=global_batch,
                                            seq_len=seq_len, zero=zero, recompute=recompute,
                                            schedule=schedule, a2a=algo,
                                            overlap_a2a=overlap_a2a, dispatcher=dispatcher,
                                            moe_chunks=chunks,
                                        )


def _fits(model: ModelSpec, platform: PlatformSpec, s: Strategy, cache: dict) -> bool:
    """Whether ``s`` fits the device (memory does not depend on the all-to-all algorithm:
    computed once per remaining key)."""
    key = (s.dp, s.tp, s.pp, s.ep, s.etp, s.vpp, s.micro_batch, s.recompute, s.schedule,
           s.dispatcher, s.moe_chunks, s.chunk_memory)
    if key not in cache:
        cache[key] = memory(model, platform, s)[0]["total"] <= platform.device_memory
    return cache[key]


def plan(model: ModelSpec, platform: PlatformSpec, gpus: int, *, global_batch: int | None = None,
         seq_len: int | None = None, zero: int = 1, top: int = 5,
         overlap_a2a: bool = False) -> PlanResult:
    """Best ``top`` strategies for ``model`` on ``gpus`` ranks of ``platform``, fastest first.
    ``global_batch`` defaults to 2 * gpus sequences, ``seq_len`` to the model's."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1 (got {gpus})")
    global_batch = global_batch or 2 * gpus
    seq_len = seq_len or model.seq_len
    result = PlanResult(plans=[])
    fitting: list[Estimate] = []
    mem_cache: dict[tuple, bool] = {}
    for s in candidates(model, platform, gpus, global_batch=global_batch, seq_len=seq_len,
                        zero=zero, overlap_a2a=overlap_a2a):
        result.num_candidates += 1
        try:
            s.check(model)
        except ValueError as exc:
            key = str(exc).split("(")[0].strip()
            result.rejected[key] = result.rejected.get(key, 0) + 1
            continue
        result.num_valid += 1
        fits = _fits(model, platform, s, mem_cache)
        if not fits and s.moe_chunks > 1:  # the chunked layer's leaner mode
            s = replace(s, chunk_memory="recompute")
            fits = _fits(model, platform, s, mem_cache)
        if not fits:
            result.rejected["does not fit"] = result.rejected.get("does not fit", 0) + 1
            continue
        result.num_fit += 1
        fitting.append(estimate(model, platform, s))
    fitting.sort(key=lambda e: e.time["step"])
    result.plans = fitting[:top]
    log.info("plan: %d candidates, %d valid, %d fit", result.num_candidates, result.num_valid,
             result.num_fit)
    return result
