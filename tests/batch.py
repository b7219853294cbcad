"""Many multi-rank cases in one launcher job: what makes the suite fast without changing a test.

Start-up (mpirun, Python, torch's import, on every rank) costs more than most cases, so the
cases that share a launch shape run one after another in one job:

1. Plan (tests/conftest.py, once the items are collected and selected): each `mpi` test that is
   not skipped, not marked `own_job`, and whose body (or a helper it calls) calls run_mpi or
   run_torchrun, is called with run_mpi/run_torchrun replaced by a probe that records the first
   launch (`Call`) and stops the test there (the test's parameters are real; other fixtures are
   stand-ins, and a test that touches one before launching is simply not batched).
2. Grouping: calls with the same launcher, rank count, environment and no launcher options
   share a job (`Job`), in collection order, at most MAX_CASES per job. A call stays in a job
   of its own (the code path tests/launch.py always had) when the test expects ranks to fail
   (expect_ok=False: killed or hung ranks, hard exits), passes launcher options, sets
   PIPER_TIMEOUT (its peers wait for timeouts and leave broken state), is marked own_job
   (its assertions are about the job itself: /dev/shm before and after, exit statuses,
   elapsed time), or its case module sets BATCH = False (its cases set up and destroy
   process-wide state, such as torch.distributed's default group). A case module that sets
   BATCH to a launcher's name ("mpirun") is batched under that launcher only, and only with
   its own cases (they leave process-wide state that others must not inherit).
3. Run: just before the first test of a job runs (outside that test's pytest-timeout), the
   job runs all its cases (tests/worker.py --batch); each case has its own timeout, counted
   from the end of the previous case, and a hang is killed with every stuck rank's stacks.
4. Serve: when a test then calls run_mpi with exactly the planned call, it gets that case's
   Run (every rank's result; the case's output per rank) if the case ended ok on every rank.
   Otherwise (a rank failed, hung or died; the job ended before the case) the case runs again
   in a job of its own, exactly as without batching, and that run is what the test sees: a
   failure report is the one tests/launch.py always gave. A case that failed in its batch but
   passed alone is listed at the end of the session (a batching artefact, or a flake).

PIPER_TEST_BATCH=0 turns batching off (every case in its own job, as before).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

MAX_CASES = 20  # cases per job (jobs of one shape are of near-equal sizes)


@dataclass(frozen=True)
class Call:
    """One launch as a test asks for it (tests/launch.py's arguments, JSON-normalised)."""

    launcher: str  # "mpirun" | "torchrun"
    nprocs: int
    func: str
    args: str
    env: str
    timeout: float
    mpi_args: tuple[str, ...]
    expect_ok: bool

    @staticmethod
    def of(launcher: str, nprocs: int, func: str, args: dict | None, env: dict | None,
           timeout: float, mpi_args: tuple[str, ...] = (), expect_ok: bool = True) -> Call:
        return Call(launcher, nprocs, func, json.dumps(args or {}, sort_keys=True),
                    json.dumps(env or {}, sort_keys=True), float(timeout), tuple(mpi_args),
                    expect_ok)

    def own_job_reason(self) -> str | None:
        flag = _module_globals(self.func.split(":")[0]).get("BATCH", True)
        if flag is False:
            return "its case module says BATCH = False"
        if isinstance(flag, str) and flag != self.launcher:
            return f"its case module batches under {flag} only"
        if not self.expect_ok:
            return "expects failing ranks"
        if self.mpi_args:
            return "launcher options"
        if "PIPER_TIMEOUT" in json.loads(self.env):
            return "waits for timeouts"
        return None

    def shape(self) -> tuple:
        """Calls of one shape may share a job. A case module that owns its process's exit
        (a `finish` function: torch.distributed set up once per process), or that is batched
        under one launcher only (BATCH = "mpirun"), only shares with itself."""
        module = self.func.split(":")[0]
        names = _module_globals(module)
        alone = "finish" in names or isinstance(names.get("BATCH"), str)
        return (self.launcher, self.nprocs, self.env, module if alone else None)


@functools.cache
def _module_globals(module: str) -> dict:
    """The names a case module binds at its top level (its source read, not imported: case
    modules may need a GPU or set environment variables): constants' values, else None."""
    path = Path(__file__).parent.joinpath(*module.split(".")).with_suffix(".py")
    names: dict = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value if isinstance(node.value, ast.Constant) else None
            for t in targets:
                if isinstance(t, ast.Name):
                    names[t.id] = value.value if value is not None else None
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
    return names


# -- probing -------------------------------------------------------------------------------

class Probed(BaseException):
    """Raised by run_mpi/run_torchrun while probing, to stop the test."""


class NoProbe(BaseException):
    """Raised while probing when the test starts a process before its first launch."""


PROBING: list[Call] | None = None  # while probing: the launches recorded so far
MAX_PROBED = 8  # launches recorded per test


@contextlib.contextmanager
def probing():
    """While a test is probed: run_mpi/run_torchrun record their call and return a stand-in
    Run (every rank ok, result []), so that a test that launches several times in a row (a
    loop over schedules) shows them all; the first use of a stand-in result that an empty list
    does not satisfy ends the probe. Later launches of a case other than the first's are not
    recorded (their arguments may come from stand-in results). Yields the list of calls."""
    global PROBING
    real_popen = subprocess.Popen

    def no_popen(*a, **k):
        raise NoProbe("a process started while probing")

    PROBING = []
    subprocess.Popen = no_popen
    try:
        yield PROBING
    finally:
        PROBING = None
        subprocess.Popen = real_popen


def _probed(call: Call):
    from tests import launch as L

    if PROBING and (call.func != PROBING[0].func or len(PROBING) >= MAX_PROBED):
        raise Probed()
    PROBING.append(call)
    return L.Run(0, "", [{"status": "ok", "result": [], "error": None, "elapsed": 0.0}
                         for _ in range(call.nprocs)], 0.0)


# -- running a job -------------------------------------------------------------------------

def run_job(prefix: list[str], calls: list[Call]) -> list:
    """Runs the calls (one shape) in one job; returns per call a tests.launch.Run (every rank's
    result, the case's output of every rank, and for the case the job ended in the launcher's
    output and exit status), or None for a case the job never started."""
    from tests import launch as L

    nprocs, env = calls[0].nprocs, json.loads(calls[0].env)
    outdir = Path(tempfile.mkdtemp(prefix="piper-batch-"))
    (outdir / "cases.json").write_text(json.dumps(
        [{"func": c.func, "args": json.loads(c.args)} for c in calls]))
    shm_before = set(Path("/dev/shm").glob(L.MPICH_SHM))
    full_env = {**os.environ, "PYTHONPATH": str(L.ROOT), **env}
    full_env.setdefault("PIPER_TIMEOUT", "30")
    full_env.setdefault("PYTHONFAULTHANDLER", "1")
    cmd = [*prefix, sys.executable, "-m", "tests.worker", "--batch", str(outdir)]
    launcher_log = outdir / "launcher.log"

    def written(k: int) -> bool:
        return all((outdir / f"c{k}-rank{r}.json").exists() for r in range(nprocs))

    t0 = time.monotonic()
    marks = [t0]  # marks[k]: when case k started (the previous one ended on every rank)
    done, hung, code = 0, None, None
    with open(launcher_log, "w") as log:
        proc = subprocess.Popen(cmd, cwd=L.ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                while done < len(calls) and written(done):
                    done += 1
                    marks.append(time.monotonic())
                code = proc.poll()
                if code is not None:
                    break
                if done < len(calls) and time.monotonic() - marks[-1] > calls[done].timeout:
                    stuck = L._dump_stacks(proc.pid, outdir, f"c{done}-rank{{}}.json")
                    os.killpg(proc.pid, signal.SIGKILL)
                    for pid in stuck:
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    proc.wait()
                    code, hung = -9, done
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C, pytest's own timeout)
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    end = time.monotonic()
    while done < len(calls) and written(done):
        done += 1
        marks.append(end)
    output = launcher_log.read_text(errors="replace")
    if hung is not None:
        output += (f"\n[launch.py] case {hung + 1} killed after its {calls[hung].timeout:.0f} s "
                   f"test timeout (a hang); the Python stacks of its ranks without a result "
                   f"are in their case output above\n")
    removed = L.remove_leaked_mpich_shm(shm_before)
    if removed:
        output += f"\n[launch.py] removed {removed} MPICH segment(s) of this job from /dev/shm\n"
    started = [k < done or any((outdir / f"c{k}-rank{r}.log").exists() for r in range(nprocs))
               for k in range(len(calls))]
    last_started = max((k for k in range(len(calls)) if started[k]), default=-1)
    runs = []
    for k, call in enumerate(calls):
        if not started[k]:
            runs.append(None)
            continue
        ranks = []
        for r in range(nprocs):
            f = outdir / f"c{k}-rank{r}.json"
            ranks.append(json.loads(f.read_text()) if f.exists() else None)
        text = [f"[tests/batch.py] case {k + 1} of {len(calls)} in one {call.launcher} job of "
                f"{nprocs} ranks (its cases: {[c.func for c in calls]})\n"]
        for r in range(nprocs):
            p = outdir / f"c{k}-rank{r}.log"
            if p.exists():
                text.append(f"--- rank {r}: output of this case ---\n"
                            f"{p.read_text(errors='replace')}")
        last = k == last_started
        if last:  # the job ended during or after this case: the launcher's own output
            text.append(f"--- launcher output ---\n{output}")
        elapsed = (marks[k + 1] if k + 1 < len(marks) else end) - marks[k]
        runs.append(L.Run(code if last else 0, "".join(text), ranks, elapsed))
    shutil.rmtree(outdir, ignore_errors=True)
    return runs


def ok(run) -> bool:
    return run is not None and run.returncode == 0 and all(
        r is not None and r["status"] == "ok" for r in run.ranks)


# -- the plan ------------------------------------------------------------------------------

@dataclass
class Job:
    calls: list[tuple[str, Call]]  # (test node id, call)
    runs: dict | None = None  # (node id, call) -> Run | None, once run
    seconds: float = 0.0


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    of_test: dict[str, list[Job]] = field(default_factory=dict)  # node id -> its jobs
    own: dict[str, str] = field(default_factory=dict)  # node id -> why it keeps its own job
    served: int = 0
    reruns: list[tuple[str, str]] = field(default_factory=list)  # (node id, batch outcome)

    @staticmethod
    def build(probed: list[tuple[str, Call]]) -> Plan:
        plan = Plan()
        shapes: dict[tuple, list[tuple[str, Call]]] = defaultdict(list)
        for nodeid, call in dict.fromkeys(probed):  # a launch repeated: its repeats run alone
            why = call.own_job_reason()
            if why:
                plan.own[nodeid] = why
            else:
                shapes[call.shape()].append((nodeid, call))
        for members in shapes.values():
            jobs = -(-len(members) // MAX_CASES)  # of near-equal sizes
            for i in range(jobs):
                chunk = members[i * len(members) // jobs:(i + 1) * len(members) // jobs]
                if len(chunk) < 2:
                    plan.own[chunk[0][0]] = "only case of its shape"
                    continue
                job = Job(chunk)
                plan.jobs.append(job)
                for nodeid, _ in chunk:
                    jobs_of = plan.of_test.setdefault(nodeid, [])
                    if job not in jobs_of:
                        jobs_of.append(job)
        return plan

    def before_test(self, nodeid: str) -> None:
        """Runs the test's jobs that have not run yet (called before the test's set-up)."""
        for job in self.of_test.get(nodeid, []):
            if job.runs is None:
                self._run(job, nodeid)

    def _run(self, job: Job, nodeid: str) -> None:
        from tests import launch as L

        call = job.calls[0][1]
        if call.launcher == "mpirun":
            prefix = [L.MPIRUN, "-print-all-exitcodes", "-n", str(call.nprocs)]
        else:
            prefix = [L.TORCHRUN, "--standalone", f"--nproc-per-node={call.nprocs}",
                      "--no-python"]
        t0 = time.monotonic()
        job.runs = dict.fromkeys(job.calls)
        pending = list(job.calls)
        while len(pending) > 1:  # a job that ended early: the cases it did not start go on
            try:  # in a new job
                runs = run_job(prefix, [c for _, c in pending])
            except Exception as e:  # the cases then run alone; say why at the end
                self.reruns.append((nodeid, f"the batch job failed to run: {e!r}"))
                break
            job.runs.update(zip(pending, runs))
            left = [p for p, r in zip(pending, runs) if r is None]
            if len(left) == len(pending):
                break
            pending = left
        job.seconds = time.monotonic() - t0

    def take(self, nodeid: str, call: Call):
        """The batched Run of this test's planned call when it ended ok, else None (the caller
        launches the case alone). Each planned Run is served once."""
        job = next((j for j in self.of_test.get(nodeid, [])
                    if j.runs is not None and (nodeid, call) in j.runs), None)
        if job is None:
            return None
        run = job.runs.pop((nodeid, call))
        if ok(run):
            self.served += 1
            return run
        why = "not started (the job ended before it)" if run is None else (
            run.report().split("\n--- output ---", 1)[0].replace("\n", "; "))
        self.reruns.append((nodeid, why))
        return None

    def summary(self) -> list[str]:
        ran = [j for j in self.jobs if j.runs is not None]
        if not (ran or self.own or self.reruns):
            return []
        cases = sum(len(j.calls) for j in ran)
        lines = [f"batched launches: {len(ran)} jobs ran {cases} cases "
                 f"({sum(j.seconds for j in ran):.0f} s), {self.served} served to their tests; "
                 f"{len(self.own)} probed cases in jobs of their own"]
        for nodeid, why in self.reruns:
            lines.append(f"  ran again alone after its batch: {nodeid}: {why}")
        if os.environ.get("PIPER_TEST_BATCH") == "plan":  # the plan itself
            for job in self.jobs:
                lines.append(f"job of {len(job.calls)}: {job.calls[0][1].shape()[:3]}")
                lines += [f"    {nodeid}" for nodeid, _ in job.calls]
            lines += [f"own job: {nodeid}: {why}" for nodeid, why in self.own.items()]
        return lines


PLAN: Plan | None = None


def current_test() -> str | None:
    cur = os.environ.get("PYTEST_CURRENT_TEST")
    return cur.rsplit(" (", 1)[0] if cur else None


def take(call: Call):
    """tests/launch.py's hook: while probing a stand-in Run (or Probed); else the batched Run
    or None."""
    if PROBING is not None:
        return _probed(call)
    if PLAN is None:
        return None
    nodeid = current_test()
    return PLAN.take(nodeid, call) if nodeid else None
