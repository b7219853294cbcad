"""The one helper that starts multi-rank tests: mpirun (or torchrun) under a timeout.

Each rank runs tests/worker.py, which calls a case function and writes rank<r>.json with its
outcome. On failure the assertion shows every rank's outcome and the launcher's whole output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests import batch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIRUN = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
TORCHRUN = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")


@dataclass
class Run:
    returncode: int
    output: str
    ranks: list[dict | None]  # rank<r>.json of each rank (None: the rank wrote nothing)
    elapsed: float

    def report(self) -> str:
        lines = [f"launcher exit code {self.returncode}, {self.elapsed:.1f} s"]
        exits = exit_statuses(self.output)
        for r, res in enumerate(self.ranks):
            if res is None:
                why = (f"exit: {describe_status(exits[r])}" if r < len(exits)
                       else "crashed, killed or hung")
                lines.append(f"  rank {r}: no result; {why}")
            else:
                lines.append(f"  rank {r}: {res['status']} after {res['elapsed']:.2f} s"
                             + (f": {res['error']}" if res.get("error") else ""))
        return "\n".join(lines) + "\n--- output ---\n" + self.output[-20000:]


def exit_statuses(output: str) -> list[int]:
    """Every rank's wait status as MPICH's hydra reports it with -print-all-exitcodes
    ("[mpiexec@host] Exit codes: [host] 256,9,0": ranks in order on one host), [] if absent."""
    m = re.search(r"Exit codes: ((?:\[[^\]]+\] [\d,-]+\s*)+)", output)
    if not m:
        return []
    return [int(c) for part in re.findall(r"\] ([\d,-]+)", m.group(1))
            for c in part.split(",") if c]


def describe_status(status: int) -> str:
    """A wait status in words (hydra reports the raw one: exit(1) is 256, SIGKILL is 9)."""
    if status == 0:
        return "exited 0, or was ended by the launcher's cleanup (reported as 0)"
    if status & 0x7F:
        try:
            name = signal.Signals(status & 0x7F).name
        except ValueError:
            name = f"signal {status & 0x7F}"
        return f"killed by {name}"
    return f"exited with status {status >> 8}"


MPICH_SHM = "mpich_shm_*"  # MPICH's node segments in /dev/shm (removed by MPI_Finalize)


def _mapped_shm() -> set[str]:
    """Every /dev/shm file some live process maps."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        names.update(line.rsplit(" ", 1)[-1] for line in text.splitlines()
                     if "/dev/shm/" in line)
    return names


def remove_leaked_mpich_shm(before: set[Path]) -> int:
    """After a job in which a rank died (SIGKILL tests, timeouts) or left without MPI_Finalize,
    MPICH's segments of that job stay in /dev/shm (RAM; 3-8 MiB each): removes those that
    appeared during the job and no live process maps. Returns how many were removed."""
    new = set(Path("/dev/shm").glob(MPICH_SHM)) - before
    if not new:
        return 0
    in_use = _mapped_shm()
    removed = 0
    for path in new - {Path(n) for n in in_use}:
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _dump_stacks(launcher: int, outdir: Path, result: str = "rank{}.json") -> list[int]:
    """Asks every rank (tests.worker) below the launcher that has not written its result to
    print its Python stacks (the worker registers faulthandler on SIGUSR1), waits a moment for
    them; returns the pids of all ranks (`result`: a rank's result file, {} its rank). Ranks
    that wrote their result are not signalled: they may be finalising, when faulthandler is
    gone and SIGUSR1 would kill them (and MPICH's launcher then ends the job before the hung
    ranks' stacks are out)."""
    ranks, signalled = [], 0
    for pid in _descendants(launcher):
        try:
            if b"tests.worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            ranks.append(pid)
            env = dict(kv.split(b"=", 1) for kv in
                       Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
            rank = int(env.get(b"PMI_RANK", env.get(b"RANK", b"-1")))
            if rank >= 0 and not (outdir / result.format(rank)).exists():
                os.kill(pid, signal.SIGUSR1)
                signalled += 1
        except (OSError, ValueError):
            continue
    if signalled:
        time.sleep(1.0)
    return ranks


def _launch(cmd: list[str], nprocs: int, func: str, args: dict | None, env: dict | None,
            timeout: float, expect_ok: bool) -> Run:
    outdir = Path(tempfile.mkdtemp(prefix="piper-test-"))
    shm_before = set(Path("/dev/shm").glob(MPICH_SHM))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.setdefault("PIPER_TIMEOUT", "30")
    # A rank that dies of a signal (SIGSEGV, SIGABRT, ...) prints its Python stacks: hydra's
    # "BAD TERMINATION" banner names the first rank it cleaned up, not the one that died.
    full_env.setdefault("PYTHONFAULTHANDLER", "1")
    cmd = [*cmd, sys.executable, "-m", "tests.worker", func, json.dumps(args or {}), str(outdir)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        stuck = _dump_stacks(proc.pid, outdir)  # where each rank hangs, in the output below
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in stuck:  # ranks a launcher put in process groups of their own
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = -9
        out += (f"\n[launch.py] killed after the {timeout:.0f} s test timeout (a hang); the "
                f"Python stacks of the ranks without a result are above\n")
    elapsed = time.monotonic() - t0
    ranks = []
    for r in range(nprocs):
        f = outdir / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else None)
    shutil.rmtree(outdir, ignore_errors=True)
    # A job that finalised leaves nothing; one with a dead rank, or whose ranks left without
    # MPI_Finalize (the hard exits of the failure tests), leaves its segments.
    removed = remove_leaked_mpich_shm(shm_before)
    if removed:
        out += f"\n[launch.py] removed {removed} MPICH segment(s) of this job from /dev/shm\n"
    run = Run(code, out, ranks, elapsed)
    if expect_ok and (code != 0 or any(r is None or r["status"] != "ok" for r in ranks)):
        raise AssertionError(f"{func} on {nprocs} ranks failed:\n{run.report()}")
    return run


def _batched(call: batch.Call, func: str, nprocs: int) -> Run | None:
    """The case's Run from its batch job (tests/batch.py), when it ran there and ended ok."""
    run = batch.take(call)
    if run is None and os.environ.get("PIPER_TEST_NO_LAUNCH"):
        raise AssertionError(f"{func} on {nprocs} ranks: this tier starts no launcher "
                             f"(PIPER_TEST_NO_LAUNCH, make unit); mark the test `mpi`")
    return run


def run_mpi(nprocs: int, func: str, args: dict | None = None, *, env: dict | None = None,
            timeout: float = 300, mpi_args: tuple[str, ...] = (), expect_ok: bool = True) -> Run:
    """Runs tests.<func> ("module:function") on nprocs ranks under mpirun (or serves the
    result of the case's batch job, tests/batch.py)."""
    run = _batched(batch.Call.of("mpirun", nprocs, func, args, env, timeout, mpi_args,
                                 expect_ok), func, nprocs)
    if run is not None:
        return run
    assert MPIRUN, "mpirun not found (make venv installs MPICH from PyPI)"
    if "-print-all-exitcodes" not in mpi_args:  # which rank died, and of what, in the report
        mpi_args = ("-print-all-exitcodes", *mpi_args)
    return _launch([MPIRUN, *mpi_args, "-n", str(nprocs)], nprocs, func, args, env, timeout,
                   expect_ok)


def run_torchrun(nprocs: int, func: str, args: dict | None = None, *, env: dict | None = None,
                 timeout: float = 300, expect_ok: bool = True) -> Run:
    """Runs tests.<func> on nprocs ranks under torchrun --standalone (or serves the result of
    the case's batch job, tests/batch.py)."""
    run = _batched(batch.Call.of("torchrun", nprocs, func, args, env, timeout, (), expect_ok),
                   func, nprocs)
    if run is not None:
        return run
    assert TORCHRUN, "torchrun not found"
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nprocs}", "--no-python"]
    return _launch(cmd, nprocs, func, args, env, timeout, expect_ok)
