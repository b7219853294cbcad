"""Summaries and plots of what bench/cluster/record.sh recorded in bench/results/cluster/.

    python bench/cluster/report.py [--dir bench/results/cluster]

Writes, for the parts that are recorded:
  a2a_summary.txt / .json / .png   every algorithm's all-to-all time against the line-rate time
        of the bytes one node sends to the other nodes (the same for halo, flat, MPI and gloo:
        HALO aggregates messages, not bytes), per layout and cap;
  moe_summary.txt / .json / .png    dispatch + combine (forward + backward of one MoE layer) per
        dispatcher: time, the inter-node payload of a step (layer.stats, forward x 2), its
        link-bound time, the veth bytes of the job per step;
  train_summary.txt / .png         the training runs with dedup on and off.
Every figure is EMULATED (netns + veth + tc tbf, no added latency, one machine's CPUs).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linkcheck import inter_node_bytes, line_seconds, parse_rate

EMULATED = ("EMULATED: network namespaces + veth + bridge on one 2-CPU machine, tc tbf egress cap "
            "per node, no added latency")
ALGOS = ("halo", "flat", "mpi", "gloo")
LABELS = {"alltoall": "plain all-to-all", "halo": "node dedup", "ppmoe": "PPMoE"}  # dispatchers


def _name(path: str) -> dict[str, str]:
    m = re.search(r"_(\d+)x(\d+)_(\w+?bit)", Path(path).name)
    return {"nodes": int(m.group(1)), "ppn": int(m.group(2)), "rate": m.group(3)}


def a2a(d: Path) -> list[str]:
    runs = sorted(p for p in glob.glob(str(d / "a2a_2x*_*bit.json")))
    if not runs:
        return []
    out, summary = [f"# {EMULATED}", "# all-to-all time / line-rate time of the bytes one node "
                    "sends off-node (per node: ppn * (P - ppn) * size / P bytes at the cap; "
                    "1.00 = link-bound, < 1 impossible through the cap)"], {}
    panels = []
    for path in runs:
        meta = _name(path)
        rows = json.loads(Path(path).read_text())["rows"]
        rate = parse_rate(meta["rate"])
        t = {(r["algo"], r["size"]): r["time_us"] / 1e6 for r in rows}
        sizes = sorted({r["size"] for r in rows})
        key = f"{meta['nodes']}x{meta['ppn']} {meta['rate']}"
        out += ["#", f"# {key}: {Path(path).name}",
                f"# {'size/rank':>10} {'node bytes':>11} {'line ms':>9} "
                + " ".join(f"{a + ' ms':>10} {'x':>5}" for a in ALGOS)]
        summary[key] = []
        for s in sizes:
            nb = inter_node_bytes(meta["nodes"], meta["ppn"], s)
            line = line_seconds(nb, rate)
            row = {"size": s, "node_bytes": nb, "line_ms": 1e3 * line}
            cells = []
            for a in ALGOS:
                if (a, s) in t:
                    row[f"{a}_ms"], row[f"{a}_x"] = 1e3 * t[a, s], t[a, s] / line
                    cells.append(f"{1e3 * t[a, s]:>10.2f} {t[a, s] / line:>5.2f}")
                else:
                    cells.append(f"{'-':>10} {'-':>5}")
            summary[key].append(row)
            out.append(f"  {s:>10} {nb:>11} {1e3 * line:>9.2f} " + " ".join(cells))
        panels.append((key, summary[key]))
    (d / "a2a_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot_a2a(d / "a2a_summary.png", panels)
    return out


def _plot_a2a(path: Path, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
    for ax, (key, rows) in zip(axes.flat, panels):
        for i, a in enumerate(ALGOS):
            pts = [(r["size"], r[f"{a}_x"]) for r in rows if f"{a}_x" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=a, color=f"C{i}")
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{key} (emulated)")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("bytes a rank sends")
    for ax in axes[:, 0]:
        ax.set_ylabel("time / line-rate time")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("all-to-all on the emulated cluster (netns + tbf cap, no latency; 2 CPUs)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def moe(d: Path) -> list[str]:
    runs = sorted(glob.glob(str(d / "moe_2x*_*bit_top*_*.json")))
    runs = [p for p in runs if not p.endswith(".counters.json")]
    if not runs:
        return []
    out = [f"# {EMULATED}",
           "# one MoE layer, forward + backward (dispatch + experts + combine), one job per "
           "dispatcher; payload = inter-node hidden-state bytes of a step summed over nodes "
           "(layer.stats of the last step: forward, x 2 for backward); link-bound = the busiest "
           "node's payload at the cap (nodes assumed symmetric: payload / nodes); veth = the "
           "job's TX bytes over all nodes / (warmup + iters + 1 checking forward), which also "
           "counts set-up and count exchanges"]
    summary: dict[str, dict] = {}
    for path in runs:
        m = re.search(r"_(\d+)x(\d+)_(\w+?bit)_top(\d+)_(\w+)\.json$", path)
        nodes, ppn, rate, topk, disp = (int(m.group(1)), int(m.group(2)), m.group(3),
                                        int(m.group(4)), m.group(5))
        res = json.loads(Path(path).read_text())
        row = next(r for r in res["results"] if r["variant"] == disp)
        stats = res["stats_summed_over_ranks"].get(disp, {})
        payload = 2 * stats.get("bytes_sent_inter_node", 0)
        cnt = json.loads(Path(path[:-5] + ".counters.json").read_text())
        steps = res["warmup"] + res["iters"] + 1
        veth = sum(cnt["tx_bytes"]) / steps
        bound = line_seconds(payload / nodes, parse_rate(rate))
        summary.setdefault(f"top{topk} {nodes}x{ppn} {rate}", {})[disp] = {
            "time_ms": row["time_ms"], "payload_bytes_per_step": payload,
            "link_bound_ms": 1e3 * bound, "veth_bytes_per_step": veth,
            "time_over_bound": row["time_ms"] / (1e3 * bound) if bound else None,
            "reference_ms": next(r["time_ms"] for r in res["results"]
                                 if r["variant"] == "reference")}
    for key, by in summary.items():
        base = by.get("alltoall", {}).get("time_ms")
        out += ["#", f"# {key}",
                f"# {'dispatcher':>10} {'time ms':>9} {'vs alltoall':>12} {'payload MB':>11} "
                f"{'bound ms':>9} {'time/bound':>11} {'veth MB/step':>13}"]
        for disp in ("alltoall", "halo", "ppmoe"):
            if disp not in by:
                continue
            r = by[disp]
            sp = f"{base / r['time_ms']:.2f}x" if base else "-"
            tb = f"{r['time_over_bound']:.2f}" if r["time_over_bound"] else "-"
            vb = f"{r['veth_bytes_per_step'] / 1e6:.2f}" if r["veth_bytes_per_step"] else "-"
            out.append(f"  {disp:>10} {r['time_ms']:>9.1f} {sp:>12} "
                       f"{r['payload_bytes_per_step'] / 1e6:>11.2f} {r['link_bound_ms']:>9.1f} "
                       f"{tb:>11} {vb:>13}")
    out += _moe_exposed(summary)
    (d / "moe_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot_moe(d / "moe_summary.png", summary)
    return out


def _plot_moe(path: Path, summary: dict) -> None:
    """Per capped configuration: each dispatcher's step time split into the time without a
    link bottleneck (its 10gbit run) and the exposed link time, beside its payload's line-rate
    time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in summary if "10gbit" not in k]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], sorted(keys, reverse=True)):
        by = summary[key]
        fast = summary.get(key.replace(key.split()[-1], "10gbit"), {})
        names = [n for n in ("alltoall", "halo", "ppmoe") if n in by]
        base = [fast.get(n, {}).get("time_ms", 0.0) for n in names]
        top = [by[n]["time_ms"] - b for n, b in zip(names, base)]
        ticks = [LABELS[n] for n in names]
        ax.bar(ticks, base, color="C7", label="time at 10gbit (no link bottleneck)")
        ax.bar(ticks, top, bottom=base, color="C0", label="exposed link time at the cap")
        ax.scatter(ticks, [b + by[n]["link_bound_ms"] for n, b in zip(names, base)],
                   color="C3", marker="_", s=600, zorder=3,
                   label="10gbit time + line-rate time of the payload")
        ax.set(title=f"MoE layer fwd+bwd, {key} (emulated)", ylabel="ms per step")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _moe_exposed(summary: dict) -> list[str]:
    """Capped vs uncapped (10gbit: the CPUs, not the link, are the bottleneck) of the same job:
    the difference is the link time the layer exposes; compared with the line-rate time of the
    payload and of the veth bytes (payload + routing metadata + TCP/IP headers + set-up)."""
    out = []
    for key, by in summary.items():
        topk, layout, rate = key.split()
        fast = summary.get(f"{topk} {layout} 10gbit")
        if rate == "10gbit" or not fast:
            continue
        nodes = int(layout.split("x")[0])
        out += ["#", f"# {topk} {layout}: exposed link time = time at {rate} - time at 10gbit "
                f"(same job, link not the bottleneck)",
                f"# {'dispatcher':>10} {'exposed ms':>11} {'payload-bound':>14} {'ratio':>6} "
                f"{'veth-bound':>11} {'ratio':>6}"]
        for disp in ("alltoall", "halo"):
            if disp not in by or disp not in fast:
                continue
            r = by[disp]
            exposed = r["time_ms"] - fast[disp]["time_ms"]
            veth_bound = 1e3 * line_seconds(r["veth_bytes_per_step"] / nodes, parse_rate(rate))
            r.update(exposed_ms=exposed, veth_bound_ms=veth_bound)
            out.append(f"  {disp:>10} {exposed:>11.1f} {r['link_bound_ms']:>14.1f} "
                       f"{exposed / r['link_bound_ms']:>6.2f} {veth_bound:>11.1f} "
                       f"{exposed / veth_bound:>6.2f}")
    return out


def train(d: Path) -> list[str]:
    runs = sorted(glob.glob(str(d / "train_*_dedup_*.counters.json")))
    if not runs:
        return []
    out = [f"# {EMULATED}",
           "# s/step: the median step of metrics.json history (report: the trainer's own "
           "measured and predicted step, the prediction from the config's platform file); "
           "MB/step: the job's veth TX bytes over all nodes / steps (set-up included)",
           f"# {'run':>30} {'wall s':>7} {'steps':>6} {'s/step':>7} {'measured':>9} "
           f"{'predicted':>10} {'veth MB':>8} {'MB/step':>8} {'last loss':>10}"]
    for path in runs:
        base = path[: -len(".counters.json")]
        cnt = json.loads(Path(path).read_text())
        tx = sum(cnt["tx_bytes"])
        mpath = Path(base + ".metrics.json")
        if not mpath.exists():
            out.append(f"  {Path(base).name:>30} (no metrics.json)")
            continue
        m = json.loads(mpath.read_text())
        hist = m["history"]
        secs = sorted(h["seconds"] for h in hist)
        rep = m.get("report", {})
        meas = rep.get("measured", {}).get("step_s")
        pred = rep.get("predicted", {}).get("step_s")
        out.append(f"  {Path(base).name:>30} {cnt['seconds']:>7.1f} {len(hist):>6} "
                   f"{secs[len(secs) // 2]:>7.3f} {meas or float('nan'):>9.3f} "
                   f"{pred or float('nan'):>10.3f} {tx / 1e6:>8.1f} {tx / len(hist) / 1e6:>8.2f} "
                   f"{hist[-1]['loss']:>10.4f}")
    _plot_train(d / "train_summary.png", runs)
    return out


def _plot_train(path: Path, runs: list[str]) -> None:
    """Loss and step time per step of each training run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, cpath in enumerate(runs):
        mpath = Path(cpath[: -len(".counters.json")] + ".metrics.json")
        if not mpath.exists():
            continue
        hist = json.loads(mpath.read_text())["history"]
        label = mpath.name.split("_dedup_")[-1].split(".")[0]
        a1.plot([h["step"] for h in hist], [h["loss"] for h in hist], color=f"C{i}",
                label=f"dedup {label}")
        a2.plot([h["step"] for h in hist], [h["seconds"] for h in hist], color=f"C{i}",
                label=f"dedup {label}")
    a1.set(xlabel="step", ylabel="loss", title="training on the emulated cluster (200mbit)")
    a2.set(xlabel="step", ylabel="seconds per step", title="step time (emulated)")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / "results"
                                        / "cluster"))
    a = p.parse_args(argv)
    d = Path(a.dir)
    for name, fn in (("a2a", a2a), ("moe", moe), ("train", train)):
        lines = fn(d)
        if lines:
            (d / f"{name}_summary.txt").write_text("\n".join(lines) + "\n")
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
