"""Stress run of the test suite: the whole suite N times in a row, every failure kept.

    python bench/stress.py --runs 10 --out /tmp/stress                   # in this checkout
    python bench/stress.py --runs 10 --fresh-clone                       # make test first

Each run is `pytest tests` (with --fresh-clone the first run is `make test` in a fresh clone of
HEAD, so that set-up is stressed too, and the next runs use that clone). Per run the tool keeps
the console log and a JUnit XML file in raw/ (not tracked by git); per failure, the whole
failure text (for multi-rank tests that is tests/launch.py's report: every rank's outcome, exit
status and the launcher's output) in failures/. At the end it prints, and writes to summary.md
and summary.json, one row per test that failed at least once: runs, failures, and the symptom
of each failure (a hang, a rank without result and its exit status, the exception), then the
totals of every run.

Run it on an idle machine: the suite's timing tests (deadlines of the fault cases) are sized for
a quiet 2-core host, and a benchmark or build beside it makes failures that say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Symptoms read from a failure's text, first match wins; `cause` is what the table prints.
SYMPTOMS = [
    (re.compile(r"\[launch\.py\] killed after the (\d+) s test timeout"),
     "hang: killed after {0} s"),
    (re.compile(r"rank (\d+): no result; exit: ([^\n]+)"), "rank {0} gave no result ({1})"),
    (re.compile(r"rank (\d+): no result"), "rank {0} gave no result"),
    (re.compile(r"Timeout >([\d.]+)s"), "pytest-timeout after {0} s"),
    (re.compile(r"rank (\d+): error after [\d.]+ s: (\w+(?:Error|Exception))"),
     "rank {0} raised {1}"),
    (re.compile(r"launcher exit code (-?\d+)"), "launcher exit code {0}"),
]


def symptom(text: str) -> str:
    for pattern, fmt in SYMPTOMS:
        m = pattern.search(text)
        if m:
            return fmt.format(*m.groups())
    first = next((line.strip() for line in text.splitlines() if line.strip().startswith("E ")),
                 text.strip().splitlines()[0] if text.strip() else "no message")
    return first[:120]


def parse_junit(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(counts of passed/failed/errors/skipped, [(test id, failure text)])."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if not path.exists():
        return counts, failures
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        kids = {child.tag: child for child in case}
        if "failure" in kids or "error" in kids:
            node = kids.get("failure", kids.get("error"))
            counts["failed" if "failure" in kids else "errors"] += 1
            failures.append((test, f"{node.get('message', '')}\n{node.text or ''}"))
        elif "skipped" in kids:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def run_once(k: int, cwd: Path, out: Path, make_test: bool, pytest_args: list[str]) -> dict:
    (out / "raw").mkdir(exist_ok=True)
    xml = out / "raw" / f"run{k:02d}.xml"
    log = out / "raw" / f"run{k:02d}.log"
    env = {**os.environ, "PYTEST_ADDOPTS": f"--junitxml={xml} -p no:cacheprovider"}
    if make_test:
        cmd = ["make", "test"]
    else:
        cmd = [str(cwd / ".venv/bin/python"), "-m", "pytest", "-q", "tests", *pytest_args]
    t0 = time.monotonic()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - t0
    counts, failures = parse_junit(xml)
    fail_dir = out / "failures"
    for test, text in failures:
        fail_dir.mkdir(exist_ok=True)
        safe = re.sub(r"[^\w.-]+", "_", test)[-150:]
        (fail_dir / f"run{k:02d}__{safe}.txt").write_text(text)
    return {"run": k, "command": " ".join(cmd), "exit_code": code, "seconds": round(elapsed, 1),
            **counts, "failures": [{"test": t, "symptom": symptom(x)} for t, x in failures]}


def report(runs: list[dict], tests_seen: int) -> str:
    per_test: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        for f in r["failures"]:
            per_test[f["test"]].append(f"run {r['run']}: {f['symptom']}")
    lines = [f"{len(runs)} runs, {sum(1 for r in runs if r['exit_code'] == 0)} passed; "
             f"{tests_seen} test ids per run", ""]
    if per_test:
        lines += ["| test | runs | failures | causes (symptom per failure) |", "|---|---|---|---|"]
        for test, what in sorted(per_test.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {test} | {len(runs)} | {len(what)} | {'; '.join(what)} |")
    else:
        lines.append(f"| every test | {len(runs)} | 0 | - |")
    lines += ["", "| run | command | exit | passed | failed | errors | skipped | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | `{r['command']}` | {r['exit_code']} | {r['passed']} | "
                     f"{r['failed']} | {r['errors']} | {r['skipped']} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="suite runs (default 10)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result folder (default bench/results/stress)")
    ap.add_argument("--fresh-clone", action="store_true",
                    help="clone HEAD into a temporary folder; run 1 is `make test` there")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()
    out = (args.out or ROOT / "bench/results/stress").resolve()
    out.mkdir(parents=True, exist_ok=True)
    cwd, clone = ROOT, None
    if args.fresh_clone:
        clone = Path(tempfile.mkdtemp(prefix="piper-stress-"))
        subprocess.check_call(["git", "clone", "-q", str(ROOT), str(clone / "piper")])
        cwd = clone / "piper"
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=cwd, text=True).strip()
    print(f"stress: {args.runs} runs of the suite in {cwd} at {commit[:12]}; results in {out}",
          flush=True)
    runs, tests_seen = [], 0
    try:
        for k in range(1, args.runs + 1):
            r = run_once(k, cwd, out, make_test=bool(clone) and k == 1,
                         pytest_args=args.pytest_args)
            runs.append(r)
            tests_seen = max(tests_seen, r["passed"] + r["failed"] + r["errors"] + r["skipped"])
            names = ", ".join(f["test"] for f in r["failures"]) or "-"
            print(f"run {k}/{args.runs}: exit {r['exit_code']}, {r['passed']} passed, "
                  f"{r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped in "
                  f"{r['seconds']:.0f} s; failed: {names}", flush=True)
            (out / "summary.json").write_text(json.dumps(
                {"commit": commit, "host": os.uname().nodename, "cores": os.cpu_count(),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": runs}, indent=1))
    finally:
        text = report(runs, tests_seen)
        (out / "summary.md").write_text(
            f"# Stress run of the suite\n\ncommit {commit}, {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d')}; command: `python bench/stress.py "
            f"{' '.join(sys.argv[1:])}`\n\n{text}\n")
        print(text)
        if clone:
            shutil.rmtree(clone, ignore_errors=True)
    return 0 if runs and all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
