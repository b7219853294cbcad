"""The demo's training run (`make demo`: tiny-moe, PP=2 x EP=2 on 4 CPU ranks as 2 emulated
nodes, 200 steps) in fp32, bf16-mixed and bf16-mixed + FP8 dispatch, one after the other on
an otherwise idle host; the loss curves side by side and the relative difference to fp32.

    python bench/precision_convergence.py [--steps 200] [--out bench/results/precision_convergence]

Writes <out>.md (table every 20 steps, the step-`steps` verdict: bf16-mixed within 1% of
fp32) and <out>.json (every step's loss and the run reports). Each run is
`mpirun -genv PIPER_LOCAL_SIZE 2 -genv OMP_NUM_THREADS 1 -n 4 python -m piper_moe.train
--config tiny --precision P [--fp8-dispatch] --quiet --out runs/precision/<name>`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from launchers import MPIRUN

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"fp32": ["--precision", "fp32"], "bf16-mixed": ["--precision", "bf16-mixed"],
        "bf16-mixed+fp8": ["--precision", "bf16-mixed", "--fp8-dispatch"]}
TARGET = 0.01  # the bound: bf16-mixed within 1% of fp32 at the last step


def run(name: str, extra: list[str], steps: int) -> dict:
    out = ROOT / "runs" / "precision" / name
    cmd = [MPIRUN, "-genv", "PIPER_LOCAL_SIZE", "2", "-genv", "OMP_NUM_THREADS",
           "1", "-n", "4", sys.executable, "-m", "piper_moe.train", "--config", "tiny",
           "--steps", str(steps), "--quiet", "--out", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=3600)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"command": " ".join(cmd[cmd.index("-m"):]), "wall_s": time.perf_counter() - t0,
            "loss": [h["loss"] for h in metrics["history"]],
            "step_s": metrics["report"]["measured"]["step_s"], "floor": metrics["floor"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision_convergence"))
    args = ap.parse_args()
    results = {name: run(name, extra, args.steps) for name, extra in RUNS.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    ref = results["fp32"]["loss"]
    lines = [
        "# The demo's loss in fp32, bf16-mixed and bf16-mixed + FP8 dispatch",
        "",
        f"`python bench/precision_convergence.py --steps {args.steps}`; each run: "
        "`mpirun -genv PIPER_LOCAL_SIZE 2 -genv OMP_NUM_THREADS 1 -n 4 python -m "
        "piper_moe.train --config tiny --precision P [--fp8-dispatch] --quiet` (PP=2 x EP=2, "
        "2 emulated nodes, tiny-moe, the demo's config; one run after the other).",
        f"Date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
        f"{commit}, host {platform.node()} ({os.cpu_count()} cores), load before "
        f"{os.getloadavg()[0]:.2f}.",
        "",
        "| step | fp32 | bf16-mixed | rel. diff | bf16-mixed + fp8 | rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    steps = len(ref)
    for i in [*range(19, steps, 20)] + ([steps - 1] if steps % 20 else []):
        row = [f"{i + 1}", f"{ref[i]:.4f}"]
        for name in ("bf16-mixed", "bf16-mixed+fp8"):
            v = results[name]["loss"][i]
            row += [f"{v:.4f}", f"{(v - ref[i]) / ref[i]:+.2%}"]
        lines.append("| " + " | ".join(row) + " |")
    last = {n: (r["loss"][-1] - ref[-1]) / ref[-1] for n, r in results.items()}
    ok = abs(last["bf16-mixed"]) <= TARGET
    lines += ["", f"At step {steps}: bf16-mixed {last['bf16-mixed']:+.2%} and bf16-mixed + "
              f"fp8 {last['bf16-mixed+fp8']:+.2%} relative to fp32 "
              f"({'within' if ok else 'OUTSIDE'} the 1% target); floor "
              f"{results['fp32']['floor']:.4f} nats/token. Median step time: "
              + ", ".join(f"{n} {r['step_s']:.3f} s" for n, r in results.items()) + "."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"commit": commit, "runs": results},
                                                   indent=1))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
