"""bench/gpu_check.sh --dry-run lists every step of the GPU check and runs nothing; the build
compiles the CUDA backend for sm_80 and sm_90 whenever nvcc is found."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import piper_comm as pc
from piper_comm import _C

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
EVERY_PART = ["environment", "build", "nccl_gate"]
PARTS = {1: ["nvidia-smi", "build_config", "build_info", "smoke_one_rank",
             "smoke_two_nodes_of_one", "pytest_gpu_context", "pytest_gpu_comm",
             "moe_layer_cuda", "moe_layer_cuda_one_node", "train_cuda", "train_cuda_staged",
             "memcheck", "racecheck", "memcheck_context", "memcheck_collective"],
         2: ["bench_nccl", "bench_pack", "bench_moe_layer", "bench_moe_layer_fp8",
             "profile_flat_1k", "profile_halo_1k"]}
GPU_TOOLS = ["nvidia-smi", "compute-sanitizer", "nvcc", "mpirun", "python3", "git"]


@pytest.mark.parametrize("part", [None, 1, 2])
def test_dry_run_prints_every_step_and_calls_nothing(tmp_path, part):
    """Every tool the real check would call is a stub here that leaves a mark if run; the
    dry run must leave none, write no result file and exit 0; --part N lists the steps of
    part N and those of every part."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in GPU_TOOLS:
        (fake / tool).write_text(f"#!/bin/sh\ntouch '{marks}/{tool}'\nexit 1\n")
        (fake / tool).chmod(0o755)
    results = ROOT / "bench" / "results"
    before = set(results.glob("gpu_*"))
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": str(fake / "python3")}
    args = ["--dry-run"] + ([] if part is None else ["--part", str(part)])
    out = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(marks)) == [], "the dry run executed a tool"
    assert set(results.glob("gpu_*")) == before, "the dry run wrote a result file"
    listed = [line.split()[1] for line in out.stdout.splitlines()
              if line.startswith("### ") and " (limit " in line]
    want = EVERY_PART + [n for p, names in PARTS.items() if part in (None, p) for n in names]
    assert listed == want, out.stdout
    assert "nothing was run" in out.stdout
    assert "bench/results/gpu_" in out.stdout and "device name" in out.stdout
    # under the device tool ($OUT: a folder that comes back) the results go there
    back = tmp_path / "back"
    back.mkdir()
    out = subprocess.run(["bash", str(SCRIPT), *args], env={**env, "OUT": str(back)},
                         capture_output=True, text=True, timeout=60)
    assert f"results would go to {back}/gpu_" in out.stdout, out.stdout


def test_steps_that_claim_to_exist_do():
    """The steps the check runs (not marked "not implemented") refer to code in the tree."""
    from tests.gpu import cases, comm_cases

    assert callable(cases.ipc_segment_round_trip) and callable(cases.halo_one_node_cuda)
    assert callable(comm_cases.small) and callable(comm_cases.exact)
    assert list((ROOT / "tests" / "gpu").glob("test_*.py"))
    text = SCRIPT.read_text()
    assert "def sanitize()" in text and "def bench()" in text


@pytest.mark.parametrize(("args", "says"), [(["--dryrun"], "usage"),
                                             (["--dry-run", "--part", "3"], "1 or 2")])
def test_bad_arguments_are_refused(args, says):
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and says in out.stderr


NVCC = shutil.which("nvcc")
BUILD = pc.build_info()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA backend is not compiled here")
def test_cuda_backend_is_compiled_for_sm80_and_sm90():
    """With nvcc present (PIPER_CUDA=AUTO) the extension holds the CUDA context and device
    code for both architectures: SASS for sm_80 and sm_90 and PTX for each."""
    if os.environ.get("PIPER_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("PIPER_CUDA=OFF: built without CUDA on purpose")
    assert BUILD["cuda"] is True and BUILD["cuda_archs"] == "80,90", BUILD
    blob = Path(_C.__file__).read_bytes()
    for arch in ("80", "90"):
        assert f"-arch sm_{arch} ".encode() in blob, f"no sm_{arch} device code"
        assert f".target sm_{arch}".encode() in blob, f"no compute_{arch} PTX"
    assert hasattr(_C, "CudaContext")


@pytest.mark.mpi
def test_moe_layer_check_script_runs_cpu_against_cpu():
    """bench/gpu_moe_check.py's layer step, with CPU in place of CUDA (identical results): the
    script the GPU check runs works, every variant included."""
    from tests.launch import MPIRUN

    out = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(ROOT / "bench" /
                          "gpu_moe_check.py"), "layer", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith(("ok", "FAIL"))]
    assert len(lines) == 11 and all(x.startswith("ok") for x in lines), out.stdout


@pytest.mark.mpi
def test_train_check_script_runs_cpu_against_cpu():
    """bench/gpu_moe_check.py's training step, with CPU in place of CUDA (identical losses):
    both precisions run and pass; an unknown precision is refused before anything runs."""
    script = [sys.executable, str(ROOT / "bench" / "gpu_moe_check.py"), "train"]
    out = subprocess.run([*script, "--device", "cpu", "--steps", "2", "--ranks", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith(("ok", "FAIL"))]
    assert [x.split(",")[0] for x in lines] == ["ok   fp32", "ok   bf16-mixed"], out.stdout
    bad = subprocess.run([*script, "--precisions", "fp16"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown ['fp16']" in bad.stderr, bad.stderr
