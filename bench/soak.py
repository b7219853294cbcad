"""Soak: many random all_to_all(v) calls, every received byte compared with a reference.

    python bench/soak.py --calls 10000 --seed 0 --out bench/results/soak.md
    python bench/soak.py --calls 200                                     # a quick look

The calls are shared among mpirun jobs of different node splits (JOBS: 1 to 8 ranks, nodes of
1 to 8 ranks, uneven and interleaved ones). Call c draws, from (seed, c) alone and so the same
on every rank: a P x P count matrix (random with zeros, one rank receiving everything, one rank
silent, a single pair, equal, empty, or large), a numpy dtype (bool .. complex128), a trailing
shape, an algorithm (halo, flat, pairwise, auto) and whether recv is given (with a canary
tail); recv_counts are given on odd calls; half the equal and empty matrices go through
all_to_all (the equal split, checked in-band) instead of all_to_all_v. The data of each block
is a pure function of (seed, call, source, destination), so each rank checks what it received,
bitwise, without talking to the others (tests/comm/cases.py check_exchange: payload, counts,
shape, the canary, recv used in place, the algorithm run). A mismatch is a (call, rank) whose
check failed.

Rank 0 of the running job prints a progress line every --progress calls; the tool prints one
line per job and a table at the end, and exits non-zero on any mismatch, error or hang.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import MPIRUN, ROOT, provenance, run_job

# Node of each rank, one job each; the calls are shared equally.
JOBS = [[0], [0, 1], [0, 0, 1],
        [0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 3], [0, 0, 0, 1], [0, 1, 0, 1],
        [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 1, 1, 2, 2, 2],
        [0] * 8]
ALGOS = ["halo", "flat", "pairwise", "auto"]
TRAILING = [(), (1,), (3,), (2, 5), (7,)]
PATTERNS = {"random": 0.35, "hot": 0.15, "silent": 0.1, "single": 0.1, "equal": 0.1,
            "empty": 0.05, "large": 0.15}


def draw(P: int, seed: int, call: int) -> dict:
    """Everything call `call` does, from (seed, call): identical on every rank."""
    import numpy as np

    from tests.comm.cases import NUMPY_DTYPES

    rng = np.random.default_rng([seed, call, 11])
    kind = str(rng.choice(list(PATTERNS), p=list(PATTERNS.values())))
    C = np.zeros((P, P), dtype=np.int64)
    if kind == "random":
        C = rng.integers(0, 9, size=(P, P)) * (rng.random((P, P)) >= rng.random() * 0.8)
    elif kind == "hot":  # one rank receives everything (some senders send nothing)
        C[:, rng.integers(P)] = rng.integers(0, 40, size=P)
    elif kind == "silent":  # one rank sends nothing
        C = rng.integers(0, 6, size=(P, P))
        C[rng.integers(P), :] = 0
    elif kind == "single":
        C[rng.integers(P), rng.integers(P)] = rng.integers(1, 50)
    elif kind == "equal":
        C[:] = rng.integers(0, 9)
    elif kind == "large":
        C = rng.integers(0, 3000, size=(P, P)) * (rng.random((P, P)) >= 0.3)
    return {"counts": C, "pattern": kind, "dtype": str(rng.choice(NUMPY_DTYPES)),
            "trailing": TRAILING[rng.integers(len(TRAILING))],
            "algo": ALGOS[rng.integers(len(ALGOS))], "use_recv": bool(rng.random() < 0.5),
            "equal_split": kind in ("equal", "empty") and bool(rng.random() < 0.5)}


# -- rank side
def rank_side(a) -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # run_job, before killing a hang
    import piper_comm as pc
    from tests.comm.cases import check_exchange

    node_ids = [int(n) for n in a.nodes.split(",")]
    comm = pc.init(node_ids=node_ids, timeout=a.timeout)
    P, me = comm.size, comm.rank
    res = {"rank": me, "calls": 0, "mismatches": 0, "errors": 0, "messages": [],
           "coverage": Counter()}
    t0 = time.monotonic()
    for call in range(a.first, a.first + a.calls):
        d = draw(P, a.seed, call)
        try:
            check_exchange(comm, d["counts"], "numpy", d["dtype"], d["trailing"], d["algo"],
                           a.seed, call, use_recv=d["use_recv"], equal_split=d["equal_split"])
        except AssertionError as e:
            res["mismatches"] += 1
            if len(res["messages"]) < 5:
                res["messages"].append(f"mismatch: {e}")
        except pc.PiperError as e:
            res["errors"] += 1
            if len(res["messages"]) < 5:
                res["messages"].append(f"call {call}: {type(e).__name__}: {e}")
            if not isinstance(e, pc.PiperUsageError):  # the communicator is unusable now
                break
        res["calls"] += 1
        cov = res["coverage"]
        for key in (f"pattern {d['pattern']}", f"dtype {d['dtype']}",
                    f"algo {d['algo']}" + (f" ({comm.last_algorithm})" if d["algo"] == "auto"
                                            else ""),
                    f"recv {'given' if d['use_recv'] else 'allocated'}",
                    f"op {'all_to_all' if d['equal_split'] else 'all_to_all_v'}",
                    f"recv_counts {'given' if call % 2 else 'exchanged'}"):
            cov[key] += 1
        if me == 0 and (call + 1) % a.progress == 0:
            print(f"[soak] call {call + 1}/{a.total}: job of {P} ranks, nodes {a.nodes}, "
                  f"{res['calls']} calls in {time.monotonic() - t0:.1f} s, rank 0 "
                  f"mismatches {res['mismatches']}", flush=True)
    res["seconds"] = time.monotonic() - t0
    path = Path(a.dir) / f"rank{me}.json"
    path.with_suffix(".tmp").write_text(json.dumps(res))
    os.replace(path.with_suffix(".tmp"), path)
    comm.close()


# -- driver side
def run_jobs(a) -> list[dict]:
    picked = [int(j) for j in a.jobs.split(",")] if a.jobs else list(range(len(JOBS)))
    n = len(picked)
    shares = [a.calls // n + (1 if j < a.calls % n else 0) for j in range(n)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1",
           "OMP_NUM_THREADS": "1"}
    jobs, first = [], 0
    for j, (nodes, calls) in enumerate(zip([JOBS[i] for i in picked], shares)):
        if calls == 0:
            continue
        P, spec = len(nodes), ",".join(map(str, nodes))
        outdir = Path(tempfile.mkdtemp(prefix="piper-soak-"))
        cmd = [MPIRUN, "-n", str(P), sys.executable, str(Path(__file__).resolve()),
               "--rank-side", "--dir", str(outdir), "--nodes", spec, "--first", str(first),
               "--calls", str(calls), "--total", str(a.calls), "--seed", str(a.seed),
               "--timeout", str(a.timeout), "--progress", str(a.progress)]
        limit = a.job_timeout or 120 + a.per_call_limit * calls
        t0 = time.monotonic()
        code, _ = run_job(cmd, env, limit, log=sys.stdout)
        wall = time.monotonic() - t0
        ranks = [json.loads(f.read_text()) if (f := outdir / f"rank{r}.json").exists() else None
                 for r in range(P)]
        shutil.rmtree(outdir, ignore_errors=True)
        done = ranks[0]["calls"] if ranks[0] else 0
        job = {"nodes": nodes, "calls": calls, "done": done, "exit": code, "hang": code is None,
               "wall": wall, "missing": [r for r in range(P) if ranks[r] is None],
               "mismatches": sum(r["mismatches"] for r in ranks if r),
               "errors": sum(r["errors"] for r in ranks if r),
               "seconds": max((r["seconds"] for r in ranks if r), default=0.0),
               "messages": [m for r in ranks if r for m in r["messages"]][:5],
               "coverage": Counter(ranks[0]["coverage"]) if ranks[0] else Counter()}
        jobs.append(job)
        missing = f", no result from ranks {job['missing']}" if job["missing"] else ""
        print(f"job {j + 1}/{n}: {P} ranks, nodes {spec}: {done}/{calls} calls in "
              f"{job['seconds']:.1f} s ({done / max(job['seconds'], 1e-9):.1f} calls/s; "
              f"{wall:.1f} s with launch), {job['mismatches']} mismatches, {job['errors']} "
              f"errors{', HANG' if job['hang'] else ''}"
              f"{missing}, launcher exit {code}", flush=True)
        for m in job["messages"]:
            print(f"    {m[:300]}", flush=True)
        first += calls
    return jobs


def report(jobs: list[dict]) -> str:
    lines = ["| ranks | nodes | calls | mismatches | errors | hang | seconds | calls/s |",
             "|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        lines.append(f"| {len(j['nodes'])} | {','.join(map(str, j['nodes']))} | {j['done']} / "
                     f"{j['calls']} | {j['mismatches']} | {j['errors']} | "
                     f"{'yes' if j['hang'] else 'no'} | {j['seconds']:.1f} | "
                     f"{j['done'] / max(j['seconds'], 1e-9):.1f} |")
    done, secs = sum(j["done"] for j in jobs), sum(j["seconds"] for j in jobs)
    lines.append(f"| all | | {done} / {sum(j['calls'] for j in jobs)} | "
                 f"{sum(j['mismatches'] for j in jobs)} | {sum(j['errors'] for j in jobs)} | "
                 f"{sum(j['hang'] for j in jobs)} | {secs:.1f} | {done / max(secs, 1e-9):.1f} |")
    cov = sum((j["coverage"] for j in jobs), Counter())
    groups: dict[str, list[str]] = {}
    for key, n in sorted(cov.items()):
        head, _, rest = key.partition(" ")
        groups.setdefault(head, []).append(f"{rest} {n}")
    lines += ["", "Calls by kind:", ""] + [f"- {k}: {', '.join(v)}" for k, v in groups.items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=10000, help="calls in all (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="PIPER_TIMEOUT of the ranks")
    ap.add_argument("--progress", type=int, default=1000, help="calls between progress lines")
    ap.add_argument("--job-timeout", type=float, default=None,
                    help="outer limit per job, a hang beyond it (default 120 s + "
                         "--per-call-limit per call)")
    ap.add_argument("--per-call-limit", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default=None,
                    help="indices into JOBS to run, e.g. 2,10 (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default: none)")
    # rank side (under mpirun)
    ap.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_side:
        rank_side(a)
        return 0
    if a.jobs and not all(j.isdigit() and int(j) < len(JOBS) for j in a.jobs.split(",")):
        ap.error(f"--jobs: indices below {len(JOBS)}, comma-separated")
    jobs = [JOBS[int(j)] for j in a.jobs.split(",")] if a.jobs else JOBS
    print(f"soak: {a.calls} calls, seed {a.seed}, over {len(jobs)} jobs "
          f"(node splits {'; '.join(','.join(map(str, n)) for n in jobs)})", flush=True)
    jobs = run_jobs(a)
    text = report(jobs)
    print("\n" + text)
    bad = [m for j in jobs for m in j["messages"]]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            f"# Soak: {a.calls} random all_to_all(v) calls, seed {a.seed}\n\n"
            f"{provenance(sys.argv)}\n\n{text}\n\n"
            + ("First failures:\n\n" + "\n".join(f"- {m}" for m in bad) if bad
               else "Every call matched its reference bitwise on every rank.") + "\n")
        print(f"\nwritten to {a.out}")
    ok = all(j["mismatches"] == 0 and j["errors"] == 0 and not j["hang"] and not j["missing"]
             and j["done"] == j["calls"] for j in jobs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
