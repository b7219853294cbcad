"""The resource model's predictions for the recorded emulated-cluster runs, beside the
measurements: from the generic `cpu-host` platform and from the platform calibrated on the
emulated cluster (`python -m piper_moe.cli.calibrate` run through cluster.sh).

    python bench/cluster/predict.py [--dir bench/results/cluster] \\
        [--calibrated bench/results/cluster/platform_2x2_200mbit.yaml]

Both platforms are used with devices_per_node set to the calibration's 2 ranks per node
(calibrate keeps the base platform's 8), and for runs with k ranks per node with the node's
inter-node bandwidth shared by k. Three comparisons, written to predict_summary.txt:
  all-to-all  piper_comm.cost.predict_uniform (flat and halo; the model `auto` uses) against
              piper_comm.bench's time, 2 x 2 at 200mbit, the calibration's own layout;
  MoE layer   piper_moe.resource_model.dispatch_cost.a2a_time (dispatch + combine, x 2 for backward)
              of the
              plain all-to-all dispatcher against its exposed link time (capped - 10gbit run);
              the model prices every token copy, so node dedup's savings are not in it;
  training    piper_moe.resource_model.estimate's step time for the runs' strategy against the
              measured median step.
Every measured figure is EMULATED (netns + veth + tc tbf, no added latency, 2 CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _platforms(calibrated: str, per_node: int):
    from piper_moe.resource_model import load_platform

    out = {}
    for name in ("cpu-host", calibrated):
        p = load_platform(name)
        out[p.name] = dataclasses.replace(p, devices_per_node=per_node)
    return out


def _at(p, per_node: int):
    """Platform p for nodes of per_node ranks: the node's NIC shared by per_node devices."""
    inter = dataclasses.replace(p.inter, bandwidth=p.inter.bandwidth * p.devices_per_node
                                / per_node)
    return dataclasses.replace(p, devices_per_node=per_node, inter=inter)


def a2a_lines(d: Path, plats) -> list[str]:
    from piper_comm.cost import predict_uniform
    from piper_moe.resource_model.comm import cost_links

    path = d / "a2a_2x2_200mbit.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    t = {(r["algo"], r["size"]): r["time_us"] / 1e3 for r in rows}
    names = list(plats)
    out = ["#", "# all-to-all 2 x 2, 200mbit: measured ms / predicted ms (ratio = measured / "
           "predicted)",
           f"# {'size/rank':>10} {'algo':>5} {'measured':>9} "
           + " ".join(f"{n[:22]:>22} {'ratio':>6}" for n in names)]
    for size in sorted({r["size"] for r in rows}):
        for algo in ("flat", "halo"):
            if (algo, size) not in t:
                continue
            cells = []
            for n in names:
                pred = 1e3 * predict_uniform(float(size), 4, 2, cost_links(plats[n]))[algo]
                cells.append(f"{pred:>22.3f} {t[algo, size] / pred:>6.2f}")
            out.append(f"  {size:>10} {algo:>5} {t[algo, size]:>9.3f} " + " ".join(cells))
    return out


def moe_lines(d: Path, plats) -> list[str]:
    from piper_moe.resource_model.dispatch_cost import a2a_time

    summ = d / "moe_summary.json"
    if not summ.exists():
        return []
    s = json.loads(summ.read_text())
    out = ["#", "# MoE layer, plain all-to-all dispatcher at 200mbit: exposed link time "
           "(capped - 10gbit) vs the model's dispatch + combine, forward and backward"]
    for key, by in s.items():
        if "200mbit" not in key or "exposed_ms" not in by.get("alltoall", {}):
            continue
        topk = int(re.search(r"top(\d+)", key).group(1))
        layout = key.split()[1]
        run = json.loads((d / f"moe_{layout}_200mbit_top{topk}_alltoall.json").read_text())
        T, h = run["tokens_per_rank"], run["config"]["hidden"]
        cells = []
        for n, p in plats.items():
            pred = 2 * 1e3 * a2a_time(T, topk, h, 4, run["nranks"], run["local_size"],
                                      _at(p, run["local_size"]), "flat")
            cells.append(f"{n}: {pred:.1f} ms (x{by['alltoall']['exposed_ms'] / pred:.2f})")
        out.append(f"#   top-{topk} {layout}: measured {by['alltoall']['exposed_ms']:.1f} ms; "
                   + "; ".join(cells))
    return out


def train_lines(d: Path, plats) -> list[str]:
    from piper_moe.resource_model import Strategy, estimate, load_model

    runs = sorted(glob.glob(str(d / "train_*_dedup_*.metrics.json")))
    if not runs:
        return []
    out = ["#", "# training, measured median step vs the model's step (estimate(); its a2a "
           "term prices every token copy, dedup or not)"]
    for path in runs:
        m = json.loads(Path(path).read_text())
        cfg, lay = m["config"], m["report"]["layout"]
        spec = load_model(str(ROOT / cfg["model"]) if cfg["model"].endswith(".yaml")
                          else cfg["model"])
        s = Strategy(dp=lay["dp"], tp=1, pp=lay["pp"], ep=lay["ep"], vpp=lay["vpp"],
                     micro_batch=cfg["batch"]["micro_batch"],
                     global_batch=cfg["batch"]["global_batch"], seq_len=cfg["batch"]["seq_len"],
                     zero=0, schedule=cfg["strategy"]["schedule"], precision="bf16-mixed")
        meas = m["report"]["measured"]["step_s"]
        cells = []
        for n, p in plats.items():
            e = estimate(spec, p, s)
            parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in e.time.items()
                              if k != "step" and v > 1e-5)
            cells.append(f"{n}: {e.time['step']:.3f} s (x{meas / e.time['step']:.1f}; ms: "
                         f"{parts})")
        out.append(f"#   {Path(path).name}: measured {meas:.3f} s/step")
        out += [f"#     {c}" for c in cells]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(ROOT / "bench" / "results" / "cluster"))
    p.add_argument("--calibrated", default=None,
                   help="platform YAML (default: <dir>/platform_2x2_200mbit.yaml)")
    a = p.parse_args(argv)
    d = Path(a.dir)
    plats = _platforms(a.calibrated or str(d / "platform_2x2_200mbit.yaml"), per_node=2)
    lines = ["# EMULATED measurements (netns + veth + tc tbf, no added latency, 2 CPUs) vs the "
             "resource model", "# platforms: " + ", ".join(plats)]
    lines += a2a_lines(d, plats) + moe_lines(d, plats) + train_lines(d, plats)
    (d / "predict_summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
