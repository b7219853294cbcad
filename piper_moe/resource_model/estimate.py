"""``estimate(model, platform, strategy)``: memory, step time, MFU and bottleneck of one strategy.

Step time is assembled on the critical (slowest) pipeline stage, for m micro-batches:

    step = m * (compute + overhead + recompute + tp_comm + a2a + pp_comm) + bubble + dp_comm
           + optimizer

- compute: forward + backward (2x forward; the attention core's backward
  ``platform.attention_backward`` x its forward, ``attention_backward_fp32`` in fp32) of the
  stage's layers (and head on the last stage), GEMMs at the compute dtype's peak
  (``PlatformSpec.peak``);
- overhead: host time of the framework operations (``ops``: per layer, embedding and head,
  forward and backward, per micro-batch, the layers' forward again under full recompute; and
  per parameter tensor once per step) at ``platform.op_overhead`` each (0 on GPU platforms);
- recompute: one more forward for "full", the element-wise part for "selective";
- tp_comm: 4 all-gather/reduce-scatter of T*h per layer forward and 4 backward (sequence parallel);
  plus the ETP gather/scatter of expert rows;
- a2a: dispatch + combine forward and their two duals backward (and again under full recompute),
  ``m = T_m * top_k * h * e * imbalance`` bytes per rank over the EP group, flat or HALO; with
  ``overlap_a2a`` (not gpipe, m >= 2) a layer's all-to-all hides behind another micro-batch's
  compute of that layer and only the excess shows; with ``dispatcher`` "ppmoe" there is none:
  the MoE block's TP all-gather + reduce-scatter sums the experts' partial outputs
  (``dispatch_cost.ppmoe_time``, charged to tp_comm); with ``moe_chunks`` C > 1 (the chunked layer)
  the forward exchanges overlap the experts chunk by chunk (``chunked_a2a``) and the
  backward recomputes the experts (charged to recompute);
- pp_comm: one activation send forward and one gradient send backward per micro-batch;
- bubble: ``pipeline.bubble``;
- dp_comm: gradient reduce-scatter + weight all-gather (all-reduce for ZeRO-0) over DP (dense)
  and EDP (experts), once per step; ZeRO-3 all-gathers weights twice per micro-batch;
- optimizer: Adam, memory-bound over the local shard.

MFU = 3 * model forward FLOPs per token * tokens per step / (step * peak * ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..layer.config import fp8_row_bytes
from . import comm, dispatch_cost, ops
from .compute import head_compute, layer_compute, model_flops_per_token, routed_expert_gemm_time
from .memory import PRECISION_BYTES, memory, shapes, stage_layer_kinds, stage_params
from .pipeline import bubble
from .spec import ModelSpec, PlatformSpec
from .strategy import Strategy

TIME_KEYS = ("compute", "overhead", "recompute", "tp_comm", "a2a", "pp_comm", "bubble",
             "dp_comm", "optimizer")


@dataclass(kw_only=True)
class Estimate:
    """Result of ``estimate``. ``memory``: bytes per rank by component and "total" for the most
    loaded stage (``memory_stage``); ``time``: seconds per step by component and "step";
    ``mfu`` in [0, 1]; ``fits``: total <= device memory; ``bottleneck``: the largest time
    component, or "memory" when it does not fit."""

    strategy: Strategy
    memory: dict[str, float]
    memory_stage: int
    time: dict[str, float]
    mfu: float
    fits: bool
    bottleneck: str
    tokens_per_second: float
    details: dict[str, float] = field(default_factory=dict)


def chunked_a2a(model: ModelSpec, platform: PlatformSpec, s: Strategy, m_bytes: float,
                 g: int) -> tuple[float, float, float]:
    """(forward exposed, backward, recompute) seconds of one chunked MoE layer's all-to-alls
    (``s.moe_chunks`` = C > 1, ``layer/chunked.py``). Each exchange of m_bytes goes in C
    pieces (C latencies). Forward: dispatch + combine D (one link, FIFO) pipelined against the
    experts X: makespan max(D, X) + min(D, X) / C, of which X is compute, the rest exposed
    communication. Backward: the reverse exchanges are issued together and waited (no
    overlap), plus a second dispatch under chunk_memory "recompute"; the experts' forward is
    recomputed (X, charged to recompute)."""
    C = s.moe_chunks
    one = C * comm.all_to_all(m_bytes / C, s.ep, g, platform, s.a2a)
    X = routed_expert_gemm_time(model, platform, s)
    D = 2 * one
    fwd = max(D, X) + min(D, X) / C - X
    bwd = D + (one if s.chunk_memory == "recompute" else 0.0)
    return fwd, bwd, X


def _stage_time(model: ModelSpec, platform: PlatformSpec, s: Strategy, stage: int,
                cache: dict) -> dict[str, float]:
    """Per-micro-batch seconds of one stage by component, plus "fwd", "bwd", "wgrad"."""
    n_dense, n_moe = stage_layer_kinds(model, s, stage)
    e = PRECISION_BYTES[s.precision][3]
    G = platform.devices_per_node
    sh = shapes(model, s)
    out = dict.fromkeys(("compute", "overhead", "recompute", "tp_comm", "a2a", "pp_comm"), 0.0)
    fwd = wgrad = 0.0
    c = platform.op_overhead
    for part, n in _stage_parts(model, s, stage).items():
        po = ops.part_ops(s.precision, part)
        again = s.recompute == "full" and part in ("dense", "moe")  # the layers' forward, twice
        out["overhead"] += n * ((2 if again else 1) * po.forward + po.backward) * c
        fwd += n * po.forward * c
    tp_g = comm.per_node(s.tp, 1, G)
    act = sh.tokens * model.hidden * e
    tp_layer = 4 * comm.all_gather(act, s.tp, tp_g, platform) if s.tp > 1 else 0.0
    for n, moe_layer in ((n_dense, False), (n_moe, True)):
        if n == 0:
            continue
        if moe_layer not in cache:
            cache[moe_layer] = layer_compute(model, platform, s, moe_layer)
        lc = cache[moe_layer]
        a2a = tp_extra = 0.0
        a2a_fwd = a2a_bwd = chunk_re = 0.0
        tp_l = tp_layer
        if moe_layer and s.dispatcher == "ppmoe":  # attention's two, then the PPMoE sum
            tp_l = tp_layer / 2 + dispatch_cost.ppmoe_time(
                sh.tokens, model.hidden, e, s.tp, platform, sequence_sharded=True)
        elif moe_layer and s.ep > 1:
            m_bytes = sh.moe_tokens * model.moe.top_k * model.hidden * e
            m_bytes *= s.capacity_factor or s.expert_imbalance
            g = comm.per_node(s.ep, s.etp, G)
            a2a = 2 * comm.all_to_all(m_bytes, s.ep, g, platform, s.a2a)
            a2a_fwd = a2a_bwd = a2a
            if s.fp8_dispatch:  # forward dispatch in e4m3 + scales; combine, backward in e
                d_bytes = m_bytes / (model.hidden * e) * fp8_row_bytes(model.hidden)
                a2a_fwd = (comm.all_to_all(d_bytes, s.ep, g, platform, s.a2a) + a2a / 2)
            if s.moe_chunks > 1:
                a2a_fwd, a2a_bwd, chunk_re = chunked_a2a(model, platform, s, m_bytes, g)
        if moe_layer and s.etp > 1:
            rows = sh.expert_rows * model.hidden * e
            tp_extra = 2 * comm.all_gather(rows, s.etp, comm.per_node(s.etp, 1, G), platform)
        # backward: twice the bf16 forward, the attention core's at its own factor
        comp = (3 * lc.total + 2 * lc.fp8_saved
                + (platform.attention(e)[1] - 2) * lc.attention_core)
        re = 0.0
        re_a2a = 0.0
        if s.recompute == "full":
            re = lc.total + tp_l + tp_extra
            re_a2a = a2a_fwd
        elif s.recompute == "selective":
            re = lc.elementwise
        a2a_total = a2a_fwd + a2a_bwd + re_a2a
        if s.overlap_a2a and s.schedule != "gpipe" and s.num_micro >= 2:
            # hidden behind another micro-batch's compute; the chunked layer's forward part is
            # already net of its own overlap with the experts, so only the rest can hide
            hideable = a2a_total - (a2a_fwd if s.moe_chunks > 1 else 0.0)
            a2a_total -= min(hideable, comp)
        fwd_share = a2a_fwd / (a2a_fwd + a2a_bwd) if a2a_fwd + a2a_bwd > 0 else 0.0
        out["compute"] += n * comp
        out["recompute"] += n * (re + chunk_re)
        out["tp_comm"] += n * 2 * (tp_l + tp_extra)
        out["a2a"] += n * a2a_total
        fwd += n * (lc.total + tp_l + tp_extra + a2a_total * fwd_share)
        wgrad += n * (lc.gemm + lc.fp8_saved)
    if stage == s.pp - 1:
        hc = head_compute(model, platform, s)
        out["compute"] += 3 * hc.total
        fwd += hc.total
        wgrad += hc.gemm
    if s.pp > 1:
        inter = s.dp * s.tp >= G
        send = comm.p2p(act / s.sp, platform, inter)
        out["pp_comm"] = 2 * send if 0 < stage < s.pp - 1 else send
    total = sum(out.values())
    out["fwd"] = fwd
    out["bwd"] = total - fwd
    out["wgrad"] = wgrad
    return out


def _dp_time(model: ModelSpec, platform: PlatformSpec, s: Strategy, stage: int) -> float:
    """Seconds per step of data-parallel gradient/weight collectives for one stage."""
    p_b, g_b, _, _ = PRECISION_BYTES[s.precision]
    G = platform.devices_per_node
    dense, expert = stage_params(model, s, stage)
    t = 0.0
    for params, n, stride in ((dense, s.dp, s.tp), (expert, s.edp, s.ep * s.etp)):
        if n <= 1 or params == 0:
            continue
        g = comm.per_node(n, stride, G)
        if s.zero == 0:
            t += comm.all_reduce(params * g_b, n, g, platform)
        elif s.zero in (1, 2):
            t += comm.reduce_scatter(params * g_b, n, g, platform)
            t += comm.all_gather(params * p_b, n, g, platform)
        else:
            per_micro = 2 * comm.all_gather(params * p_b, n, g, platform)
            per_micro += comm.reduce_scatter(params * g_b, n, g, platform)
            t += s.num_micro * per_micro
    return t


def _stage_parts(model: ModelSpec, s: Strategy, stage: int) -> dict[str, int]:
    """How many of each part of ``ops.PART_OPS`` one stage holds."""
    n_dense, n_moe = stage_layer_kinds(model, s, stage)
    return {"dense": n_dense, "moe": n_moe, "embed": int(stage == 0),
            "head": int(stage == s.pp - 1)}


def _step_ops(model: ModelSpec, s: Strategy, stage: int) -> float:
    """Framework operations of one stage once per step: clipping, AdamW and zeroing per
    parameter tensor (``ops.OPS_PER_TENSOR_STEP``)."""
    tensors = sum(n * ops.part_ops(s.precision, part).tensors
                  for part, n in _stage_parts(model, s, stage).items())
    return tensors * ops.OPS_PER_TENSOR_STEP


def _optimizer_time(model: ModelSpec, platform: PlatformSpec, s: Strategy, stage: int) -> float:
    """Seconds of one Adam step over this rank's shard (memory-bound)."""
    p_b, g_b, o_b, _ = PRECISION_BYTES[s.precision]
    dense, expert = stage_params(model, s, stage)
    if s.zero >= 1:
        dense, expert = dense / s.dp, expert / s.edp
    return (dense + expert) * (2 * p_b + g_b + 2 * o_b) / platform.hbm_bandwidth


def estimate(model: ModelSpec, platform: PlatformSpec, strategy: Strategy) -> Estimate:
    """Memory per rank, time per step, MFU, fit and bottleneck of ``strategy``."""
    s = strategy
    s.check(model)
    mem, mem_stage = memory(model, platform, s)
    cache: dict = {}
    stages = [_stage_time(model, platform, s, st, cache) for st in range(s.pp)]
    crit = max(range(s.pp), key=lambda st: stages[st]["fwd"] + stages[st]["bwd"])
    c = stages[crit]
    m = s.num_micro
    time = {k: m * c[k] for k in ("compute", "overhead", "recompute", "tp_comm", "a2a",
                                  "pp_comm")}
    time["overhead"] += max(_step_ops(model, s, st) for st in range(s.pp)) * platform.op_overhead
    time["bubble"] = bubble(s, c["fwd"], c["bwd"], c["wgrad"])
    time["dp_comm"] = max(_dp_time(model, platform, s, st) for st in range(s.pp))
    time["optimizer"] = max(_optimizer_time(model, platform, s, st) for st in range(s.pp))
    time["step"] = sum(time[k] for k in TIME_KEYS)
    tokens = s.global_batch * s.seq_len
    flops = 3 * model_flops_per_token(model, s.seq_len) * tokens
    peak = platform.peak(PRECISION_BYTES[s.precision][3])
    mfu = flops / (time["step"] * peak * s.world) if time["step"] > 0 else 0.0
    fits = mem["total"] <= platform.device_memory
    bottleneck = "memory" if not fits else max(TIME_KEYS, key=lambda k: time[k])
    return Estimate(
        strategy=s, memory=mem, memory_stage=mem_stage, time=time, mfu=mfu, fits=fits,
        bottleneck=bottleneck,
        tokens_per_second=tokens / time["step"] if time["step"] > 0 else math.inf,
        details={"critical_stage": crit, "fwd_per_micro": c["fwd"], "bwd_per_micro": c["bwd"]},
    )
