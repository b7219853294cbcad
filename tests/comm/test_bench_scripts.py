"""bench/faults.py and bench/soak.py stay runnable: one trial of two fault classes, a short soak
(the recorded runs, 50 trials per class and 10^4 calls, are made by hand: see their docstrings)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mpi


def _run(script: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def test_bench_watchdog_ends_a_rank_stuck_in_mpi():
    """piper_comm.bench's -T bounds MPI's own waits too (a Python signal handler could not
    run while the main thread waits in MPI_Barrier): the stuck rank names what it measured,
    and the job ends in seconds, not at rank 1's 60 s."""
    from tests.launch import MPIRUN

    t0 = time.monotonic()
    proc = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-m", "tests.comm.bench_watchdog"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "rank 0: Test timeout: flat at 1 KiB did not finish within 2 s (-T)" in proc.stderr, \
        proc.stderr[-3000:]
    assert "the barrier returned" not in proc.stdout and took < 40, (took, proc.stdout)


def test_faults_script(tmp_path):
    out = tmp_path / "faults.md"
    text = _run("faults.py", "--trials", "1", "--classes", "kill,counts", "--out", str(out))
    assert "| counts | 1 | 0 | 4 / 4 |" in text, text
    report = out.read_text()
    assert "commit:" in report and "| kill | 1 | 0 |" in report, report


def test_soak_script(tmp_path):
    out = tmp_path / "soak.md"
    text = _run("soak.py", "--calls", "60", "--jobs", "2,10", "--progress", "30",
                "--out", str(out))
    assert "[soak] call 30/60" in text and "| all | | 60 / 60 | 0 | 0 | 0 |" in text, text
    assert "matched its reference bitwise" in out.read_text()
