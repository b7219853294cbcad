"""python -m piper_comm.bench: a short run end to end (exact, every algorithm beside MPI's, the
JSON it writes) and its auto summary (which algorithm auto ran, against the faster of halo and
flat measured in the same run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from piper_comm.bench import auto_summary

ROOT = Path(__file__).resolve().parents[2]


def test_auto_summary_is_auto_over_the_faster_of_halo_and_flat():
    rows = [{"algo": a, "size": s, "time_us": t, "chosen": c}
            for a, s, t, c in (("halo", 1024, 10.0, "halo"), ("flat", 1024, 20.0, "flat"),
                               ("auto", 1024, 30.0, "flat"), ("halo", 4096, 8.0, "halo"),
                               ("flat", 4096, 4.0, "flat"), ("auto", 4096, 4.0, "flat"))]
    got = auto_summary(rows)
    assert got["chosen"] == ["flat", "flat"] and got["ratio"] == [3.0, 1.0]
    assert got["geomean"] == pytest.approx(3.0 ** 0.5, rel=1e-12)


@pytest.mark.mpi
def test_bench_runs_exact_and_auto_follows_piper_platform(tmp_path):
    """4 ranks as 2 nodes of 2, 1-16 KiB, halo, flat, auto and MPI_Alltoall: 0 wrong elements;
    under a platform whose node barriers are dear auto runs flat at every size, and the header
    and the JSON say which links it chose with."""
    from tests.launch import MPIRUN

    platform = tmp_path / "dear_barriers.yaml"
    platform.write_text("intra: {latency: 1.0e-6, bandwidth: 1.0e+10}\ninter: {latency: "
                        "1.0e-6, bandwidth: 1.0e+10}\ncopy_bandwidth: 1.0e+10\n"
                        "barrier_latency: 1.0\n")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [MPIRUN, "-n", "4", sys.executable, "-m", "piper_comm.bench", "--local-size", "2",
         "-b", "1K", "-e", "16K", "-f", "4", "-n", "3", "-w", "1", "--algos",
         "halo,flat,auto,mpi", "-T", "60", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PIPER_PLATFORM": str(platform)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "# OK: 0 wrong elements in total" in proc.stdout, proc.stdout[-3000:]
    assert f"# auto: links from platform dear_barriers ({platform})" in proc.stdout
    assert "# auto: 1 KiB flat" in proc.stdout and "(flat)" in proc.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["auto_links"].startswith("platform dear_barriers")
    assert data["summary"]["auto"]["chosen"] == ["flat"] * 3
    assert {r["algo"] for r in data["rows"]} == {"halo", "flat", "auto", "mpi"}
    assert all(r["wrong"] == 0 for r in data["rows"])
