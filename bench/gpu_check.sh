#!/usr/bin/env bash
# The GPU check of the GPU path, for the lent GPU machine (one H100/H200, no network, ~15
# minutes of device time; the script took 100 s in its first run on an H200, before training in
# two precisions and the profiles were added): builds the extension, names the device, runs
# the GPU tests (the pack kernels; the CUDA execution context over CUDA IPC; comm.all_to_all(_v) on CUDA tensors under
# every algorithm, 4 ranks on the one device as 2 emulated nodes of 2 and as 1 node of 4, over
# NCCL and host-staged, every dtype, CuPy, CUDA-graph capture, bad input, the torch backend),
# compute-sanitizer on the kernels, the context's IPC round trip and one small collective, the
# benchmark against torch's NCCL all_to_all_single, and copy_blocks and pack/unpack against a
# plain device-to-device copy at 16/64/256 MiB; the MoE layer (every dispatcher, dedup, chunked
# with offload, fp32, bf16-mixed, FP8 dispatch) and 20 training steps on CUDA against the same
# on CPU (bench/gpu_moe_check.py). Everything goes to bench/results/gpu_<date>.txt, headed by
# the device's name. A failing step is recorded and the next runs.
#
#   bash bench/gpu_check.sh            # PYTHON=python3 by default (torch with CUDA required)
#   bash bench/gpu_check.sh --part 1   # environment, build, the correctness lanes (GPU tests,
#                                      # MoE layer and training on CUDA, compute-sanitizer)
#   bash bench/gpu_check.sh --part 2   # environment, build, the benchmarks
#   bash bench/gpu_check.sh --steps a,b  # only the named steps (after the environment and build)
#   bash bench/gpu_check.sh --dry-run [--part N]  # prints every step; runs nothing
# PIPER_BUILD_TYPE=RelWithDebInfo keeps the symbols (Release strips them) for a backtrace.
# Under the device tool (its $OUT is a folder that comes back, also after a timeout) the
# results file is written there; copy it into bench/results/ here.
cd "$(dirname "$0")/.." || exit 1
BACK=""  # the device tool's folder that comes back, when there is one
[ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && BACK=$OUT
DRY=0
PART=""
ONLY=""  # --steps: ",a,b," (the environment and the build always run)
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --part) PART=${2:-}; shift
            case "$PART" in 1|2) ;; *) echo "--part takes 1 or 2" >&2; exit 2 ;; esac ;;
    --steps) ONLY=",${2:-},"; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--part 1|2] [--steps NAME,...]" >&2; exit 2 ;;
  esac
  shift
done
SECTION=0  # the part of the steps that follow: 0 (every part), 1 or 2
PY=${PYTHON:-python3}
PYDIR=$(dirname "$(command -v "$PY" || echo "$PY")")
# MPI: the GPU machine's image has Debian's Open MPI 4.1 and an mpi4py built on it; Piper's
# launchers and tests use MPICH (as `make venv` installs). The carried wheels (`make gpu-wheels`:
# .whl/mpich-*.whl and .whl/mpi4py-*.whl, ignored by git, named in the device call's carry) are
# installed under /tmp/piper-mpi and put in front: mpirun, mpicc and libmpi, and an mpi4py that
# loads MPICH, for the build and every rank.
if [ $DRY -eq 0 ] && [ ! -x "$PYDIR/mpirun" ]; then
  WHL=$(ls .whl/mpich-*.whl 2>/dev/null | head -1)
  M4PY=$(ls .whl/mpi4py-*.whl 2>/dev/null | head -1)
  if [ -n "$WHL" ] && [ -n "$M4PY" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/piper-mpi "$WHL"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/piper-mpi/site "$M4PY"
    export PATH=/tmp/piper-mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/piper-mpi/lib:${LD_LIBRARY_PATH:-}
    export PYTHONPATH=/tmp/piper-mpi/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  SPY=$(ls .whl/py_spy-*.whl 2>/dev/null | head -1)  # the profiles of part 2
  if [ -n "$SPY" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/piper-mpi "$SPY"
    export PATH=/tmp/piper-mpi/bin:$PATH
  fi
fi
# NCCL: a carried NCCL >= 2.30 (`make gpu-nccl`: .whl/libnccl.so.2, sm_90) stands in for the
# older one of the machine's torch in every process (LD_PRELOAD: torch and Piper then load the
# same library), so that several ranks can share the one GPU over NCCL.
if [ $DRY -eq 0 ] && [ -f .whl/libnccl.so.2 ]; then
  export LD_PRELOAD=$PWD/.whl/libnccl.so.2${LD_PRELOAD:+:$LD_PRELOAD}
  export PIPER_NCCL_LIBRARY=$PWD/.whl/libnccl.so.2
fi
# CUDA: the build must have the CUDA backend (PIPER_CUDA=ON fails it loudly otherwise)
if [ $DRY -eq 0 ]; then
  command -v nvcc >/dev/null \
    || { [ -x /usr/local/cuda/bin/nvcc ] && export PATH=$PATH:/usr/local/cuda/bin; }
  export PIPER_CUDA=${PIPER_CUDA:-ON}
fi
MPIRUN=$(command -v "$PYDIR/mpirun" || command -v mpirun || echo mpirun)  # the venv's MPICH first
STAMP=$(date -u +%Y%m%d_%H%M%S)
OUT="${BACK:-bench/results}/gpu_${STAMP}${PART:+_part$PART}.txt"
STATUS=0
LANE=""  # the lane a step runs in (lanes below); empty outside one
export NCCL_MULTI_RANK_GPU_ENABLE=1  # several ranks on the one GPU (NCCL >= 2.30, experimental)
# NCCL's docs (env.rst, NCCL_MULTI_RANK_GPU_ENABLE): the default configuration serves about 2
# ranks per GPU and more "may exhaust resources and lock"; fewer CTAs per rank for our 4.
export NCCL_MAX_CTAS=${NCCL_MAX_CTAS:-4} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Every wait of Piper (and of the trainer and the benchmark's torch groups) raises after 45 s,
# naming what it waited for, before a step's limit kills the step without a word.
export PIPER_TIMEOUT=${PIPER_TIMEOUT:-45}
# The script's time (a device call runs at most 600 s): a step starts only with 15 s left and
# its limit is cut to what is left, so that the summary is always written.
BUDGET=${PIPER_GPU_BUDGET_S:-540}
export PIPER_GPU_CHECK_RUN=$STAMP  # marks this run's processes: reap() ends those left over
if [ $DRY -eq 1 ]; then
  echo "# piper GPU check, dry run: nothing below is executed"
  echo "# results would go to $OUT, headed by the device name"
  OUT=/dev/null
  DRIVER=/tmp/piper_gpu_driver.XXXXXX.py
else
  set -x
  mkdir -p bench/results
  DRIVER=$(mktemp /tmp/piper_gpu_driver.XXXXXX.py)
  LANES=$(mktemp -d /tmp/piper_gpu_lanes.XXXXXX)  # each lane's status
  trap 'rm -rf "$DRIVER" "$LANES"' EXIT
  export PYTHONUNBUFFERED=1
  if [ -z "${CMAKE_CUDA_ARCHITECTURES:-}" ]; then  # build for this device only: half the compile
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    [ -n "$CAP" ] && export CMAKE_CUDA_ARCHITECTURES=$CAP
  fi
fi

step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, records output and status
  local name=$1 limit=$2
  shift 2
  [ $DRY -eq 1 ] || echo "$name" >> "$LANES/known"
  if [ -n "$PART" ] && [ "$SECTION" != 0 ] && [ "$SECTION" != "$PART" ]; then
    return
  fi
  if [ -n "$ONLY" ] && [ "$SECTION" != 0 ] && [[ "$ONLY" != *",$name,"* ]]; then
    return
  fi
  if [ $DRY -eq 1 ]; then
    echo "### $name (limit ${limit} s): $(printf '%q ' "$@")"
    return
  fi
  local t0=$SECONDS rc left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    echo "### $name: NOT run (budget: ${SECONDS} s of ${BUDGET} s used)" | tee -a "$OUT"
    STATUS=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ -n "$LANE" ]; then  # in a lane: the output to the lane's file, only the verdict shown
    echo "### $name: $*" >> "$OUT"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT" 2>&1
    rc=$?
  else
    echo "### $name: $*" | tee -a "$OUT"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT"
    rc=${PIPESTATUS[0]}
  fi
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "### $name: TIMED OUT after ${limit} s" | tee -a "$OUT"
  echo "### $name: exit $rc after $((SECONDS - t0)) s (script at ${SECONDS} s)${LANE:+ [lane $LANE]}" \
    | tee -a "$OUT"
  [ "$rc" -eq 0 ] || STATUS=1
  [ -n "$LANE" ] || reap
  return "$rc"
}

reap() {  # ends the processes of this run that outlived their step (ranks of a killed mpirun:
  # launchers start them in sessions of their own, which timeout's signal does not reach) and
  # says what still holds the GPU
  [ $DRY -eq 1 ] && return
  # (its report goes through a file: a tee beside it would carry the marker too)
  "$PY" - "$$" > "$LANES/reap.txt" 2>&1 <<'REAP'
import os, signal, subprocess, sys
mark = ("PIPER_GPU_CHECK_RUN=" + os.environ["PIPER_GPU_CHECK_RUN"]).encode()
script = int(sys.argv[1])
keep = {os.getpid(), os.getppid(), script}
killed = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if int(pid) in keep or mark not in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            continue
        if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == script:
            continue  # the script's own children (a pipeline's other end): not left over
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:120]
        os.kill(int(pid), signal.SIGKILL)
        killed.append(f"{pid} {cmd}")
    except OSError:
        pass
if killed:
    print("### reap: killed left-over processes of this run:", *killed, sep="\n    ")
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20).stdout.strip() or "nothing"
    except (OSError, subprocess.SubprocessError) as e:
        apps = f"(nvidia-smi: {e})"
    print("### reap: on the GPU now:", apps)
REAP
  [ -s "$LANES/reap.txt" ] && tee -a "$OUT" < "$LANES/reap.txt"
  return 0
}

lanes() {  # lanes FUNC...: the steps of each FUNC in a lane of its own, all at once; each lane
  # writes its own results file (beside the main one, so that it comes back after a timeout too),
  # merged into the main one in order once every lane ended. Only for checks of correctness:
  # the lanes share the GPU and the cores, so nothing timed runs in one.
  local f i=0 main=$OUT
  if [ $DRY -eq 1 ]; then
    for f in "$@"; do "$f"; done
    return
  fi
  for f in "$@"; do
    ( LANE=$f OUT="${main%.txt}_$f.txt" STATUS=0; : > "$OUT"; "$f"; echo $STATUS > "$LANES/$f" ) &
  done
  wait
  for f in "$@"; do
    cat "${main%.txt}_$f.txt" >> "$main" && rm -f "${main%.txt}_$f.txt"
    [ "$(cat "$LANES/$f" 2>/dev/null)" = 0 ] || STATUS=1
  done
}

if [ $DRY -eq 0 ]; then
  {
    echo "# piper GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# device $(nvidia-smi --query-gpu=name,driver_version,memory.total \
                     --format=csv,noheader 2>&1 | head -1)"
    # the device tool's copy keeps the session's first commit as HEAD with the rest as changes:
    # PIPER_SOURCE_COMMIT (given in the call's command) names the commit the tree really is
    echo "# host $(hostname)  source ${PIPER_SOURCE_COMMIT:-unnamed (PIPER_SOURCE_COMMIT unset)}" \
         " git HEAD $(git rev-parse --short HEAD 2>/dev/null)" \
         "+ $(git status --porcelain 2>/dev/null | wc -l) changed files"
  } | tee "$OUT"
fi

[ $DRY -eq 1 ] || cat > "$DRIVER" <<'EOF'
"""Runs the kernels once (sanitizer mode) or times them against torch's copy (bench mode)."""
import sys
from functools import partial

import numpy as np
import torch

from piper_comm import _C

MiB = 1 << 20


def make_blocks(total: int, num: int, seed: int = 0):
    """num blocks tiling `total` bytes, copied to a shuffled order (a pack's access pattern)."""
    rng = np.random.default_rng(seed)
    lens = np.full(num, total // num, dtype=np.int64)
    lens[-1] += total - lens.sum()
    src_off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    order = rng.permutation(num)
    dst_off = np.zeros(num, dtype=np.int64)
    dst_off[order] = np.concatenate([[0], np.cumsum(lens[order])[:-1]])
    return torch.from_numpy(np.stack([src_off, dst_off, lens])).cuda()


def sanitize():
    s = torch.cuda.current_stream().cuda_stream
    src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
    table = torch.tensor([[0, 3, 1000, 77], [5, 2001, 20000, 9000], [999, 4097, 0, 33]],
                         dtype=torch.int64, device="cuda")
    _C.cuda_copy_blocks(src.data_ptr() + 1, dst.data_ptr(), table.data_ptr(), 4, s)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 2], dtype=torch.int64, device="cuda")
    row, slot = 24, 7 * 24 + 8
    x = torch.randint(0, 256, (int(counts.sum()) * row,), dtype=torch.uint8, device="cuda")
    slots = torch.zeros(8 * slot, dtype=torch.uint8, device="cuda")
    back = torch.zeros_like(x)
    _C.cuda_pack_alltoallv(x.data_ptr(), slots.data_ptr(), counts.data_ptr(), 8, row, slot, s)
    _C.cuda_unpack_alltoallv(slots.data_ptr(), back.data_ptr(), counts.data_ptr(), 8, row, slot, s)
    torch.cuda.synchronize()
    assert torch.equal(back, x), "pack/unpack round trip differs"
    print("sanitizer driver: ok")


def timed(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(start, end):
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return float(np.median([a.elapsed_time(b) for a, b in zip(start, end)])) * 1e-3


def bench():
    s = torch.cuda.current_stream().cuda_stream
    print(f"# device {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("# GB/s = bytes copied / median time (each byte read once and written once)")
    print(f"# {'MiB':>6} {'case':<28} {'time_us':>10} {'GB/s':>8} {'%ceil':>6}")
    for mib in (16, 64, 256):
        n = mib * MiB
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ceiling = timed(partial(dst.copy_, src))
        rows = [("torch copy_ (ceiling)", ceiling)]
        for num in (8, 64, 1024):
            table = make_blocks(n, num)
            t = timed(partial(_C.cuda_copy_blocks, src.data_ptr(), dst.data_ptr(),
                              table.data_ptr(), num, s))
            rows.append((f"copy_blocks K={num}", t))
        for peers in (8, 64):
            row_bytes = 4096 * 2  # bf16 hidden 4096
            count = n // (peers * row_bytes)
            counts = torch.full((peers,), count, dtype=torch.int64, device="cuda")
            slot = count * row_bytes
            t = timed(partial(_C.cuda_pack_alltoallv, src.data_ptr(), dst.data_ptr(),
                              counts.data_ptr(), peers, row_bytes, slot, s))
            rows.append((f"pack_alltoallv P={peers} eq", t))
            t = timed(partial(_C.cuda_unpack_alltoallv, src.data_ptr(), dst.data_ptr(),
                              counts.data_ptr(), peers, row_bytes, slot, s))
            rows.append((f"unpack_alltoallv P={peers} eq", t))
        for name, t in rows:
            print(f"  {mib:>6} {name:<28} {t * 1e6:>10.1f} {n / t / 1e9:>8.1f} "
                  f"{100 * ceiling / t:>6.1f}")


if __name__ == "__main__":
    sanitize() if sys.argv[1:] == ["sanitize"] else bench()
EOF

# 0. What the machine has: MPI, torch's NCCL (several ranks on one GPU need >= 2.30: with an
#    older one every multi-rank step runs over the host-staged transport, PIPER_INTER=mpi, and
#    the NCCL baseline is left out), the native block-scaled FP8 GEMM, CuPy.
NCCL_OK=1
if [ $DRY -eq 0 ]; then
  step environment 60 "$PY" -c "
import importlib.util
facts = {  # each read on its own: one that fails does not hide the others
    'torch': 'torch.__version__, torch.version.cuda',
    'device': 'torch.cuda.get_device_name(), torch.cuda.get_device_capability()',
    'nccl (torch)': 'torch.cuda.nccl.version()',
    'libnccl mapped': 'sorted({l.split()[-1] for l in open(\"/proc/self/maps\") if \"libnccl\" in l})',
    'mpi': 'importlib.import_module(\"mpi4py.MPI\").Get_library_version().splitlines()[0]',
    'F.scaled_mm': 'hasattr(importlib.import_module(\"torch.nn.functional\"), \"scaled_mm\")',
    'cupy': 'importlib.util.find_spec(\"cupy\") is not None'}
import importlib, torch
bad = 0
for name, expr in facts.items():
    try:
        print(name, eval(expr))
    except Exception as e:
        bad += 1
        print(name, 'FAILED:', type(e).__name__, e)
raise SystemExit(bad > 0)"
  echo "### mpirun: $MPIRUN" | tee -a "$OUT"
  step nccl_version 60 "$PY" -c "import sys, torch; v = tuple(torch.cuda.nccl.version()); print('torch NCCL', v); sys.exit(v < (2, 30, 0))" || NCCL_OK=0
  if [ $NCCL_OK -eq 0 ]; then
    export PIPER_INTER=mpi
    echo "### note: torch's NCCL < 2.30 cannot run several ranks on one GPU: multi-rank steps use PIPER_INTER=mpi (host-staged), NCCL tests skip, no NCCL baseline" | tee -a "$OUT"
  fi
else
  echo "### environment (limit 60 s): torch, CUDA, torch's NCCL version (a carried .whl/libnccl.so.2 preloaded), MPI, F.scaled_mm, CuPy; NCCL < 2.30 -> PIPER_INTER=mpi and no NCCL baseline"
fi

# 1. Build (what `make build` runs; no network: pybind11, cmake, ninja must be installed).
#    A fresh build directory: CMake caches the MPI wrapper it found, and the MPI in front may
#    have changed since (the carried MPICH over the image's Open MPI).
BUILD_DIR=${PIPER_BUILD_DIR:-build}
[ $DRY -eq 1 ] || rm -rf "$BUILD_DIR"
step build 300 "$PY" -m pip install --no-build-isolation --no-deps -e .

# 2. The NCCL gate: 4 ranks on the one GPU over Piper's NCCL transport and torch's own NCCL
#    group (tests/gpu/comm_cases.py:nccl_gate). If it fails, everything after it runs
#    host-staged (PIPER_INTER=mpi, the delegate gloo) as in the first GPU run, rather than
#    every step failing on NCCL.
if [ $NCCL_OK -eq 1 ]; then
  if ! step nccl_gate 90 env PIPER_INTER=nccl "$MPIRUN" -n 4 "$PY" -c "from tests.gpu.comm_cases import nccl_gate; print(nccl_gate(local_size=2))"; then
    NCCL_OK=0
    export PIPER_INTER=mpi
    echo "### note: the NCCL gate failed: every later step runs host-staged (PIPER_INTER=mpi), NCCL tests skip, no NCCL baseline" | tee -a "$OUT"
  fi
fi
NCCL_ALGOS=$([ $NCCL_OK -eq 1 ] && echo halo,flat,nccl || echo halo,flat)

SECTION=1
# Part 1: correctness, in three lanes at once (they share the GPU and the 16 cores; nothing in
# them is timed).
#  collectives: the GPU tests: pack kernels; the CUDA context over IPC, 2 and 4 ranks on the
#    one device (1 node); all_to_all(_v) on CUDA tensors (tests/gpu/test_comm_cuda.py: 4 ranks
#    as 2 nodes of 2 and 1 node of 4, every algorithm and dtype against the host result, NCCL
#    and host-staged, CuPy, CUDA-graph capture, bad input, the torch backend). The context and
#    kernels first: every collective on CUDA depends on the IPC segment and its fences.
collectives() {
  step nvidia-smi 30 nvidia-smi
  step build_config 10 grep -E '^(MPI_C_COMPILER|MPI_C_HEADER_DIR|MPI_mpi_LIBRARY|NCCL_INCLUDE_DIR|CMAKE_CUDA_ARCHITECTURES|CMAKE_CUDA_COMPILER):' "$BUILD_DIR/CMakeCache.txt"
  step build_info 60 "$PY" -c "import piper_comm, torch; print(piper_comm.build_info()); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  # one rank (no IPC peer), then 2 nodes of one rank (no IPC peer; the device transport)
  step smoke_one_rank 60 "$MPIRUN" -n 1 "$PY" -c "from tests.gpu.comm_cases import small; print(small(local_size=1))"
  step smoke_two_nodes_of_one 60 "$MPIRUN" -n 2 "$PY" -c "from tests.gpu.comm_cases import small; print(small(local_size=1))"
  step pytest_gpu_context 200 "$PY" -m pytest -ra -m gpu tests/gpu --ignore=tests/gpu/test_comm_cuda.py
  step pytest_gpu_comm 240 "$PY" -m pytest -ra tests/gpu/test_comm_cuda.py
}
#  moe: everything above the collective on CUDA against CPU: the MoE layer (every dispatcher,
#    dedup, chunked with offload, fp32, bf16-mixed, FP8 dispatch) on 2 nodes of 2 and 1 node of
#    4, 20 training steps.
moe() {
  step moe_layer_cuda 180 "$MPIRUN" -genv PIPER_LOCAL_SIZE 2 -genv OMP_NUM_THREADS 2 -n 4 "$PY" bench/gpu_moe_check.py layer
  step moe_layer_cuda_one_node 180 "$MPIRUN" -genv OMP_NUM_THREADS 2 -n 4 "$PY" bench/gpu_moe_check.py layer
  step train_cuda 240 "$PY" bench/gpu_moe_check.py train --steps 20 --ranks 4
  # with NCCL in use, the host-staged gloo delegate (the fallback of machines whose NCCL cannot
  # serve the ranks) is not exercised by train_cuda: once more on it, fp32
  [ $NCCL_OK -eq 1 ] && step train_cuda_staged 150 env PIPER_INTER=mpi PIPER_TORCH_CUDA_DELEGATE=gloo "$PY" bench/gpu_moe_check.py train --steps 20 --ranks 4 --precisions fp32
}
#  sanitizer: compute-sanitizer on the kernels' driver, the context's IPC round trip and one
#    small collective (2 ranks).
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
[ $DRY -eq 1 ] && SAN=${SAN:-compute-sanitizer}
sanitizer() {
  if [ -z "$SAN" ]; then
    [ $DRY -eq 1 ] || printf '%s\n' memcheck racecheck memcheck_context memcheck_collective \
      >> "$LANES/known"
    if [ -z "$ONLY" ] || [[ "$ONLY" =~ ,(memcheck|racecheck|memcheck_context|memcheck_collective), ]]
    then
      echo "### compute-sanitizer not found: memcheck/racecheck NOT run" | tee -a "$OUT"
      STATUS=1
    fi
    return
  fi
  step memcheck 120 "$SAN" --tool memcheck --error-exitcode 1 "$PY" "$DRIVER" sanitize
  step racecheck 120 "$SAN" --tool racecheck --error-exitcode 1 "$PY" "$DRIVER" sanitize
  step memcheck_context 150 "$MPIRUN" -n 2 "$SAN" --tool memcheck --error-exitcode 1 "$PY" -c "from tests.gpu.cases import ipc_segment_round_trip as f; print(f(rows=256))"
  # host-staged: under memcheck NCCL would instrument its whole device library in each rank
  step memcheck_collective 150 env PIPER_INTER=mpi "$MPIRUN" -n 2 "$SAN" --tool memcheck --error-exitcode 1 "$PY" -c "from tests.gpu.comm_cases import small; print(small(local_size=2))"
}
if [ -z "$PART" ] || [ "$PART" = 1 ]; then
  if [ $NCCL_OK -eq 1 ]; then  # one lane at a time: NCCL serves few ranks per GPU (above)
    for lane in collectives moe sanitizer; do "$lane"; done
  else
    lanes collectives moe sanitizer
    reap
  fi
fi

SECTION=2
# Part 2: the benchmarks, one at a time with nothing beside them: the collective against torch's
# NCCL, the MoE layer in every precision, the kernels against a device copy (the HBM ceiling).
# (Piper's figures alone when the run with the NCCL baseline beside them fails)
step bench_nccl 150 "$MPIRUN" -n 4 "$PY" -m piper_comm.bench --device cuda --local-size 2 --algos "$NCCL_ALGOS" -b 1K -e 64M -f 4 -n 10 -w 3 -T 60 \
  || { [ $NCCL_OK -eq 1 ] && step bench_piper 120 "$MPIRUN" -n 4 "$PY" -m piper_comm.bench --device cuda --local-size 2 --algos halo,flat -b 1K -e 64M -f 4 -n 10 -w 3 -T 60; }
step bench_pack 90 "$PY" "$DRIVER" bench
step bench_moe_layer 150 "$MPIRUN" -genv PIPER_LOCAL_SIZE 2 -n 4 "$PY" bench/moe_layer.py --device cuda --iters 5 --warmup 2
step bench_moe_layer_fp8 150 "$MPIRUN" -n 4 "$PY" bench/moe_layer.py --device cuda --iters 5 --warmup 2 --hidden 2048 --ffn-hidden 1024 --tokens 4096 --variants reference,piper-nodedup --precisions bf16-mixed,bf16-mixed+fp8-dequantize,bf16-mixed+fp8-scaled
# Where a small call's time goes on the device (py-spy --native on rank 0, from the carried
# wheel): the host-staged path's floor, flat and HALO, 1 KiB per rank.
step profile_flat_1k 60 env PIPER_INTER=mpi "$PY" bench/profile_call.py -n 4 --local-size 2 --algo flat --bytes 1024 --seconds 4 --device cuda
step profile_halo_1k 60 env PIPER_INTER=mpi "$PY" bench/profile_call.py -n 4 --local-size 2 --algo halo --bytes 1024 --seconds 4 --device cuda

if [ $DRY -eq 1 ]; then
  echo "# dry run: nothing was run"
  exit 0
fi
set +x
if [ -n "$ONLY" ]; then  # a name --steps gave that no step has
  for name in ${ONLY//,/ }; do
    if ! grep -qx "$name" "$LANES/known"; then
      echo "### --steps: no step is named $name NOT run" | tee -a "$OUT"
      STATUS=1
    fi
  done
fi
VERDICT=$([ $STATUS -eq 0 ] && echo "OK" || echo "SOME STEP FAILED")
SUMMARY=$(grep -aE '^### .*(: exit [0-9]+ after|TIMED OUT|NOT run)' "$OUT" | sed 's/^### /  /')
printf '### summary\n%s\n' "$SUMMARY" | tee -a "$OUT"
echo "### overall${PART:+ (part $PART)}: $VERDICT -> $OUT" | tee -a "$OUT"
exit $STATUS
