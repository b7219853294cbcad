"""All-to-all time: calibrated resource model vs ``piper_comm.bench`` (issue 6, point 7).

    PIPER_LOCAL_SIZE=2 mpirun -n 4 python -m piper_moe.calibrate --out /tmp/cal4.yaml
    mpirun -genv PIPER_LOCAL_SIZE k -n N python -m piper_comm.bench --op alltoall \
        -b $((N*1024)) -e $((N*1048576)) -f 4 -n 10 -w 3 --algos halo,flat \
        --json /tmp/a2a/npN_lsk.json            # and again into /tmp/a2a_rep/ (run-to-run noise)
    python bench/a2a_validation.py --platform /tmp/cal4.yaml /tmp/a2a/np*_ls*.json \
        --repeat /tmp/a2a_rep/np*_ls*.json

The bench's size is the bytes one rank sends in total (all N blocks), i.e. ``m`` of
``piper_moe.model.comm.a2a_flat/a2a_halo`` (block per peer = m / N); its time is the per-rank mean
over the timed iterations, max over ranks. Predictions use the calibrated platform as written by
``piper_moe.calibrate`` ("model"). As a diagnostic only, a second prediction ("refit") uses
alpha/beta fitted with ``piper_moe.calibrate.fit_a2a`` to the bench's own (4, 2) rows (in-sample
for (4, 2), out-of-sample for the 8-rank runs). Writes bench/results/a2a_validation.{md,json};
the raw bench rows and the calibrated numbers are copied into the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
from pathlib import Path

import yaml

from piper_moe.calibrate import fit_a2a
from piper_moe.model.comm import all_to_all
from piper_moe.model.spec import LinkSpec, load_platform

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:g} {unit}"
    return f"{b:g} B"


def _median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _finite(x):
    """``x`` with non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        meta = d["meta"]
        sizes = set(meta["node_sizes"])
        if len(sizes) != 1:
            raise SystemExit(f"{p}: uneven node sizes {meta['node_sizes']}")
        runs.append({"path": p, "n": meta["ranks"], "g": sizes.pop(), "meta": meta,
                     "rows": d["rows"]})
    return sorted(runs, key=lambda r: (r["n"], -r["g"]))


def _refit_platform(platform, runs):
    """Platform with alpha/beta fitted to the bench rows of the first run (diagnostic)."""
    ref = runs[0]
    points = [{"algorithm": r["algo"], "block": r["size"] / ref["n"],
               "seconds": r["time_us"] * 1e-6} for r in ref["rows"]]
    fit = fit_a2a(points, ref["n"], ref["g"], platform.copy_bandwidth)
    links = {}
    for level in ("intra", "inter"):
        old = getattr(platform, level)
        bw = fit.get(f"bandwidth_{level}", old.bandwidth)
        if bw == float("inf"):
            bw = old.bandwidth
        links[level] = LinkSpec(latency=fit.get(f"latency_{level}", old.latency), bandwidth=bw)
    return dataclasses.replace(platform, **links), fit, (ref["n"], ref["g"])


def _findings(rows, summary, cal_fit, cal_key) -> list[str]:
    """Prose read off the numbers (the causal parts are labelled as such)."""
    model = [x["median_abs_error_pct"] for x in summary]
    noise = [x["repeat_median_abs_diff_pct"] for x in summary
             if x["repeat_median_abs_diff_pct"] is not None]
    ratios = [r["calibrate_measured_us"] / r["measured_us"] for r in rows
              if r["calibrate_measured_us"] and r["algo"] == "halo"]
    out = [
        f"- **The calibrated model misses by far more than the 15% target**: median |error| "
        f"{min(model):.0f}% to {max(model):.0f}% per (N, k, algo), always over-predicting. The "
        f"calibration fit put {cal_fit.get('latency_intra', 0) * 1e6:.0f} us into the intra "
        f"latency (alpha_intra) and 0 into alpha_inter, with an unresolved (infinite) intra "
        f"bandwidth, so the base platform's intra bandwidth was kept. The reason is in calibrate's "
        f"own timings at (N, k) = {cal_key}: its HALO times are "
        + (f"{min(ratios):.1f}x to {max(ratios):.1f}x" if ratios else "several times")
        + " the bench's HALO times at the same sizes (flat agrees better), and with rows flat "
        "[1, b, 2, 2b] and HALO [1, 2b, 1, 2b] (4 ranks, 2 nodes) the least-squares fit can only "
        "make HALO slow and flat fast by clamping alpha_inter to 0 and inflating alpha_intra, "
        "which then over-predicts both algorithms everywhere.",
        "- Calibration is not reproducible on this host either: two more runs of the same "
        "command gave alpha_intra 5.5 ms and (with OMP_NUM_THREADS=1) 3.1 ms, copy bandwidth "
        "5.5 and 9.2 GB/s instead of 14.6 GB/s. Why calibrate's HALO timings are slower than the "
        "bench's was not established; a candidate (unverified) is that calibrate calls "
        "`comm.all_to_all(send)` without `recv=` (allocating per call) and times each call "
        "after a barrier (median), while the bench passes a preallocated `recv` (mean).",
        f"- **Noise floor**: repeating every bench run gives a median run-to-run difference of "
        f"{min(noise):.0f}% to {max(noise):.0f}% per (N, k, algo), already above the 15% target: "
        "with 4 to 8 ranks on 2 cores, timings depend on the OS scheduler."
        if noise else "- No repeat runs given: run-to-run noise not measured.",
        "- **Even the best alpha-beta fit does not transfer across rank counts here.** Fitted to "
        "the bench's own (4, 2) rows (refit column), the model is within noise in-sample "
        "(24-29% median) and on (8, 4), but under-predicts (8, 2) by about 60%: its per-message "
        "cost (~0.7 ms) is not a link latency but the cost of a 2x oversubscribed collective, and "
        "at 8 ranks on 2 cores (4x oversubscribed) every message costs more whatever its link "
        "level. The intra/inter split is emulated (both are shared memory), so the two link "
        "levels the model distinguishes do not exist physically on this host.",
        "- Conclusion: on this 2-core host the all-to-all part of point 7 is **not validated** "
        "(the 15% target is not met, and the measurements are too noisy to meet it). It needs a "
        "host with at least one core per rank, or real nodes, and a calibration whose timing "
        "method matches the bench's.",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", nargs="+", help="piper_comm.bench --json files")
    ap.add_argument("--platform", required=True, help="platform YAML from piper_moe.calibrate")
    ap.add_argument("--repeat", nargs="*", default=[],
                    help="a second set of bench JSONs (same N, k, sizes): run-to-run noise")
    ap.add_argument("--out", default=str(RESULTS / "a2a_validation"), help="output stem")
    args = ap.parse_args(argv)

    platform = load_platform(args.platform)
    with open(args.platform, encoding="utf-8") as f:
        cal_raw = yaml.safe_load(f).get("calibrated", {})
    runs = _load_runs(args.bench_json)
    refit, refit_fit, refit_from = _refit_platform(platform, runs)
    repeat = {(run["n"], run["g"], r["algo"], r["size"]): r["time_us"]
              for run in _load_runs(args.repeat) for r in run["rows"]}
    cal_fit = cal_raw.get("a2a_fit") or {}
    cal_key = (cal_fit.get("ranks"), cal_fit.get("ranks_per_node"))
    cal_meas = {(p["algorithm"], p["block"]): p["seconds"] * 1e6 for p in cal_raw.get("a2a") or []}

    rows = []
    for run in runs:
        n, g = run["n"], run["g"]
        for r in run["rows"]:
            m = r["size"]
            meas = r["time_us"]
            pred = all_to_all(m, n, g, platform, r["algo"]) * 1e6
            pred_refit = all_to_all(m, n, g, refit, r["algo"]) * 1e6
            rows.append({"n": n, "g": g, "algo": r["algo"], "bytes_per_rank": m,
                         "bytes_per_peer": m / n, "measured_us": meas, "predicted_us": pred,
                         "error_pct": 100 * (pred - meas) / meas,
                         "refit_us": pred_refit,
                         "refit_error_pct": 100 * (pred_refit - meas) / meas,
                         "repeat_us": repeat.get((n, g, r["algo"], m)),
                         "calibrate_measured_us": cal_meas.get((r["algo"], m // n))
                         if (n, g) == cal_key else None})

    groups = {}
    for r in rows:
        groups.setdefault((r["n"], r["g"], r["algo"]), []).append(r)
    summary = [{"n": n, "g": g, "algo": a,
                "median_abs_error_pct": statistics.median(abs(x["error_pct"]) for x in rs),
                "max_abs_error_pct": max(abs(x["error_pct"]) for x in rs),
                "refit_median_abs_error_pct": statistics.median(abs(x["refit_error_pct"])
                                                                for x in rs),
                "repeat_median_abs_diff_pct": _median_or_none(
                    [abs(100 * (x["repeat_us"] - x["measured_us"]) / x["measured_us"])
                     for x in rs if x["repeat_us"]])}
               for (n, g, a), rs in groups.items()]

    meta0 = runs[0]["meta"]
    out = {"platform_file": args.platform,
           "platform": {"intra": dataclasses.asdict(platform.intra),
                        "inter": dataclasses.asdict(platform.inter),
                        "copy_bandwidth": platform.copy_bandwidth},
           "calibrated": {"a2a_fit": cal_raw.get("a2a_fit"), "a2a": cal_raw.get("a2a")},
           "refit": {"from": {"n": refit_from[0], "g": refit_from[1]}, "fit": refit_fit},
           "host": {"host": meta0.get("host"), "cpu": meta0.get("cpu"), "mpi": meta0.get("mpi"),
                    "git": meta0.get("git")},
           "summary": summary, "rows": rows,
           "bench": [{"path": r["path"], "meta": r["meta"], "rows": r["rows"]} for r in runs]}
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(
        json.dumps(_finite(out), indent=1, default=float, allow_nan=False) + "\n",
        encoding="utf-8")

    def us(x: float) -> str:
        return f"{x:.0f}" if x >= 10 else f"{x:.2f}"

    lines = ["| N | k | algo | bytes/peer | bytes/rank | measured us | predicted us | error | "
             "refit us | refit error | repeat us | calibrate's own us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['g']} | {r['algo']} | {_fmt_bytes(r['bytes_per_peer'])} | "
                     f"{_fmt_bytes(r['bytes_per_rank'])} | {us(r['measured_us'])} | "
                     f"{us(r['predicted_us'])} | {r['error_pct']:+.0f}% | {us(r['refit_us'])} | "
                     f"{r['refit_error_pct']:+.0f}% | "
                     f"{us(r['repeat_us']) if r['repeat_us'] else '-'} | "
                     f"{us(r['calibrate_measured_us']) if r['calibrate_measured_us'] else '-'} |")
    slines = ["| N | k | algo | median abs error (model) | max abs error (model) | "
              "median abs error (refit) | median run-to-run diff |",
              "|---|---|---|---|---|---|---|"]
    for s in summary:
        slines.append(f"| {s['n']} | {s['g']} | {s['algo']} | {s['median_abs_error_pct']:.0f}% | "
                      f"{s['max_abs_error_pct']:.0f}% | {s['refit_median_abs_error_pct']:.0f}% | "
                      f"{_pct(s['repeat_median_abs_diff_pct'])} |")
    pi, pe = platform.intra, platform.inter
    fi = refit_fit
    text = "\n".join([
        "# All-to-all time: calibrated model vs piper_comm.bench",
        "",
        f"Produced by `.venv/bin/python bench/a2a_validation.py --platform {args.platform} "
        + " ".join(r["path"] for r in runs)
        + (" --repeat " + " ".join(args.repeat) if args.repeat else "")
        + "`; the commands that made the inputs are in the script's docstring. Host `"
        + str(meta0.get("host")) + "` (" + str(meta0.get("cpu"))
        + f", **{os.cpu_count()} cores** when this script ran), " + str(meta0.get("mpi"))
        + ", git " + str(meta0.get("git"))[:10] + ".",
        "",
        "**Setting.** Every run is on one VM with 2 cores (`nproc`), so N ranks share 2 "
        "cores: 4 ranks are 2x "
        "oversubscribed, 8 ranks 4x. The \"nodes\" are emulated with `PIPER_LOCAL_SIZE=k` "
        "(k ranks per node): intra- and inter-node traffic both go through shared memory, so the "
        "two link levels differ only in which code path (HALO phase) moves the bytes, not in "
        "hardware. Times are the bench's (per-rank mean of 10 iterations after 3 warm-up, max "
        "over ranks). bytes/rank = the bench's size (`m` of `a2a_flat/a2a_halo`), bytes/peer = "
        "m / N.",
        "",
        f"**Model** = `piper_moe.model.comm.a2a_flat/a2a_halo` with the platform written once by "
        f"`PIPER_LOCAL_SIZE=2 mpirun -n 4 python -m piper_moe.calibrate` (4 ranks, 2 per node): "
        f"intra alpha {pi.latency * 1e6:.0f} us, beta {pi.bandwidth / 1e9:.3g} GB/s; inter alpha "
        f"{pe.latency * 1e6:.0f} us, beta {pe.bandwidth / 1e9:.3g} GB/s; copy "
        f"{platform.copy_bandwidth / 1e9:.3g} GB/s. "
        f"**Refit** (diagnostic, not a validation) = the same formulas with alpha/beta fitted by "
        f"`calibrate.fit_a2a` to the bench's own (N={refit_from[0]}, k={refit_from[1]}) rows: "
        f"intra alpha {fi.get('latency_intra', 0) * 1e6:.0f} us, beta "
        f"{fi.get('bandwidth_intra', 0) / 1e9:.3g} GB/s; inter alpha "
        f"{fi.get('latency_inter', 0) * 1e6:.0f} us, beta "
        f"{fi.get('bandwidth_inter', 0) / 1e9:.3g} GB/s.",
        "",
        "## Summary (target: 15%)",
        "",
        *slines,
        "",
        "## Findings",
        "",
        *_findings(rows, summary, cal_fit, cal_key),
        "",
        "## Rows",
        "",
        *lines,
        "",
    ])
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
