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

    --precisions LIST  (subset of fp32, bf16-mixed, bf16-mixed+fp8 and its forms
                 bf16-mixed+fp8-dequantize / -scaled, which fix fp8_gemm; +fp8 leaves it
                 auto): every Piper variant (--variants) runs once per precision, named
                 <variant>@<precision> (MoELayer(precision=..., fp8_dispatch=...,
                 fp8_gemm=...), layer/precision.py, layer/fp8_gemm.py); the
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
import statistics
import sys
import time

import numpy as np

from piper_moe.common import DISPATCHERS as LAYER_DISPATCHERS

VARIANTS = ("reference", "piper", "piper-nodedup")
# --dispatchers: the layer's dispatchers, "alltoall" also as "halo" (with node dedup)
DISPATCHERS = ("alltoall", "halo", *LAYER_DISPATCHERS[1:])
_FP8 = {"precision": "bf16-mixed", "fp8_dispatch": True}
PRECISIONS = {"fp32": {}, "bf16-mixed": {"precision": "bf16-mixed"}, "bf16-mixed+fp8": _FP8,
              "bf16-mixed+fp8-dequantize": {**_FP8, "fp8_gemm": "dequantize"},
              "bf16-mixed+fp8-scaled": {**_FP8, "fp8_gemm": "scaled"}}
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
        from moe_layer_report import report  # beside this script, in bench/

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


def memory_summary(a, comm, layers, x0, torch) -> dict:
    """Per variant (max over ranks): bytes saved for backward by one forward and parameter
    bytes (all, and routed experts alone); plus this process's peak RSS (all variants of the
    run together, so an upper bound for each)."""
    import resource

    from moe_layer_model import model_saved  # beside this script, in bench/

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


if __name__ == "__main__":
    sys.exit(main())
