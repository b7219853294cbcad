"""bench/moe_layer.py's report (rank 0): the timing table, bytes, chunking and memory lines,
the precision and dispatcher sections with the resource model's predictions, and the --json
file. Imported by bench/moe_layer.py (beside it in bench/) once the measurements are gathered."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone

import numpy as np
from moe_layer_model import model_comm


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
