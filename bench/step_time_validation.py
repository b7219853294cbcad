"""CPU step time: the resource model's prediction against measured training steps, the host
calibrated under the same launch as each run.

    python bench/step_time_validation.py [--steps 30] [--out bench/results/step_time_validation]

For each case (ranks N, nodes of k, strategy, precision), on an otherwise idle host:
1. `mpirun -genv PIPER_LOCAL_SIZE k -genv OMP_NUM_THREADS 1 -n N python -m piper_moe.cli.calibrate
   --model tiny-moe --micro-batch 4 --seq-len 64 --out <out>_raw/cal_<case>.yaml` (ranks that
   share cores measure together, so what each gets is in the file);
2. `python -m piper_moe.train` (same launch) on the demo's config (configs/train/tiny.yaml:
   tiny-moe, 4 x 64 tokens per micro-batch, 32 sequences per step) with that platform, the
   case's strategy and precision, `--steps` steps; its metrics.json reports the measured
   seconds per step (the median over the steps) and the model's prediction;
3. the prediction's parts (resource_model.estimate with the same platform), and the prediction
   with the shipped, uncalibrated cpu-host.
Writes <out>.md (table and parts) and <out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from launchers import MPIRUN

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from piper_moe.resource_model import Strategy, estimate, load_model, load_platform  # noqa: E402
from piper_moe.resource_model.estimate import TIME_KEYS  # noqa: E402

# (name, ranks, ranks per node, strategy, precision)
CASES = [
    ("1 rank fp32", 1, 1, {"pp": 1, "dp": 1, "ep": 1}, "fp32"),
    ("1 rank bf16-mixed", 1, 1, {"pp": 1, "dp": 1, "ep": 1}, "bf16-mixed"),
    ("2 ranks EP=DP=2 fp32", 2, 2, {"pp": 1, "dp": 2, "ep": 2}, "fp32"),
    ("2 ranks PP=2 fp32", 2, 2, {"pp": 2, "dp": 1, "ep": 1}, "fp32"),
    ("demo: 4 ranks PP=2 x EP=DP=2 fp32", 4, 2, {"pp": 2, "dp": 2, "ep": 2}, "fp32"),
    ("demo: 4 ranks PP=2 x EP=DP=2 bf16-mixed", 4, 2, {"pp": 2, "dp": 2, "ep": 2}, "bf16-mixed"),
]
DEMO = ROOT / "piper_moe/configs/train/tiny.yaml"  # the demo's config: model, batch
BATCH = yaml.safe_load(DEMO.read_text())["batch"]


def _launch(ranks: int, local: int) -> list[str]:
    return [MPIRUN, "-genv", "PIPER_LOCAL_SIZE", str(local), "-genv", "OMP_NUM_THREADS", "1",
            "-n", str(ranks), sys.executable, "-m"]


def run_case(name: str, ranks: int, local: int, strategy: dict, precision: str, steps: int,
             raw: Path) -> dict:
    tag = name.split(":")[0].replace(" ", "_").replace("=", "")
    cal = raw / f"cal_{tag}_{precision}.yaml"
    cmd_cal = [*_launch(ranks, local), "piper_moe.cli.calibrate", "--model", "tiny-moe",
               "--micro-batch", str(BATCH["micro_batch"]), "--seq-len", str(BATCH["seq_len"]),
               "--out", str(cal)]
    subprocess.run(cmd_cal, check=True, cwd=ROOT, timeout=900, capture_output=True)
    cfg = yaml.safe_load(DEMO.read_text())
    where = cal.relative_to(ROOT) if cal.is_relative_to(ROOT) else cal  # runs in ROOT
    cfg.update(platform=str(where), steps=steps, strategy={**strategy, "schedule": "1f1b"},
               checkpoint={"dir": None})
    cfg_path = raw / f"train_{tag}_{precision}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = Path(tempfile.mkdtemp(prefix="piper-step-time-"))  # the run's metrics.json
    cmd_train = [*_launch(ranks, local), "piper_moe.train", "--config", str(cfg_path),
                 "--precision", precision, "--quiet", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd_train, check=True, cwd=ROOT, timeout=1800, capture_output=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / "metrics.json").read_text())["report"]
    model = load_model("tiny-moe")
    s = Strategy(dp=strategy["dp"], tp=1, pp=strategy["pp"], ep=strategy["ep"],
                 micro_batch=BATCH["micro_batch"], global_batch=BATCH["global_batch"],
                 seq_len=BATCH["seq_len"],
                 precision=precision, schedule="1f1b")
    plat = load_platform(str(cal))
    calibrated = estimate(model, plat, s)
    shipped = estimate(model, load_platform("cpu-host"), s)
    # the model before its host terms: no per-operation cost, attention on the GEMM curve
    before = estimate(model, dataclasses.replace(
        plat, op_overhead=0.0, attention_flops=None, attention_backward=2.0,
        attention_flops_fp32=None, attention_backward_fp32=None), s)
    measured = report["measured"]["step_s"]
    return {"case": name, "ranks": ranks, "ranks_per_node": local, "strategy": strategy,
            "precision": precision, "measured_s": measured,
            "predicted_s": report["predicted"]["step_s"],
            "parts_s": {k: calibrated.time[k] for k in TIME_KEYS},
            "cpu_host_predicted_s": shipped.time["step"],
            "without_host_terms_s": before.time["step"], "train_wall_s": wall,
            "commands": [" ".join(cmd_cal), " ".join(cmd_train)]}


def write_md(rows: list[dict], path: Path, header: str) -> None:
    lines = [header, "", "| case | measured s/step | predicted (calibrated) | ratio | "
             "without the host terms (ratio) | predicted (cpu-host) | parts of the calibrated "
             "prediction, ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in r["parts_s"].items() if v > 0)
        lines.append(f"| {r['case']} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | "
                     f"{r['measured_s'] / r['predicted_s']:.2f} | "
                     f"{r['without_host_terms_s']:.3f} "
                     f"({r['measured_s'] / r['without_host_terms_s']:.2f}) | "
                     f"{r['cpu_host_predicted_s']:.3f} | {parts} |")
    lines += ["", "ratio = measured / predicted (1.00: exact; above 1: the model is fast). "
              "Without the host terms: the same calibrated platform with op_overhead 0 and the "
              "attention core on the GEMM curve with a backward of 2x (the model before "
              "resource_model/ops.py).",
              "Commands per case: " + "; ".join(rows[0]["commands"]) + " (and likewise)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench/results/step_time_validation"))
    ap.add_argument("--cases", default=None, help="comma-separated case indices (default all)")
    a = ap.parse_args()
    out = Path(a.out)
    raw = out.parent / (out.name + "_raw")
    raw.mkdir(parents=True, exist_ok=True)
    picked = [CASES[int(i)] for i in a.cases.split(",")] if a.cases else CASES
    rows = []
    for case in picked:
        print(f"step_time_validation: {case[0]} ...", flush=True)
        rows.append(run_case(*case, a.steps, raw))
        r = rows[-1]
        print(f"  measured {r['measured_s']:.3f} s/step, predicted {r['predicted_s']:.3f} "
              f"({r['measured_s'] / r['predicted_s']:.2f}x)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    header = (f"# CPU step time: measured vs the resource model\n\n`python bench/"
              f"step_time_validation.py --steps {a.steps}`, {when} UTC, commit {commit}, host "
              f"{platform.node()} ({os.cpu_count()} cores), tiny-moe, {a.steps} steps per case.")
    write_md(rows, out.with_suffix(".md"), header)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"step_time_validation: wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
