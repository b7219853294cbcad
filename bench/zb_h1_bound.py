"""Why Piper's ZB-H1 bounds each rank by its own 1F1B count (runtime/schedules.py): measures the
per-rank peak memory of the pp2 zb-h1 validation case (bench/model_validation.py) under the
runtime's bound (pp - r micro-batches without their W) and under the ZB paper's looser one
(pp on every rank, which reaches the paper's (p-1)(F+B-W) bubble), next to 1F1B.

    .venv/bin/python bench/zb_h1_bound.py   # ~30 s, 2 ranks; bench/results/zb_h1_bound.txt

The paper's variant is built by editing the bound in a copy of the schedule builder, inside each
worker (it is not a runtime option).
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import model_validation as MV  # noqa: E402

MIB = 2**20
RUNTIME = 'held[r] >= pp - r'
PAPER = 'held[r] >= pp'


def _patch_paper_bound() -> None:
    """Replaces schedules._zb_h1_all by a copy whose memory bound is pp on every rank."""
    from piper_moe.runtime import schedules

    src = inspect.getsource(schedules._zb_h1_all)
    assert RUNTIME in src, "the schedule builder changed: update this experiment"
    ns = dict(vars(schedules))
    exec(compile(src.replace(RUNTIME, PAPER), schedules.__file__, "exec"), ns)
    schedules._zb_h1_all = ns["_zb_h1_all"]


def worker(case_index: int, paper: bool, out_dir: str) -> None:
    import torch

    from piper_moe.train.launch import launch

    launch()
    if paper:
        _patch_paper_bound()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        res = MV._measure_trainer(MV.case_config(MV.CASES[case_index], tmp), 3)
    Path(out_dir, f"rank{res['rank']}.json").write_text(json.dumps(res))


def run(case_index: int, paper: bool) -> list[dict]:
    case = MV.CASES[case_index]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [MV.MPIRUN, "-genv", "PIPER_LOCAL_SIZE", str(case.local_size), "-genv",
               "OMP_NUM_THREADS", "1", "-n", str(case.ranks), sys.executable, __file__,
               "--worker", str(case_index), "--out-dir", tmp] + (["--paper"] if paper else [])
        subprocess.run(cmd, check=True, timeout=600, cwd=ROOT)
        return sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")),
                      key=lambda r: r["rank"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--paper", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "zb_h1_bound.txt"))
    a = ap.parse_args(argv)
    if a.worker is not None:
        worker(a.worker, a.paper, a.out_dir)
        return 0
    names = [c.name for c in MV.CASES]
    zb, f1 = names.index("pp2 zb-h1 m=4 b4 s128 (2 ranks)"), names.index(
        "pp2 1f1b m=4 b4 s128 (2 ranks)")
    rows = [("1f1b", run(f1, False)), ("zb-h1, Piper's bound (pp - r)", run(zb, False)),
            ("zb-h1, the paper's bound (pp)", run(zb, True))]
    lines = ["# " + " ".join(__doc__.split("\n\n")[0].split()),
             f"# date -u {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  git "
             + subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT).stdout.strip(),
             "# case: tiny-moe, pp=2, 4 micro-batches of 4 x 128 tokens, fp32; live tensor bytes "
             "(profiler, as bench/model_validation.py)",
             f"# {'schedule':<32} {'stage 0 peak MiB':>17} {'stage 1 peak MiB':>17}"]
    for label, ranks in rows:
        peaks = {r["pp_rank"]: r["peak"] / MIB for r in ranks}
        lines.append(f"  {label:<32} {peaks[0]:17.2f} {peaks[1]:17.2f}")
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
