"""Forward + backward timing of Piper's expert-parallel MoE layer vs a plain PyTorch layer.

    mpirun -genv PIPER_LOCAL_SIZE 2 -n 4 .venv/bin/python -m piper_moe.bench_layer [flags]

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

VARIANTS = ("reference", "piper", "piper-nodedup")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m piper_moe.bench_layer", description=__doc__,
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
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all, or "
                   f"reference alone with --chunks)")
    p.add_argument("--chunks", default=None, metavar="LIST",
                   help="comma-separated pipeline_chunks settings (ints and/or auto), each "
                   "a variant piper-C<setting> (dedup off)")
    p.add_argument("--recheck", type=int, default=50, help="pipeline_recheck for auto")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rank 0)")
    a = p.parse_args(argv)
    if a.variants is None:
        a.variants = "reference" if a.chunks else ",".join(VARIANTS)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad or not a.variants:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    a.chunk_settings = {}
    for c in (a.chunks.split(",") if a.chunks else []):
        c = c.strip()
        if c != "auto" and not (c.isdigit() and int(c) >= 1):
            p.error(f"--chunks: {c!r} is neither an int >= 1 nor auto")
        a.chunk_settings[f"piper-C{c}"] = c if c == "auto" else int(c)
    a.variants += list(a.chunk_settings)
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
    cfg = MoEConfig(hidden=a.hidden, ffn_hidden=a.ffn_hidden, num_experts=a.num_experts,
                    top_k=a.top_k, num_shared_experts=a.num_shared_experts, router=a.router,
                    num_groups=a.num_groups, topk_groups=a.topk_groups,
                    aux_loss_coef=a.aux_loss_coef)
    layers = {}
    for v in a.variants:  # construction order is the same on every rank (it is collective)
        if v == "reference":
            layers[v] = ReferenceMoE(cfg, seed=a.seed, dtype=dtype)
        elif v in a.chunk_settings:
            layers[v] = MoELayer(cfg, comm, seed=a.seed, dtype=dtype, dedup=False,
                                 pipeline_chunks=a.chunk_settings[v],
                                 pipeline_recheck=a.recheck)
        else:
            layers[v] = MoELayer(cfg, comm, seed=a.seed, dtype=dtype, dedup=v == "piper")
    g = torch.Generator().manual_seed(a.seed * 1000003 + me)
    x0 = torch.randn(a.tokens, a.hidden, generator=g).to(dtype)

    def step(v: str) -> tuple[float, torch.Tensor]:
        layer = layers[v]
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        comm.barrier()
        t0 = time.perf_counter()
        y = layer(x)
        t_fwd = time.perf_counter() - t0
        (y.sum() + layer.aux_loss).backward()
        t = time.perf_counter() - t0
        if v in a.chunk_settings:
            st = layer.stats
            comm_s[v].append((st["comm_seconds_exposed"] or 0.0,
                              st["comm_seconds_total"] or 0.0, st["chunks"], t_fwd))
        return t, y.detach()

    comm_s: dict[str, list] = {v: [] for v in a.chunk_settings}

    # sanity: Piper's outputs equal the reference's on the same tokens (same global model)
    outs = {v: step(v)[1] for v in a.variants}
    diff = {v: float((outs[v] - outs["reference"]).abs().max()) if a.tokens else 0.0
            for v in a.variants if v != "reference" and "reference" in outs}
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

    med = np.array([statistics.median(times[v]) for v in a.variants])
    all_med = gather(comm, med)                                         # [P, variants]
    all_times = gather(comm, np.concatenate([times[v] for v in a.variants]))
    all_diff = gather(comm, np.array([diff.get(v, 0.0) for v in a.variants]))
    stat_keys = ("bytes_sent_intra_node", "bytes_sent_inter_node", "bytes_saved_by_dedup")
    piper_vs = [v for v in a.variants if v != "reference"]
    all_stats = gather(comm, np.array([layers[v].stats[k] for v in piper_vs
                                       for k in stat_keys], dtype=np.float64))
    if me == 0:
        report(a, cfg, comm, torch, all_med, all_times, all_diff, all_stats, piper_vs,
               stat_keys, layers, chunk_rows)
    comm.close()
    return 0


def saved_bytes(layer, x0, torch) -> int:
    """Bytes of the tensors one forward saves for backward (parameters excluded, each storage
    counted once); runs the backward too (it is collective)."""
    params = {p.data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    layer.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    return sum(seen.values())


def chunk_summary(a, comm, layers, x0, comm_s, torch) -> list[dict]:
    """Per chunk setting (gathered over ranks): hidden fraction, exposed / total comm ms, saved
    bytes, the C the steps ran with."""
    rows = []
    for v in a.chunk_settings:
        ex = np.array([e for e, _, _, _ in comm_s[v]])
        tot = np.array([t for _, t, _, _ in comm_s[v]])
        used = sorted({c for _, _, c, _ in comm_s[v]})
        fwd = float(np.median([f for _, _, _, f in comm_s[v]]))
        saved = saved_bytes(layers[v], x0, torch)
        mine = np.array([ex.sum(), tot.sum(), float(np.median(ex)), float(np.median(tot)),
                         saved, fwd])
        allr = gather(comm, mine)
        hidden = [float(1 - e / t) if t > 0 else None for e, t in zip(allr[:, 0], allr[:, 1])]
        rows.append({"variant": v, "setting": a.chunk_settings[v], "chunks_used": used,
                     "auto_choice": layers[v].pipeline.choice,
                     "auto_measured_s": layers[v].pipeline.measured,
                     "hidden_fraction_per_rank": hidden,
                     "exposed_ms_median_per_rank": [1e3 * float(t) for t in allr[:, 2]],
                     "total_ms_median_per_rank": [1e3 * float(t) for t in allr[:, 3]],
                     "saved_for_backward_bytes_max_rank": int(allr[:, 4].max()),
                     "forward_ms_median_max_rank": 1e3 * float(allr[:, 5].max())})
    return rows


def report(a, cfg, comm, torch, all_med, all_times, all_diff, all_stats, piper_vs, stat_keys,
           layers, chunk_rows=()) -> None:
    P = comm.size
    global_tokens = a.tokens * P
    worst = all_med.max(axis=0)                          # max over ranks of per-rank median
    ref_t = worst[a.variants.index("reference")] if "reference" in a.variants else None
    ep_note = f"EP={P}: {cfg.num_experts // P} experts per rank"
    print(f"# piper_moe.bench_layer: {' '.join(sys.argv)}")
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
    print(f"# {'variant':>14} {'time(ms)':>10} {'min-rank(ms)':>13} {'tokens/s':>11} "
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
        print(f"  {v:>14} {1e3 * t:10.2f} {1e3 * float(all_med[:, i].min()):13.2f} "
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
        print(f"#   {v:>14}: intra-node {tot['bytes_sent_intra_node']:>11,d}  inter-node "
              f"{tot['bytes_sent_inter_node']:>11,d}  saved by dedup "
              f"{tot['bytes_saved_by_dedup']:>11,d}")
    if piper_vs:
        tpe = layers[piper_vs[0]].stats["tokens_per_expert"]
        imb = f"{max(tpe) / (sum(tpe) / len(tpe)):.2f}" if sum(tpe) else "-"
        print(f"#   tokens per expert (global): {tpe}  (max/mean {imb})")
    if chunk_rows:
        print("#")
        print("# chunked pipeline (forward communication; C=1 is synchronous: nothing hidden, "
              "its comm time is not measured):")
        print(f"# {'variant':>14} {'C used':>8} {'fwd(ms)':>9} {'hidden(mean/min rank)':>22} "
              f"{'exposed(ms)':>12} {'total(ms)':>10} {'saved-for-bwd(MB)':>18}")
        for r in chunk_rows:
            h = [x for x in r["hidden_fraction_per_rank"] if x is not None]
            hid = f"{np.mean(h):+.2f}/{min(h):+.2f}" if h else "-"
            used = ",".join(map(str, r["chunks_used"]))
            sync = r["chunks_used"] == [1]
            exp = "-" if sync else f"{max(r['exposed_ms_median_per_rank']):.2f}"
            tot = "-" if sync else f"{max(r['total_ms_median_per_rank']):.2f}"
            hid = "- (sync)" if sync else hid
            mb = r["saved_for_backward_bytes_max_rank"] / 2**20
            print(f"  {r['variant']:>14} {used:>8} {r['forward_ms_median_max_rank']:9.2f} "
                  f"{hid:>22} {exp:>12} {tot:>10} {mb:18.2f}")
            if r["setting"] == "auto":
                print(f"#   {r['variant']}: chose C={r['auto_choice']} from fwd-to-fwd seconds "
                      f"(max over ranks) {r['auto_measured_s']}")
        print("#  fwd = forward alone (median per rank, max over ranks); exposed / total: "
              "medians per step, max over ranks")
        print("#  hidden = 1 - exposed/total summed over the timed steps (per rank; exposed: "
              "blocked in wait or in the synchronous count exchange; total: union of "
              "issue-to-completion intervals, completion observed at stage boundaries)")
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
        out = {"benchmark": "piper_moe.bench_layer", "argv": sys.argv,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "nranks": P, "local_size": comm.local_size, "nodes": comm.num_nodes,
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "tokens_per_rank": a.tokens, "global_tokens": global_tokens, "dtype": a.dtype,
               "iters": a.iters, "warmup": a.warmup, "threads_per_rank": torch.get_num_threads(),
               "torch": torch.__version__, "machine": machine(), "cpu_count": os.cpu_count(),
               "loadavg_at_end": list(os.getloadavg()),
               "timing": "max over ranks of the per-rank median of forward+backward seconds",
               "results": rows, "stats_summed_over_ranks": stats, "chunked": list(chunk_rows),
               "notes": notes}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
