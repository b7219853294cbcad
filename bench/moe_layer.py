"""Forward + backward timing of Piper's expert-parallel MoE layer vs a plain PyTorch layer.

    mpirun -genv PIPER_LOCAL_SIZE 2 -n 4 .venv/bin/python bench/moe_layer.py [flags]

Variants, all built from the same seed (so the same global weights) and fed the same tokens:
    reference    piper_moe.layer.reference.ReferenceMoE on each rank's own tokens with ALL
                 experts local (per-expert index_select, SwiGLU, index_add): the data-parallel
                 baseline, no communication at all.
    piper        MoELayer(cfg, comm, dedup=True): experts spread over the EP = comm.size ranks,
                 tokens dispatched and combined through piper_comm all-to-all-v with node dedup.
    piper-nodedup  MoELayer(cfg, comm, dedup=False): the same without node-level dedup.
    piper-C<c>   with --chunks c1,c2,..: MoELayer(cfg, comm, dedup=False, pipeline_chunks=c)
                 (c an int or "auto"): the chunked pipeline of layer/chunked.py. Reported
                 besides the time: the fraction of the forward communication hidden behind
                 expert compute (1 - sum exposed / sum total seconds over the timed steps, from
                 layer.stats), and the bytes of tensors saved for backward by one forward
                 (torch.autograd.graph.saved_tensors_hooks, parameters excluded, each storage
                 once). Without --variants only these (and the reference) run.
    piper-C<c>-<m>  with --chunk-memory m1,m2,..: one variant per chunk setting c != 1 and
                 chunk_memory m (save, offload, recompute, auto; layer/chunk_memory.py); the
                 saved bytes are then also split into those offloaded to host, and compared with
                 the unchunked variant (piper-C1, when --chunks has 1): the activation memory
                 ratio of each strategy.
    --dispatchers LIST  (subset of alltoall,halo,ppmoe; combinable with --chunks, which then
                 apply to alltoall only and name its variants alltoall-C<c>):
      alltoall   MoELayer(cfg, comm, dedup=False): padding-free all-to-all dispatch over EP =
                 comm.size (algorithm auto).
      halo       MoELayer(cfg, comm, dedup=True): node-level dedup (a token crosses to each node
                 once); the same as alltoall when comm spans one node.
      ppmoe      MoELayer(cfg, node_comm, dispatcher="ppmoe", sequence_sharded=True), node_comm
                 the ranks of this rank's (emulated) node: EP = ranks per node, experts
                 replicated across nodes (data parallel over nodes). Dispatch is an index select;
                 the traffic is the all-gather of the node's shards and the reduce-scatter of the
                 partial outputs, all intra-node.
                 Reported besides the time: bytes of tensors saved for backward, expert
                 parameter bytes per rank, and the resource model's (--platform) per-layer
                 communication time of each dispatcher next to the measured difference.

    --precisions LIST  (subset of fp32,bf16-mixed,bf16-mixed+fp8): every Piper variant
                 (--variants) runs once per precision, named <variant>@<precision>
                 (MoELayer(precision=..., fp8_dispatch=...), layer/precision.py); the
                 reference stays fp32 (max|y-y_ref| is then the distance to fp32). Reported
                 besides the time: dispatch and combine bytes (layer.stats, summed over ranks)
                 and the bytes saved for backward by one forward. Not combinable with --chunks
                 or --dispatchers.
    --peer torchtitan  adds the variant "torchtitan": torchtitan's MoE layer with its
                 expert-parallel all-to-all dispatcher over gloo, as shipped (bf16 grouped
                 GEMMs over fp32 weights, fp32 dispatch and combine; bench/moe_layer_peer.py),
                 with the same weights, routing and tokens.

One timed step: comm.barrier() on every rank, then perf_counter around
y = layer(x); (y.sum() + layer.aux_loss).backward(). Variants are interleaved step by step
(so drift hits them alike). A variant's time is the median over --iters steps on each rank,
then the max over ranks; tokens/s = global tokens / that time. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np

from piper_moe.common import DISPATCHERS as LAYER_DISPATCHERS

VARIANTS = ("reference", "piper", "piper-nodedup")
# --dispatchers: the layer's dispatchers, "alltoall" also as "halo" (with node dedup)
DISPATCHERS = ("alltoall", "halo", *LAYER_DISPATCHERS[1:])
PRECISIONS = {"fp32": {}, "bf16-mixed": {"precision": "bf16-mixed"},
              "bf16-mixed+fp8": {"precision": "bf16-mixed", "fp8_dispatch": True}}
PEERS = ("torchtitan",)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/moe_layer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn-hidden", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--num-shared-experts", type=int, default=1)
    p.add_argument("--router", default="sigmoid", choices=("softmax", "sigmoid"))
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--topk-groups", type=int, default=2)
    p.add_argument("--aux-loss-coef", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads per rank (default 1: ranks oversubscribe cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: every layer and the tokens on the local rank's device; a timed "
                        "step then ends with torch.cuda.synchronize()")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all, or "
                   f"reference alone with --chunks)")
    p.add_argument("--chunks", default=None, metavar="LIST",
                   help="comma-separated pipeline_chunks settings (ints and/or auto), each "
                   "a variant piper-C<setting> (dedup off)")
    p.add_argument("--recheck", type=int, default=50, help="pipeline_recheck for auto")
    p.add_argument("--chunk-memory", default=None, metavar="LIST",
                   help="comma-separated chunk_memory settings (save, offload, recompute, "
                   "auto): each chunk setting != 1 becomes a variant per setting "
                   "piper-C<c>-<setting> (default: auto, no suffix)")
    p.add_argument("--dispatchers", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(DISPATCHERS)}, each a variant "
                   "(module docstring)")
    p.add_argument("--platform", default="cpu-host",
                   help="resource-model platform (name or YAML path) for the predicted "
                   "communication time of --dispatchers (default cpu-host)")
    p.add_argument("--precisions", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(PRECISIONS)}: each Piper variant "
                   "once per precision (module docstring)")
    p.add_argument("--peer", default=None, choices=PEERS,
                   help="add a peer MoE layer as a variant (module docstring)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    a = p.parse_args(argv)
    a.precisions = [x.strip() for x in (a.precisions or "").split(",") if x.strip()]
    bad = [x for x in a.precisions if x not in PRECISIONS]
    if bad:
        p.error(f"--precisions: unknown {bad}; choose from {tuple(PRECISIONS)}")
    if a.precisions and (a.chunks or a.dispatchers):
        p.error("--precisions does not combine with --chunks or --dispatchers")
    if a.precisions and a.dtype != "float32":
        p.error("--precisions sets the precision: leave --dtype at float32 (the parameters)")
    if a.variants is None:
        a.variants = "reference" if a.chunks or a.dispatchers else ",".join(VARIANTS)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    a.dispatchers = [d.strip() for d in (a.dispatchers or "").split(",") if d.strip()]
    bad = [d for d in a.dispatchers if d not in DISPATCHERS]
    if bad:
        p.error(f"--dispatchers: unknown {bad}; choose from {DISPATCHERS}")
    # with --dispatchers alltoall, --chunks splits the alltoall variant by chunk setting
    prefix = "alltoall-C" if "alltoall" in a.dispatchers else "piper-C"
    a.chunk_settings, a.chunk_memories = {}, {}
    mems = [m.strip() for m in (a.chunk_memory or "").split(",") if m.strip()]
    bad = [m for m in mems if m not in ("save", "offload", "recompute", "auto")]
    if bad:
        p.error(f"--chunk-memory: unknown {bad}; choose from save, offload, recompute, auto")
    for c in (a.chunks.split(",") if a.chunks else []):
        c = c.strip()
        if c != "auto" and not (c.isdigit() and int(c) >= 1):
            p.error(f"--chunks: {c!r} is neither an int >= 1 nor auto")
        for m in (mems if mems and c != "1" else ["auto"]):
            name = f"{prefix}{c}" + (f"-{m}" if mems and c != "1" else "")
            a.chunk_settings[name] = c if c == "auto" else int(c)
            a.chunk_memories[name] = m
    for d in a.dispatchers:
        if d == "alltoall" and a.chunk_settings:
            a.variants += list(a.chunk_settings)
        elif d not in a.variants:
            a.variants.append(d)
    a.variants += [v for v in a.chunk_settings if v not in a.variants]
    if a.precisions:
        a.variants = [x for v in a.variants for x in
                      ([v] if v == "reference" else [f"{v}@{q}" for q in a.precisions])]
    if a.peer:
        a.variants.append(a.peer)
    if a.iters < 1 or a.warmup < 0 or a.tokens < 0 or a.threads < 1:
        p.error("--iters >= 1, --warmup >= 0, --tokens >= 0, --threads >= 1")
    return a


def gather(comm, v: np.ndarray) -> np.ndarray:
    """float64 vector v of every rank -> [size, len(v)] on every rank (equal-split
    all-to-all of size copies: row r came from rank r)."""
    v = np.ascontiguousarray(v, dtype=np.float64).reshape(1, -1)
    return np.asarray(comm.all_to_all(np.ascontiguousarray(np.tile(v, (comm.size, 1)))))


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()} ({model}, {os.cpu_count()} cpus)"


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch

    import piper_comm as pc
    from piper_moe import MoEConfig, MoELayer
    from piper_moe.layer.reference import ReferenceMoE

    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    comm = pc.init()
    me = comm.rank
    dev = torch.device("cpu")
    if a.device == "cuda":
        dev = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda" and any(v in PEERS for v in a.variants):
        raise SystemExit("--device cuda: the --peer layers run on CPU only here")
    cfg = MoEConfig(hidden=a.hidden, ffn_hidden=a.ffn_hidden, num_experts=a.num_experts,
                    top_k=a.top_k, num_shared_experts=a.num_shared_experts, router=a.router,
                    num_groups=a.num_groups, topk_groups=a.topk_groups,
                    aux_loss_coef=a.aux_loss_coef)
    node_comm = node_communicator(comm) if "ppmoe" in a.dispatchers else None
    layers = {}
    for v in a.variants:  # construction order is the same on every rank (it is collective)
        base, _, prec = v.partition("@")
        kw = PRECISIONS[prec] if prec else {}
        if v == "reference":
            layers[v] = ReferenceMoE(cfg, seed=a.seed, dtype=dtype, device=dev)
        elif v in PEERS:
            layers[v] = peer_layer(v, cfg, comm, a.seed)
        elif prec:
            layers[v] = MoELayer(cfg, comm, seed=a.seed, dtype=dtype, device=dev,
                                 dedup=base == "piper", **kw)
        elif v in a.chunk_settings:
            layers[v] = MoELayer(cfg, comm, seed=a.seed, dtype=dtype, device=dev, dedup=False,
                                 pipeline_chunks=a.chunk_settings[v],
                                 pipeline_recheck=a.recheck,
                                 chunk_memory=a.chunk_memories[v])
        elif v == "ppmoe":
            layers[v] = MoELayer(cfg, node_comm, seed=a.seed, dtype=dtype, device=dev,
                                 dispatcher="ppmoe", sequence_sharded=True)
        else:
            layers[v] = MoELayer(cfg, comm, seed=a.seed, dtype=dtype, device=dev,
                                 dedup=v in ("piper", "halo"))
    g = torch.Generator().manual_seed(a.seed * 1000003 + me)
    x0 = torch.randn(a.tokens, a.hidden, generator=g).to(dtype).to(dev)

    def step(v: str) -> tuple[float, torch.Tensor]:
        layer = layers[v]
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        sync()
        comm.barrier()
        t0 = time.perf_counter()
        y = layer(x)
        sync()
        t_fwd = time.perf_counter() - t0
        (y.sum() + layer.aux_loss).backward()
        sync()
        t = time.perf_counter() - t0
        if v in a.chunk_settings:
            st = layer.stats
            comm_s[v].append((st["comm_seconds_exposed"] or 0.0,
                              st["comm_seconds_total"] or 0.0, st["chunks"], t_fwd,
                              st["chunk_memory"]))
        return t, y.detach()

    comm_s: dict[str, list] = {v: [] for v in a.chunk_settings}

    # sanity: Piper's outputs equal the reference's on the same tokens (same global model)
    outs = {v: step(v)[1] for v in a.variants}
    diff = {v: float((outs[v] - outs["reference"]).abs().max()) if a.tokens else 0.0
            for v in a.variants if v != "reference" and "reference" in outs}
    ref_max = float(outs["reference"].abs().max()) if a.tokens and "reference" in outs else 0.0
    for _ in range(a.warmup):
        for v in a.variants:
            step(v)
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    for v in comm_s:  # the timed steps only
        comm_s[v].clear()
    for _ in range(a.iters):
        for v in a.variants:
            times[v].append(step(v)[0])
    chunk_rows = chunk_summary(a, comm, layers, x0, comm_s, torch) if a.chunk_settings else []
    memory = (memory_summary(a, comm, layers, x0, torch) if a.dispatchers or a.precisions
              else {})

    med = np.array([statistics.median(times[v]) for v in a.variants])
    all_med = gather(comm, med)                                         # [P, variants]
    all_times = gather(comm, np.concatenate([times[v] for v in a.variants]))
    all_diff = gather(comm, np.array([diff.get(v, 0.0) for v in a.variants]))
    all_ref_max = gather(comm, np.array([ref_max]))
    stat_keys = ("bytes_sent_intra_node", "bytes_sent_inter_node", "bytes_saved_by_dedup",
                 "bytes_dispatch", "bytes_combine")
    piper_vs = [v for v in a.variants if v != "reference" and v not in PEERS]
    all_stats = gather(comm, np.array([layers[v].stats[k] for v in piper_vs
                                       for k in stat_keys], dtype=np.float64))
    if me == 0:
        report(a, cfg, comm, torch, all_med, all_times, all_diff, all_stats, piper_vs,
               stat_keys, layers, chunk_rows, memory, float(all_ref_max.max()))
    if node_comm is not None:
        node_comm.close()
    comm.close()
    return 0


def peer_layer(name: str, cfg, comm, seed: int):
    """The --peer layer (bench/moe_layer_peer.py) with the global model of seed; starts
    torch.distributed (gloo) over the job's ranks for its all-to-alls. Collective."""
    import warnings

    import torch.distributed as dist
    from moe_layer_peer import torchtitan_layer  # beside this script, in bench/

    import piper_comm.torch
    from piper_moe.layer.reference import ReferenceMoE

    # its router asks CPU autocast for float32, which CPU autocast refuses with a warning
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype")
    piper_comm.torch.fill_from_mpi()  # under mpirun: MASTER_ADDR, ... from MPI (collective)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    mesh = None
    if comm.size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (comm.size,))
    sd = ReferenceMoE(cfg, seed=seed).state_dict()
    return torchtitan_layer(cfg, sd, comm.size, comm.rank, mesh)


def node_communicator(comm):
    """A piper_comm Communicator over the ranks of this rank's (emulated) node, for ppmoe
    (collective over comm: MPI split by node, then a bootstrap on the split)."""
    from mpi4py import MPI

    import piper_comm as pc

    sub = MPI.COMM_WORLD.Split(color=comm.node, key=comm.rank)
    node_comm = pc.init("mpi", group=sub, node_ids=[0] * sub.Get_size(), timeout=comm.timeout)
    sub.Free()  # Piper works on its own duplicate
    return node_comm


def model_spec(a, cfg, ranks: int, dispatcher: str = "alltoall", chunks: int = 1,
               chunk_memory: str = "save", group: int = 1):
    """(ModelSpec, Strategy) of the resource model for this benchmark's layer: tiny-moe with
    the layer's MoE shape, one micro-batch of --tokens tokens per rank; "ppmoe" over node
    groups of ``group`` ranks (tp = ep = group)."""
    import dataclasses

    from piper_moe.resource_model import Strategy, load_model
    from piper_moe.resource_model.spec import MoESpec

    moe = MoESpec(num_experts=cfg.num_experts, top_k=cfg.top_k, expert_ffn=cfg.ffn_hidden,
                  num_shared_experts=cfg.num_shared_experts,
                  shared_expert_ffn=cfg.ffn_hidden if cfg.num_shared_experts else 0,
                  num_groups=cfg.num_groups, top_groups=cfg.topk_groups)
    model = dataclasses.replace(load_model("tiny-moe"), hidden=cfg.hidden, moe=moe)
    common = dict(pp=1, micro_batch=1, seq_len=a.tokens,
                  precision="fp32" if a.dtype != "bfloat16" else "bf16")
    if dispatcher == "ppmoe":
        return model, Strategy(dp=ranks // group, tp=group, ep=group, dispatcher="ppmoe",
                               global_batch=ranks // group,
                               **{**common, "seq_len": a.tokens * group})
    chunked = {"moe_chunks": chunks, "chunk_memory": chunk_memory} if chunks > 1 else {}
    return model, Strategy(dp=ranks, tp=1, ep=ranks, global_batch=ranks, **common, **chunked)


def model_saved(a, layer, ranks: int) -> float | None:
    """The resource model's bytes saved for backward by one forward of ``layer`` (a
    piper_moe.MoELayer after its timed forwards; piper_moe.resource_model.memory.moe_layer_saved) at
    balanced routing: the all-to-all layer, the chunked one with the chunk count and
    chunk_memory it last used (device bytes: an offloaded host copy is not counted), PPMoE over
    its node group. None where the model has no such layer (the reference, node dedup) or
    dtype (float64)."""
    from piper_moe.resource_model.memory import moe_layer_saved

    if not hasattr(layer, "dispatcher") or getattr(layer, "dedup", False) or (
            a.dtype not in ("float32", "bfloat16")) or layer.precision != "fp32":
        return None
    st = layer.stats
    if layer.dispatcher == "ppmoe":
        spec = model_spec(a, layer.cfg, ranks, "ppmoe", group=layer.comm.size)
    else:
        spec = model_spec(a, layer.cfg, ranks, chunks=st.get("chunks") or 1,
                          chunk_memory=st.get("chunk_memory") or "save")
    return moe_layer_saved(*spec)


def memory_summary(a, comm, layers, x0, torch) -> dict:
    """Per variant (max over ranks): bytes saved for backward by one forward and parameter
    bytes (all, and routed experts alone); plus this process's peak RSS (all variants of the
    run together, so an upper bound for each)."""
    import resource

    out = {}
    for v in a.variants:
        params = sum(p.numel() * p.element_size() for p in layers[v].parameters())
        experts = getattr(layers[v], "experts", None)
        exp_b = (sum(p.numel() * p.element_size() for p in experts.parameters())
                 if isinstance(experts, torch.nn.Module) else float("nan"))
        mine = np.array([saved_bytes(layers[v], x0, torch), params, exp_b], dtype=np.float64)
        allr = gather(comm, mine)
        out[v] = {"saved_for_backward_bytes_max_rank": int(allr[:, 0].max()),
                  "model_saved_bytes": model_saved(a, layers[v], comm.size),
                  "param_bytes_max_rank": int(allr[:, 1].max()),
                  "expert_param_bytes_max_rank": (None if np.isnan(allr[:, 2]).any()
                                                  else int(allr[:, 2].max()))}
    rss = gather(comm, np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0]))
    out["peak_rss_bytes_per_rank"] = [int(x) for x in rss[:, 0]]
    return out


def model_comm(a, cfg, comm, dtype_bytes: int) -> dict:
    """The resource model's per-layer communication seconds (forward; backward runs the duals
    at the same cost, so fwd+bwd is twice) of each --dispatchers entry on --platform as given
    and with the inter-node link set to the intra-node one (as the emulated nodes are)."""
    from dataclasses import replace

    from piper_moe.resource_model import comm as comm_model
    from piper_moe.resource_model import load_platform
    from piper_moe.resource_model.dispatch_cost import a2a_bytes, a2a_time, ppmoe_bytes, ppmoe_time
    from piper_moe.resource_model.estimate import chunked_a2a

    plat = load_platform(a.platform)
    P, g = comm.size, comm.local_size
    h, k, T = cfg.hidden, cfg.top_k, a.tokens
    out = {"platform": plat.name, "ranks": P, "per_node": g, "tokens_per_rank": T,
           "bytes_per_rank_fwd": {"alltoall": a2a_bytes(T, k, h, dtype_bytes, P),
                                  "halo": a2a_bytes(T, k, h, dtype_bytes, P),
                                  "ppmoe": ppmoe_bytes(T * g, h, dtype_bytes, g)}}
    chunk_counts = sorted({c for c in a.chunk_settings.values() if c != "auto" and c > 1})
    for tag, pl in (("as_given", plat), ("inter_eq_intra", replace(plat, inter=plat.intra))):
        out[tag] = {"alltoall": a2a_time(T, k, h, dtype_bytes, P, g, pl, "flat"),
                    "halo": a2a_time(T, k, h, dtype_bytes, P, g, pl, "halo"),
                    "ppmoe": ppmoe_time(T * g, h, dtype_bytes, g, pl, sequence_sharded=True)}
        # chunked layer: fwd exposed + bwd exchanges + the experts recomputed in backward
        out[tag]["chunks"] = {}
        for c in chunk_counts:
            for mem in ("save", "recompute"):
                model, st = model_spec(a, cfg, P, chunks=c, chunk_memory=mem)
                fwd, bwd, rec = chunked_a2a(model, pl, st, T * k * h * dtype_bytes,
                                             comm_model.per_node(P, 1, g))
                out[tag]["chunks"][f"{c}/{mem}"] = fwd + bwd + rec
    return out


def saved_bytes(layer, x0, torch) -> int:
    """Bytes of the tensors one forward saves for backward (parameters excluded, each storage
    counted once); runs the backward too (it is collective)."""
    return saved_split(layer, x0, torch)[0]


def saved_split(layer, x0, torch) -> tuple[int, int]:
    """(saved_bytes, of which host copies made by chunk_memory="offload") of one forward
    (piper_moe.layer.saved.SavedTensors); runs the backward too (it is collective)."""
    from piper_moe.layer.saved import SavedTensors

    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with SavedTensors(exclude=layer.parameters()) as saved:
        y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    return saved.bytes, saved.host_bytes


def chunk_summary(a, comm, layers, x0, comm_s, torch) -> list[dict]:
    """Per chunk setting (gathered over ranks): hidden fraction, exposed / total comm ms, saved
    bytes, the C the steps ran with."""
    rows = []
    for v in a.chunk_settings:
        ex = np.array([s[0] for s in comm_s[v]])
        tot = np.array([s[1] for s in comm_s[v]])
        used = sorted({s[2] for s in comm_s[v]})
        fwd = float(np.median([s[3] for s in comm_s[v]]))
        mem_used = sorted({s[4] for s in comm_s[v] if s[4] is not None})
        saved, host = saved_split(layers[v], x0, torch)
        mine = np.array([ex.sum(), tot.sum(), float(np.median(ex)), float(np.median(tot)),
                         saved, fwd, host])
        allr = gather(comm, mine)
        hidden = [float(1 - e / t) if t > 0 else None for e, t in zip(allr[:, 0], allr[:, 1])]
        rows.append({"variant": v, "setting": a.chunk_settings[v], "chunks_used": used,
                     "auto_choice": layers[v].pipeline.choice,
                     "auto_measured_s": layers[v].pipeline.measured,
                     "hidden_fraction_per_rank": hidden,
                     "exposed_ms_median_per_rank": [1e3 * float(t) for t in allr[:, 2]],
                     "total_ms_median_per_rank": [1e3 * float(t) for t in allr[:, 3]],
                     "saved_for_backward_bytes_max_rank": int(allr[:, 4].max()),
                     "saved_for_backward_bytes_per_rank": [int(b) for b in allr[:, 4]],
                     "offloaded_to_host_bytes_per_rank": [int(b) for b in allr[:, 6]],
                     "chunk_memory": a.chunk_memories[v], "chunk_memory_used": mem_used,
                     "forward_ms_median_max_rank": 1e3 * float(allr[:, 5].max())})
    unchunked = next((r for r in rows if r["setting"] == 1), None)
    for r in rows:  # saved bytes (device side: offloaded host copies excluded) vs C = 1
        if unchunked is not None:
            dev = [s - h for s, h in zip(r["saved_for_backward_bytes_per_rank"],
                                         r["offloaded_to_host_bytes_per_rank"])]
            base = unchunked["saved_for_backward_bytes_per_rank"]
            r["saved_vs_unchunked_per_rank"] = [s / b if b else None for s, b in
                                                zip(r["saved_for_backward_bytes_per_rank"],
                                                    base)]
            r["device_saved_vs_unchunked_per_rank"] = [s / b if b else None
                                                       for s, b in zip(dev, base)]
    return rows


def report(a, cfg, comm, torch, all_med, all_times, all_diff, all_stats, piper_vs, stat_keys,
           layers, chunk_rows=(), memory=None, ref_max: float = 0.0) -> None:
    P = comm.size
    global_tokens = a.tokens * P
    worst = all_med.max(axis=0)                          # max over ranks of per-rank median
    ref_t = worst[a.variants.index("reference")] if "reference" in a.variants else None
    ep_note = f"EP={P}: {cfg.num_experts // P} experts per rank"
    if "ppmoe" in a.variants:
        g = comm.local_size
        ep_note += (f"; ppmoe: EP={g} (ranks per node), {cfg.num_experts // g} experts per rank, "
                    f"experts replicated on each of the {comm.num_nodes} node(s) "
                    f"(data parallel across nodes)")
    print(f"# bench/moe_layer.py: {' '.join(sys.argv)}")
    print(f"# nranks {P}  local_size {comm.local_size}  nodes {comm.num_nodes}  {ep_note}")
    print(f"# shape: hidden {cfg.hidden} ffn_hidden {cfg.ffn_hidden} experts {cfg.num_experts} "
          f"top_k {cfg.top_k} shared {cfg.num_shared_experts} router {cfg.router} "
          f"groups {cfg.num_groups}/{cfg.topk_groups} aux_loss_coef {cfg.aux_loss_coef}  "
          f"tokens/rank {a.tokens} (global {global_tokens})  dtype {a.dtype}")
    print(f"# torch {torch.__version__}  threads/rank {torch.get_num_threads()}  "
          f"machine {machine()}  date {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
          f"  loadavg {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"# timing: forward + (y.sum()+aux).backward(), barrier before each step, "
          f"warmup {a.warmup}, iters {a.iters}; time = max over ranks of the per-rank median")
    print("#")
    print(f"# {'variant':>22} {'time(ms)':>10} {'min-rank(ms)':>13} {'tokens/s':>11} "
          f"{'vs ref':>7} {'max|y-y_ref|':>13}")
    rows = []
    for i, v in enumerate(a.variants):
        t = float(worst[i])
        ratio = (ref_t / t) if ref_t else None
        d = float(all_diff[:, i].max()) if v != "reference" and ref_t is not None else None
        rows.append({"variant": v, "time_ms": 1e3 * t, "min_rank_time_ms":
                     1e3 * float(all_med[:, i].min()), "tokens_per_s": global_tokens / t,
                     "speedup_vs_reference": ratio, "max_abs_diff_vs_reference": d,
                     "per_rank_median_ms": [1e3 * float(x) for x in all_med[:, i]],
                     "per_rank_times_ms": [[1e3 * float(x) for x in
                                            all_times[r, i * a.iters:(i + 1) * a.iters]]
                                           for r in range(P)]})
        print(f"  {v:>22} {1e3 * t:10.2f} {1e3 * float(all_med[:, i].min()):13.2f} "
              f"{global_tokens / t:11.0f} {ratio if ratio else float('nan'):7.3f} "
              f"{'-' if d is None else f'{d:.2e}':>13}")
    print("#  vs ref = reference time / variant time (> 1: faster than the reference)")
    print("#")
    print("# layer.stats of the last step, summed over ranks (bytes of hidden-state rows sent "
          "to other ranks, dispatch + combine):")
    stats = {}
    for j, v in enumerate(piper_vs):
        tot = {k: int(all_stats[:, j * len(stat_keys) + n].sum())
               for n, k in enumerate(stat_keys)}
        stats[v] = {**tot, "tokens_per_expert": layers[v].stats["tokens_per_expert"]}
        print(f"#   {v:>22}: intra-node {tot['bytes_sent_intra_node']:>11,d}  inter-node "
              f"{tot['bytes_sent_inter_node']:>11,d}  saved by dedup "
              f"{tot['bytes_saved_by_dedup']:>11,d}")
    if piper_vs:
        tpe = layers[piper_vs[0]].stats["tokens_per_expert"]
        imb = f"{max(tpe) / (sum(tpe) / len(tpe)):.2f}" if sum(tpe) else "-"
        print(f"#   tokens per expert (global): {tpe}  (max/mean {imb})")
    precision_rows = (report_precisions(a, worst, all_diff, stats, memory, ref_max)
                      if a.precisions else [])
    if chunk_rows:
        print("#")
        print("# chunked pipeline (forward communication; C=1 is synchronous: nothing hidden, "
              "its comm time is not measured):")
        print(f"# {'variant':>22} {'C used':>8} {'fwd(ms)':>9} {'hidden(mean/min rank)':>22} "
              f"{'exposed(ms)':>12} {'total(ms)':>10} {'saved-for-bwd(MiB)':>18} "
              f"{'of it host(MiB)':>15} {'vs C=1':>7} {'dev vs C=1':>11}")
        for r in chunk_rows:
            h = [x for x in r["hidden_fraction_per_rank"] if x is not None]
            hid = f"{np.mean(h):+.2f}/{min(h):+.2f}" if h else "-"
            used = ",".join(map(str, r["chunks_used"]))
            sync = r["chunks_used"] == [1]
            exp = "-" if sync else f"{max(r['exposed_ms_median_per_rank']):.2f}"
            tot = "-" if sync else f"{max(r['total_ms_median_per_rank']):.2f}"
            hid = "- (sync)" if sync else hid
            mb = r["saved_for_backward_bytes_max_rank"] / 2**20
            host = max(r["offloaded_to_host_bytes_per_rank"]) / 2**20
            rat = [x for x in r.get("saved_vs_unchunked_per_rank", []) if x is not None]
            drat = [x for x in r.get("device_saved_vs_unchunked_per_rank", []) if x is not None]
            rat = f"{np.mean(rat):.3f}" if rat else "-"
            drat = f"{np.mean(drat):.3f}" if drat else "-"
            print(f"  {r['variant']:>22} {used:>8} {r['forward_ms_median_max_rank']:9.2f} "
                  f"{hid:>22} {exp:>12} {tot:>10} {mb:18.2f} {host:15.2f} {rat:>7} "
                  f"{drat:>11}")
            if r["chunk_memory"] == "auto" and r["chunk_memory_used"]:
                print(f"#   {r['variant']}: chunk_memory auto used {r['chunk_memory_used']}")
            if r["setting"] == "auto":
                print(f"#   {r['variant']}: chose C={r['auto_choice']} from fwd-to-fwd seconds "
                      f"(max over ranks) {r['auto_measured_s']}")
        print("#  fwd = forward alone (median per rank, max over ranks); exposed / total: "
              "medians per step, max over ranks")
        print("#  saved-for-bwd: max over ranks; vs C=1: saved bytes / the unchunked variant's, "
              "mean over ranks; dev vs C=1: the same without the host copies of offload (what "
              "stays on the device; on CPU host and device are the same memory)")
        print("#  hidden = 1 - exposed/total summed over the timed steps (per rank; exposed: "
              "blocked in wait or in the synchronous count exchange; total: union of "
              "issue-to-completion intervals, completion observed at stage boundaries)")
    model = None
    if a.dispatchers:
        model = report_dispatchers(a, cfg, comm, torch, worst, ref_t, memory, stats)
    notes = [
        "the reference is data-parallel with all experts on every rank: it does no "
        "communication at all; Piper's EP layer adds the all-to-alls (dispatch, combine and "
        "their backward, plus a count exchange) and routing bookkeeping (sort, index maps).",
        f"all {P} ranks share this host's {os.cpu_count()} cores (oversubscribed "
        f"{P / (os.cpu_count() or 1):.0f}x), and the 'nodes' are emulated by PIPER_LOCAL_SIZE: "
        "inter-node traffic goes through the same shared memory as intra-node traffic, so dedup "
        "saves bytes but not a slower link. On one CPU host EP can only add work; its benefit "
        "(experts' weights and memory split EP ways, real network links) is not measured here.",
        "the reference's per-expert index_select has a backward that writes a full zeroed "
        "[tokens, hidden] gradient per expert and sums them: O(experts * tokens * hidden), so "
        "its time grows with num_experts; Piper's sorted, grouped experts do not pay that.",
        "timings on a shared host are noisy: compare the variants of one run (interleaved "
        "step by step), not runs taken at different times or load averages.",
    ]
    for n in notes:
        print(f"# note: {n}")
    if a.json:
        out = {"benchmark": "bench/moe_layer.py", "argv": sys.argv,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "nranks": P, "local_size": comm.local_size, "nodes": comm.num_nodes,
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "tokens_per_rank": a.tokens, "global_tokens": global_tokens, "dtype": a.dtype,
               "iters": a.iters, "warmup": a.warmup, "threads_per_rank": torch.get_num_threads(),
               "torch": torch.__version__, "machine": machine(), "cpu_count": os.cpu_count(),
               "loadavg_at_end": list(os.getloadavg()),
               "timing": "max over ranks of the per-rank median of forward+backward seconds",
               "results": rows, "stats_summed_over_ranks": stats, "chunked": list(chunk_rows),
               "memory": memory or {}, "model_comm_seconds_fwd": model,
               "precisions": precision_rows, "peer": a.peer,
               "platform": a.platform if a.dispatchers else None, "notes": notes}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def report_precisions(a, worst, all_diff, stats, memory, ref_max: float) -> list[dict]:
    """Prints the --precisions table (time, ratio to the peer and to the same variant in
    fp32, distance to the fp32 reference, bytes, saved-for-backward bytes); returns its
    rows."""
    t = {v: float(worst[i]) for i, v in enumerate(a.variants)}
    peer = t.get(a.peer) if a.peer else None
    rows = []
    print("#")
    print("# precisions (fwd+bwd; bytes: layer.stats of the last step summed over ranks; "
          "saved-for-bwd: one forward, max over ranks):")
    print(f"# {'variant':>28} {'time(ms)':>9} {'peer/this':>9} {'fp32/this':>9} "
          f"{'rel|y-y32|':>10} {'dispatch(MB)':>12} {'combine(MB)':>11} "
          f"{'saved-for-bwd(MiB)':>18}")
    for i, v in enumerate(a.variants):
        if v == "reference":
            continue
        base = v.partition("@")[0]
        fp32 = t.get(f"{base}@fp32")
        st = stats.get(v, {})
        saved = memory.get(v, {}).get("saved_for_backward_bytes_max_rank")
        rel = float(all_diff[:, i].max()) / ref_max if ref_max else None
        row = {"variant": v, "time_ms": 1e3 * t[v],
               "peer_over_this": peer / t[v] if peer else None,
               "fp32_over_this": fp32 / t[v] if fp32 else None,
               "rel_max_diff_vs_fp32_reference": rel,
               "bytes_dispatch": st.get("bytes_dispatch"),
               "bytes_combine": st.get("bytes_combine"),
               "saved_for_backward_bytes_max_rank": saved}
        rows.append(row)

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        mb = {k: None if st.get(k) is None else st[k] / 1e6
              for k in ("bytes_dispatch", "bytes_combine")}
        print(f"  {v:>28} {1e3 * t[v]:9.2f} {f(row['peer_over_this'], '9.3f'):>9} "
              f"{f(row['fp32_over_this'], '9.3f'):>9} {f(rel, '10.2e'):>10} "
              f"{f(mb['bytes_dispatch'], '12.3f'):>12} {f(mb['bytes_combine'], '11.3f'):>11} "
              f"{f(None if saved is None else saved / 2**20, '18.2f'):>18}")
    print("#  peer/this: the peer's time / this variant's (> 1: this one is faster); fp32/this: "
          "the same variant in fp32 / this; rel|y-y32|: max |y - y_fp32_reference| / "
          "max |y_fp32_reference| over ranks (first step's outputs)")
    return rows


def report_dispatchers(a, cfg, comm, torch, worst, ref_t, memory, stats) -> dict:
    """Prints the --dispatchers summary (time, memory, the model's communication time next to
    the measured difference); returns the model's numbers."""
    elem = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    model = model_comm(a, cfg, comm, elem)
    t = {v: float(worst[i]) for i, v in enumerate(a.variants)}
    # the alltoall time: its unchunked (C=1) variant when --chunks split it
    a2a = "alltoall" if "alltoall" in t else next(
        (v for v, c in a.chunk_settings.items() if c == 1 and v.startswith("alltoall-")), None)
    print("#")
    print("# dispatchers (fwd+bwd; memory max over ranks; peak RSS is the whole process, every "
          "variant of this run together):")
    print(f"# {'variant':>22} {'time(ms)':>10} {'vs ref':>7} {'saved-for-bwd(MiB)':>18} "
          f"{'model(MiB)':>10} {'params(MiB)':>11} {'experts(MiB)':>12}")
    for v in a.variants:
        m = memory.get(v, {})
        exp = m.get("expert_param_bytes_max_rank")
        pred = m.get("model_saved_bytes")
        print(f"  {v:>22} {1e3 * t[v]:10.2f} "
              f"{(ref_t / t[v]) if ref_t else float('nan'):7.3f} "
              f"{m.get('saved_for_backward_bytes_max_rank', 0) / 2**20:18.2f} "
              f"{'-' if pred is None else f'{pred / 2**20:.2f}':>10} "
              f"{m.get('param_bytes_max_rank', 0) / 2**20:11.2f} "
              f"{'-' if exp is None else f'{exp / 2**20:.2f}':>12}")
    print("#   model(MiB): piper_moe.resource_model.memory.moe_layer_saved at balanced routing "
          "(measured: "
          "the most loaded rank; an offloaded host copy counts in the measurement, not in the "
          "model's device bytes; '-': no such layer in the model: reference, node dedup)")
    rss = memory.get("peak_rss_bytes_per_rank", [])
    if rss:
        print(f"#   peak RSS per rank (MiB): {' '.join(f'{r / 2**20:.0f}' for r in rss)}")
    print("#")
    print(f"# resource model ({model['platform']}; "
          "piper_moe.resource_model.dispatch_cost a2a_time / ppmoe_time): "
          f"per-layer communication, forward x2 for fwd+bwd, {model['ranks']} ranks, "
          f"{model['per_node']} per node, {a.tokens} tokens/rank, imbalance 1")
    print(f"# {'dispatcher':>14} {'bytes/rank fwd':>15} {'measured':>11} "
          f"{'model as given(ms)':>19} {'model inter=intra(ms)':>22}")
    for d in a.dispatchers:
        st = stats.get(a2a if d == "alltoall" else d)
        got = ("-" if st is None else
               f"{(st['bytes_sent_intra_node'] + st['bytes_sent_inter_node']) / comm.size:,.0f}")
        print(f"  {d:>14} {model['bytes_per_rank_fwd'][d]:15,.0f} {got:>11} "
              f"{2e3 * model['as_given'][d]:19.3f} {2e3 * model['inter_eq_intra'][d]:22.3f}")
    print("#  bytes/rank fwd: the model's bytes one rank sends in a forward; measured: "
          "layer.stats summed over ranks / ranks (halo: after dedup)")
    def winner(diff: float, scale: float) -> str:  # a tie within 2% of the larger time
        return "tie" if abs(diff) <= 0.02 * scale else "ppmoe" if diff < 0 else "alltoall"

    if a2a and "ppmoe" in t:
        meas = 1e3 * (t["ppmoe"] - t[a2a])
        for tag, what in (("as_given", "as given"), ("inter_eq_intra", "inter=intra")):
            pred = 2e3 * (model[tag]["ppmoe"] - model[tag]["alltoall"])
            scale = 2e3 * max(model[tag]["ppmoe"], model[tag]["alltoall"])
            print(f"#   ppmoe - alltoall ({a2a}), fwd+bwd: measured {meas:+.2f} ms, model "
                  f"({what}) {pred:+.3f} ms of communication: model picks "
                  f"{winner(pred, scale)}, measurement "
                  f"{winner(meas, 1e3 * max(t['ppmoe'], t[a2a]))}")
    if a2a and "halo" in t:
        meas = 1e3 * (t["halo"] - t[a2a])
        pred = 2e3 * (model["as_given"]["halo"] - model["as_given"]["alltoall"])
        print(f"#   halo - alltoall ({a2a}), fwd+bwd: measured {meas:+.2f} ms, model (as given) "
              f"{pred:+.3f} ms (the model's HALO is the all-to-all algorithm; the halo variant "
              f"is node dedup, which also cuts inter-node bytes)")
    base = next((v for v, c in a.chunk_settings.items() if c == 1), None)
    for v, c in a.chunk_settings.items():
        mem = a.chunk_memories[v] if a.chunk_memories[v] in ("save", "recompute") else "save"
        if c == "auto" or c == 1 or base is None or f"{c}/{mem}" not in model["as_given"]["chunks"]:
            continue
        meas = 1e3 * (t[v] - t[base])
        preds = [1e3 * (model[tag]["chunks"][f"{c}/{mem}"] - 2 * model[tag]["alltoall"])
                 for tag in ("as_given", "inter_eq_intra")]
        print(f"#   {v} - {base}, fwd+bwd: measured {meas:+.2f} ms, model {preds[0]:+.3f} ms "
              f"(as given) / {preds[1]:+.3f} ms (inter=intra) of exposed communication + the "
              f"experts recomputed in backward ({mem})")
    print("#  the model covers communication only, plus the experts' recompute in the chunked "
          "lines (no other compute, routing, copies or the "
          "oversubscription of this host); ppmoe's data-parallel expert-gradient all-reduce "
          "across nodes is per step, not per layer, and not in either number")
    return model


if __name__ == "__main__":
    sys.exit(main())
