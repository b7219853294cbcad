"""Fault injection, measured: N trials per fault class, each one mpirun job, and a table.

    python bench/faults.py --trials 50 --ranks 4 --local-size 2 --out bench/results/faults.md
    python bench/faults.py --trials 2 --classes skip,kill          # a quick look

Fault classes (trial k: faulty rank k % P; algorithm halo, flat, pairwise in turn; the call is
all_to_all for trials 0-2, all_to_all_v for 3-5, and so on, except counts: all_to_all_v):

    skip    one rank skips call #2: every other rank must raise PiperTimeoutError naming the
            call ("all_to_all #2" / "all_to_all_v #2") and itself, within timeout + 5 s
    kill    one rank is SIGKILLed 20 ms into call 7 of a stream of 1 MiB-per-peer all-to-alls:
            every survivor must raise PiperPeerError or PiperTimeoutError within timeout + 5 s,
            or be ended by the launcher (counted apart: under -disable-auto-cleanup, with
            hydra's SIGUSR1 notice ignored, hydra leaves the survivors to Piper, except when
            its proxy reaps the killed rank before they raised: it then SIGKILLs them all)
    counts  all_to_all_v where one rank's recv_counts disagree with what a peer sends
    dtype   one rank sends float32, the others int32 (same row bytes)
    small   one rank passes a recv with one row too few
            (counts, dtype, small: PiperUsageError naming the call on every rank, then a
            correct call on the same communicator must deliver the right bytes)

Each trial runs `mpirun -n P python bench/faults.py --rank-side CLASS ...` under an outer
timeout (a hang: the ranks print their Python stacks, then the process group and every rank are
killed). Each rank writes rank<r>.json (error class, message, seconds from the fault to the
error). After the trial the tool counts the Piper segments (/dev/shm/piper-*) of the job's
processes left behind, and removes MPICH's segments of the job (left when ranks die or leave
without MPI_Finalize; each rank lists those it maps after init) as tests/launch.py does,
counting them apart. Trials with a hang, a wrong outcome, a leak or ranks ended by the launcher
are listed under the table with every rank's outcome and the launcher's output tail.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.launch import (  # noqa: E402
    MPIRUN,
    _descendants,
    _mapped_shm,
    describe_status,
    exit_statuses,
)

CLASSES = ["skip", "kill", "counts", "dtype", "small"]
ALGOS = ["halo", "flat", "pairwise"]
FAILING = {"skip": "skipped the call", "kill": "killed"}  # the faulty rank is not judged
USAGE_TEXT = {"counts": "count mismatch", "dtype": "disagree on dtype", "small": "recv has"}
SHM = Path("/dev/shm")


# -- rank side: one trial's fault, on every rank of the job
def _rank() -> int:
    return int(os.environ.get("PMI_RANK", 0))


def _wait_for(outdir: Path, ranks: list[int], limit: float) -> None:
    """Waits (bounded) until the given ranks have written their results: a rank that leaves
    without MPI finalisation may make the launcher end the job, and a rank still writing would
    lose its result."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all((outdir / f"rank{r}.json").exists() for r in ranks):
            return
        time.sleep(0.05)


def _op_call(comm, op: str, send, algo: str, recv=None):
    P = comm.size
    if op == "all_to_all":
        return comm.all_to_all(send, recv=recv, algorithm=algo)
    return comm.all_to_all_v(send, [send.shape[0] // P] * P, recv=recv, algorithm=algo)


def fault_skip(comm, a, outdir: Path) -> dict:
    """Rank `faulty` skips call #2; the others must time out."""
    import numpy as np

    import piper_comm as pc

    P, me = comm.size, comm.rank
    x = np.ones((P * 4, 2), dtype=np.float32)
    comm.all_to_all(x, algorithm=a.algo)  # call #1: every rank is in
    if me == a.faulty:  # stays alive, silent, until the others have raised (or gave up)
        _wait_for(outdir, [r for r in range(P) if r != me], a.timeout + 10)
        return {"role": "skipper", "hard_exit": 0}
    t0 = time.monotonic()
    try:
        _op_call(comm, a.op, x, a.algo)
    except pc.PiperError as e:
        took = time.monotonic() - t0
        try:  # the communicator must refuse further use instead of hanging
            comm.all_to_all(x)
            unusable = "no error"
        except pc.PiperError as again:
            unusable = "unusable" in str(again) or str(again)
        return {"role": "peer", "error": type(e).__name__, "msg": str(e), "took": took,
                "unusable_after": unusable, "hard_exit": 0,
                "wait_for": [r for r in range(P) if r != a.faulty]}
    return {"role": "peer", "error": None, "msg": "call #2 returned", "hard_exit": 0}


def fault_kill(comm, a, outdir: Path) -> dict:
    """Rank `faulty` is SIGKILLed 20 ms after it enters call 7 of a stream of 1 MiB-per-peer
    all-to-alls (some 2 ms each here: the kill lands around call 15-25, in any phase)."""
    import numpy as np

    import piper_comm as pc

    P, me = comm.size, comm.rank
    x = np.ones((P * (1 << 16), 4), dtype=np.float32)  # 1 MiB to each peer
    survivors = [r for r in range(P) if r != a.faulty]
    try:
        for i in range(100000):
            if i == 6 and me == a.faulty:  # every rank is in the loop by now
                (outdir / "kill_time").write_text(repr(time.monotonic() + 0.02))
                threading.Timer(0.02, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            _op_call(comm, a.op, x, a.algo)
    except (pc.PiperPeerError, pc.PiperTimeoutError) as e:
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
        f = outdir / "kill_time"
        took = now - float(f.read_text()) if f.exists() else None
        # Exit status 1 without MPI finalisation, as an application after an unhandled error
        # (see tests/comm/cases.py kill_midway: the job's status must not rest on hydra alone).
        return {"role": "survivor", "error": type(e).__name__, "msg": str(e), "took": took,
                "hard_exit": 1, "wait_for": survivors}
    return {"role": "survivor", "error": None, "msg": "the loop ended", "hard_exit": 1,
            "wait_for": survivors}


def fault_usage(comm, a, outdir: Path) -> dict:
    """Bad input on rank `faulty` (counts, dtype, small): PiperUsageError on every rank, then
    a correct all_to_all_v with random counts must deliver the right bytes."""
    import numpy as np

    import piper_comm as pc
    from tests.comm.cases import check_exchange, count_patterns

    P, me = comm.size, comm.rank
    bad = me == a.faulty
    ok = np.arange(P * 2 * 3, dtype=np.int32).reshape(P * 2, 3)
    comm.all_to_all(ok, algorithm=a.algo)  # call #1
    if a.rank_side == "counts":  # the faulty rank expects 3 rows from the next rank, not 2
        src = (a.faulty + 1) % P
        rc = [3 if bad and i == src else 2 for i in range(P)]
        call = functools.partial(comm.all_to_all_v, ok, [2] * P, recv_counts=rc,
                                 algorithm=a.algo)
    elif a.rank_side == "dtype":  # the faulty rank's rows are float32, the others' int32
        call = functools.partial(_op_call, comm, a.op, ok.view(np.float32) if bad else ok,
                                 a.algo)
    else:  # small: the faulty rank's recv has one row too few
        recv = np.empty((2 * P - (1 if bad else 0), 3), np.int32)
        call = functools.partial(_op_call, comm, a.op, ok, a.algo, recv=recv)
    t0 = time.monotonic()
    try:
        call()
        res = {"error": None, "msg": "call #2 returned"}
    except pc.PiperError as e:
        res = {"error": type(e).__name__, "msg": str(e), "took": time.monotonic() - t0}
    try:  # call #3: correct, random counts with zeros, recv given, checked bitwise
        check_exchange(comm, count_patterns(P, a.trial)["random"], "numpy", "float32", (3,),
                       a.algo, a.trial, 3, use_recv=True)
        res["usable_after"] = True
    except (AssertionError, pc.PiperError) as e:
        res["usable_after"] = f"{type(e).__name__}: {e}"
    return {"role": "faulty" if bad else "peer", **res}


FAULTS = {"skip": fault_skip, "kill": fault_kill, "counts": fault_usage, "dtype": fault_usage,
          "small": fault_usage}


def rank_side(a) -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # run_job, before killing a hang
    # Under -disable-auto-cleanup hydra's proxy tells the others of a rank's death with SIGUSR1
    # (whose default action kills them). Ignored, so that Piper's own detection is measured;
    # the proxy still SIGKILLs the rest when it reaps a rank that died of a signal (pmip.c:
    # WIFSIGNALED), which is what the launcher-ended count is.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    me = _rank()
    outdir = Path(a.dir)
    (outdir / f"pid{me}").write_text(str(os.getpid()))  # whose Piper segments are whose
    import piper_comm as pc

    comm = pc.init(local_size=a.local_size, timeout=a.timeout)
    # MPICH's segments of this job: the driver removes them if the trial leaves them behind
    mapped = {line.rsplit(" ", 1)[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    (outdir / f"shm{me}").write_text("\n".join(sorted(n for n in mapped if "/mpich_shm_" in n)))
    try:
        res = FAULTS[a.rank_side](comm, a, outdir)
    except BaseException as e:  # reported as a wrong outcome, never a silent exit
        res = {"role": "?", "error": type(e).__name__, "msg": f"unexpected: {e}",
               "hard_exit": 1}
    res["rank"] = me
    path = outdir / f"rank{me}.json"
    path.with_suffix(".tmp").write_text(json.dumps(res))
    os.replace(path.with_suffix(".tmp"), path)
    sys.stdout.flush()
    sys.stderr.flush()
    if "hard_exit" in res:  # after a failure: no collective teardown, no MPI finalisation
        _wait_for(outdir, res.get("wait_for", []), 15.0)
        os._exit(res["hard_exit"])
    comm.close()


# -- driver side
def _is_rank(pid: int) -> bool:
    try:
        return b"--rank-side" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pids: list[int], limit: float) -> None:
    """Waits (bounded) until the processes have ended (gone, or zombies: nothing mapped)."""
    deadline = time.monotonic() + limit
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            if stat[stat.rfind(")") + 2] in "ZX":
                break
            time.sleep(0.02)


def run_job(cmd: list[str], env: dict, timeout: float, log=None) -> tuple[int | None, str]:
    """Runs a launcher command in its own session under an outer timeout. Returns (exit code,
    output); exit code None when the timeout passed (a hang): the ranks (--rank-side) print
    their Python stacks, then the process group and every process below the launcher (ranks a
    launcher put in sessions of their own) are killed.
    log: a file to stream the output into instead of capturing it ("" returned)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, start_new_session=True,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        below = _descendants(proc.pid)
        ranks = [pid for pid in below if _is_rank(pid)]
        for pid in ranks:  # where each rank hangs: its Python stacks (faulthandler, SIGUSR2)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR2)
        if ranks:
            time.sleep(1.0)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _wait_gone(below, 10.0)  # their mappings too: the segment count must see them ended
        return None, out or ""


def provenance(argv: list[str]) -> str:
    """Command, date, commit (dirty when the tree has uncommitted changes) and host."""
    def git(*args: str) -> str:
        try:
            return subprocess.check_output(["git", *args], cwd=ROOT, text=True,
                                           stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "-uno") else ""
    try:
        mpi = subprocess.check_output([MPIRUN, "--version"], text=True).splitlines()
        mpi = next((line.split(":", 1)[1].strip() for line in mpi if "Version" in line), "?")
    except (OSError, subprocess.CalledProcessError):
        mpi = "?"
    u = os.uname()
    return (f"command: `python {' '.join(argv)}`  \n"
            f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  \n"
            f"commit: {git('rev-parse', 'HEAD')}{dirty}  \n"
            f"host: {u.nodename}, {os.cpu_count()} cores, {u.sysname} {u.release}, "
            f"Python {sys.version.split()[0]}, MPICH {mpi}")


def _piper_segments() -> set[str]:
    return {p.name for p in SHM.glob("piper-*")}


def _job_segments(names: set[str], pids: set[int]) -> set[str]:
    """Piper segments named after one of the job's processes ("piper-<token>-<pid>-n<node>")."""
    return {n for n in names if any(f"-{pid}-n" in n for pid in pids)}


def _remove_job_mpich_shm(names: set[str]) -> int:
    """MPICH's segments of a job stay in /dev/shm when a rank died or left without
    MPI_Finalize: removes those of the trial's job (as the ranks mapped them) that still exist
    and no live process maps (tests/launch.py removes every new one; a concurrent job's must
    survive here). Returns how many were removed."""
    in_use = _mapped_shm()
    removed = 0
    for name in names - in_use:
        with contextlib.suppress(OSError):
            Path(name).unlink()
            removed += 1
    return removed


def judge(cls: str, res: dict | None, a, trial: dict) -> tuple[str, str]:
    """One rank's outcome: ("right" | "launcher" | "wrong" | "n/a", why)."""
    r = res["rank"] if res else None
    if res is None:
        return ("launcher" if cls == "kill" else "wrong"), "no result (ended by the launcher)"
    err, msg, took = res.get("error"), res.get("msg", ""), res.get("took")
    limit = a.timeout + 5
    if cls in FAILING:
        wanted = ["PiperTimeoutError"] + (["PiperPeerError"] if cls == "kill" else [])
        if err not in wanted:
            return "wrong", f"{err}: {msg}"
        number = "2" if cls == "skip" else r"\d+"
        missing = [what for what, pattern in (
            ("the call", rf"\b{trial['op']} #{number}\b"), (f"rank {r}", rf"\brank {r}\b"))
            if not re.search(pattern, msg)]
        if missing:
            return "wrong", f"message does not name {', '.join(missing)}: {msg}"
        if cls == "skip" and res.get("unusable_after") is not True:
            return "wrong", f"communicator still usable after the timeout: {res['unusable_after']}"
        if cls == "kill" and took is None:
            return "wrong", f"raised before the kill was armed: {msg}"
    else:
        want = f"{trial['op']} #2"
        if err != "PiperUsageError":
            return "wrong", f"{err}: {msg}"
        if want not in msg or USAGE_TEXT[cls] not in msg:
            return "wrong", f"message does not name {want!r} and {USAGE_TEXT[cls]!r}: {msg}"
        if res.get("usable_after") is not True:
            return "wrong", f"the next correct call failed: {res['usable_after']}"
    if took is not None and took > limit:
        return "wrong", f"raised after {took:.1f} s (limit {limit:.0f} s)"
    return "right", ""


def lacks(msg: str, me: int) -> list[str]:
    """What a timeout or peer error's message does not name of the peers (a list, or another
    rank) and the bytes pending (the issue asks for op, call number, rank, peers and bytes)."""
    return [what for what, pattern in (("peers", rf"\[\d+(, \d+)*\]|\brank (?!{me}\b)\d+"),
                                       ("bytes", r"\b\d+ B\b")) if not re.search(pattern, msg)]


def run_trial(cls: str, k: int, a) -> dict:
    P = a.ranks
    trial = {"class": cls, "trial": k, "algo": ALGOS[k % len(ALGOS)], "faulty": k % P,
             "op": "all_to_all" if (k // len(ALGOS)) % 2 == 0 else "all_to_all_v"}
    if cls == "counts":  # recv_counts exist only there
        trial["op"] = "all_to_all_v"
    outdir = Path(tempfile.mkdtemp(prefix="piper-faults-"))
    piper_before = _piper_segments()
    # -disable-auto-cleanup only where a rank dies: there it leaves the survivors to Piper (as
    # far as hydra does); elsewhere it would make hydra signal SIGUSR1 to the ranks still
    # finalising when the first one exits (they die of it, and MPICH's segment stays).
    keep = cls == "kill" and not a.launcher_cleanup
    cmd = [MPIRUN, "-print-all-exitcodes", *(["-disable-auto-cleanup"] if keep else []),
           "-n", str(P), sys.executable, str(Path(__file__).resolve()), "--rank-side", cls,
           "--dir", str(outdir), "--trial", str(k), "--algo", trial["algo"],
           "--faulty", str(trial["faulty"]), "--op", trial["op"],
           "--local-size", str(a.local_size), "--timeout", str(a.timeout)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1",
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    code, out = run_job(cmd, env, a.job_timeout)
    wall = time.monotonic() - t0
    ranks = [json.loads(f.read_text()) if (f := outdir / f"rank{r}.json").exists() else None
             for r in range(P)]
    pids = {int(f.read_text()) for f in outdir.glob("pid*")}
    piper_left = _job_segments(_piper_segments() - piper_before, pids)
    mpich_removed = _remove_job_mpich_shm({n for f in outdir.glob("shm*")
                                           for n in f.read_text().split()})
    with contextlib.suppress(OSError):
        for f in outdir.iterdir():
            f.unlink()
        outdir.rmdir()
    verdicts = [judge(cls, ranks[r], a, trial) if not (cls in FAILING and r == trial["faulty"])
                else ("n/a", FAILING[cls]) for r in range(P)]
    st = exit_statuses(out)
    for r in range(P):  # a missing result is rank r's, whatever judge could see
        exit_r = describe_status(st[r]) if r < len(st) else "?"
        if ranks[r] is None and verdicts[r][0] != "n/a":
            verdicts[r] = (verdicts[r][0], f"no result; exit: {exit_r}")
        elif cls in USAGE_TEXT and verdicts[r][0] == "right" and (r >= len(st) or st[r]):
            verdicts[r] = ("wrong", f"raised the right error, then did not exit cleanly: "
                                    f"{exit_r}")
    usage_msgs = {ranks[r]["msg"] for r in range(P) if ranks[r] and cls in USAGE_TEXT}
    return {**trial, "hang": code is None, "exit": code, "wall": wall, "ranks": ranks,
            "verdicts": verdicts, "piper_left": sorted(piper_left),
            "mpich_removed": mpich_removed, "same_message": len(usage_msgs) <= 1,
            "output": out[-6000:]}


def expected(cls: str, P: int) -> int:
    return P - 1 if cls in ("skip", "kill") else P


def summary(cls: str, trials: list[dict], P: int) -> dict:
    tooks = [t["ranks"][r]["took"] for t in trials for r in range(P)
             if t["verdicts"][r][0] == "right" and t["ranks"][r].get("took") is not None]
    return {"class": cls, "trials": len(trials), "hangs": sum(t["hang"] for t in trials),
            "right": sum(v[0] == "right" for t in trials for v in t["verdicts"]),
            "expected": expected(cls, P) * len(trials),
            "median": statistics.median(tooks) if tooks else None,
            "max": max(tooks) if tooks else None,
            "piper_left": sum(len(t["piper_left"]) for t in trials),
            "mpich_removed": sum(t["mpich_removed"] for t in trials),
            "launcher": sum(v[0] == "launcher" for t in trials for v in t["verdicts"]),
            "lacking": Counter(what for t in trials for r in range(P)
                               if t["verdicts"][r][0] == "right" and cls in FAILING
                               for what in lacks(t["ranks"][r]["msg"], r)),
            "errors": Counter(res["error"] for t in trials for res in t["ranks"]
                              if res and res.get("error"))}


def table(rows: list[dict]) -> str:
    def s(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| class | trials | hangs | right error / expected ranks | median s to error | "
             "max s to error | Piper segments left | MPICH segments removed | "
             "launcher-ended ranks | errors raised (ranks) | of those right, messages not "
             "naming the peers / the bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['trials']} | {r['hangs']} | {r['right']} / "
                     f"{r['expected']} | {s(r['median'])} | {s(r['max'])} | {r['piper_left']} | "
                     f"{r['mpich_removed']} | {r['launcher']} | "
                     f"{', '.join(f'{k} {n}' for k, n in r['errors'].most_common()) or '-'} | "
                     + (f"{r['lacking']['peers']} / {r['lacking']['bytes']} |"
                        if r["class"] in FAILING else "- |"))
    return "\n".join(lines)


def anomalies(trials: list[dict]) -> list[str]:
    """Trials with a hang, a wrong rank outcome, a rank ended by the launcher, a leaked Piper
    segment or differing usage messages: every rank's outcome and the launcher's output tail."""
    out = []
    for t in trials:
        bad = [v for v in t["verdicts"] if v[0] in ("wrong", "launcher")]
        if not (t["hang"] or bad or t["piper_left"] or not t["same_message"]):
            continue
        out.append(f"### {t['class']} trial {t['trial']}: algo {t['algo']}, op {t['op']}, "
                   f"faulty rank {t['faulty']}{' -- HANG' if t['hang'] else ''}\n")
        out.append(f"launcher exit {t['exit']}, {t['wall']:.1f} s; Piper segments left: "
                   f"{t['piper_left'] or 'none'}; same usage message on every rank: "
                   f"{t['same_message']}\n")
        for r, (v, why) in enumerate(t["verdicts"]):
            res = t["ranks"][r]
            took = f", {res['took']:.2f} s" if res and res.get("took") is not None else ""
            out.append(f"- rank {r}: {v}{took}; {why or res.get('msg', '')}")
        out.append("\n```\n" + t["output"].strip()[-(6000 if t["hang"] else 1500):]
                   + "\n```\n")
    return out


def examples(trials: list[dict]) -> list[str]:
    """One message of each (class, error, phase named after the call) seen: what users get."""
    seen, out = set(), []
    for t in trials:
        for res in t["ranks"]:
            if not (res and res.get("error")):
                continue
            phase = re.search(r"#\d+ \(([^)]*)\)", res["msg"])
            key = (t["class"], res["error"], phase and phase.group(1))
            if key not in seen:
                seen.add(key)
                out.append(f"- {t['class']} ({t['algo']}, rank {res['rank']}): "
                           f"`{res['error']}: {res['msg']}`")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per class (default 50)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--local-size", type=int, default=2, help="ranks per emulated node")
    ap.add_argument("--classes", default=",".join(CLASSES), help=f"of {','.join(CLASSES)}")
    ap.add_argument("--timeout", type=float, default=3.0, help="PIPER_TIMEOUT of the ranks")
    ap.add_argument("--job-timeout", type=float, default=None,
                    help="outer limit per trial, a hang beyond it (default 2 * timeout + 40 s)")
    ap.add_argument("--launcher-cleanup", action="store_true",
                    help="kill class: let hydra end the job when the rank dies (default: "
                         "-disable-auto-cleanup, so that Piper's own detection is measured)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default: none)")
    # rank side (under mpirun)
    ap.add_argument("--rank-side", choices=CLASSES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--trial", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--algo", default="halo", help=argparse.SUPPRESS)
    ap.add_argument("--faulty", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--op", default="all_to_all", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_side:
        rank_side(a)
        return 0
    classes = [c for c in a.classes.split(",") if c]
    if unknown := set(classes) - set(CLASSES):
        ap.error(f"unknown classes {sorted(unknown)}")
    if a.ranks < 2:
        ap.error("--ranks must be at least 2")
    a.job_timeout = a.job_timeout or 2 * a.timeout + 40
    print(f"faults: {a.trials} trials x {classes} on {a.ranks} ranks, local size "
          f"{a.local_size}, PIPER_TIMEOUT {a.timeout:g} s, outer limit {a.job_timeout:g} s",
          flush=True)
    rows, every = [], []
    for cls in classes:
        trials = []
        for k in range(a.trials):
            t = run_trial(cls, k, a)
            trials.append(t)
            n = sum(v[0] == "right" for v in t["verdicts"])
            tooks = [res["took"] for res in t["ranks"] if res and res.get("took") is not None]
            span = f"{min(tooks):.2f}-{max(tooks):.2f} s" if tooks else "-"
            launched = sum(v[0] == "launcher" for v in t["verdicts"])
            print(f"{cls:6s} {k + 1:3d}/{a.trials} {t['algo']:8s} {t['op']:12s} faulty rank "
                  f"{t['faulty']}: {'HANG, ' if t['hang'] else ''}{n}/{expected(cls, a.ranks)}"
                  f" right, {launched} launcher-ended, to error {span}, Piper segments left "
                  f"{len(t['piper_left'])}, MPICH removed {t['mpich_removed']}, "
                  f"{t['wall']:.1f} s", flush=True)
        rows.append(summary(cls, trials, a.ranks))
        every += trials
    text = table(rows)
    print("\n" + text)
    notes = anomalies(every)
    if notes:
        print("\n" + "\n".join(notes))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        cleanup = "with launcher cleanup" if a.launcher_cleanup else "under -disable-auto-cleanup"
        a.out.write_text(
            f"# Fault injection: {a.trials} trials per class\n\n{provenance(sys.argv)}\n\n"
            f"{a.ranks} ranks, {a.local_size} per emulated node, PIPER_TIMEOUT {a.timeout:g} s, "
            f"kill class {cleanup}; "
            f"seconds to the error: from the fault (skip, counts, dtype, small: the start of "
            f"the faulty call; kill: the SIGKILL) to the raise.\n\n{text}\n\n"
            "## Messages (one per class, error and phase)\n\n" + "\n".join(examples(every))
            + "\n\n"
            + ("## Trials with a hang, a wrong outcome, a leak or launcher-ended ranks\n\n"
               + "\n".join(notes) if notes else "No trial went wrong.") + "\n")
        print(f"\nwritten to {a.out}")
    ok = all(r["hangs"] == 0 and r["piper_left"] == 0 and
             r["right"] + r["launcher"] == r["expected"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
