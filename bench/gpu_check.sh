#!/usr/bin/env bash
# The GPU check of the CUDA pack kernels (csrc/cuda/pack.cu), for the lent GPU machine (no network).
# Builds the extension, prints the device and build, runs the GPU tests, runs compute-sanitizer
# (memcheck, racecheck) on a small driver of the kernels, and times copy_blocks and
# pack_alltoallv against a plain device-to-device torch copy (the copy ceiling) at 16/64/256 MiB.
# Everything goes to bench/results/gpu_<date>.txt. A failing step is recorded and the next runs.
#
#   bash bench/gpu_check.sh            # PYTHON=python3 by default (torch with CUDA required)
set -x
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
mkdir -p bench/results
OUT="bench/results/gpu_$(date -u +%Y%m%d_%H%M%S).txt"
DRIVER=$(mktemp /tmp/piper_gpu_driver.XXXXXX.py)
trap 'rm -f "$DRIVER"' EXIT
STATUS=0

step() {  # step NAME CMD...: runs CMD, records its output and exit status in $OUT
  local name=$1
  shift
  echo "### $name: $*" | tee -a "$OUT"
  "$@" 2>&1 | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  echo "### $name: exit $rc" | tee -a "$OUT"
  [ "$rc" -eq 0 ] || STATUS=1
}

{
  echo "# piper GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# host $(hostname)  commit $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} | tee "$OUT"

cat > "$DRIVER" <<'EOF'
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

# 1. Build (what `make build` runs; no network: pybind11, cmake, ninja must be installed).
step build "$PY" -m pip install --no-build-isolation --no-deps -e .

# 2. Device and build.
step nvidia-smi nvidia-smi
step build_info "$PY" -c "import piper_comm, torch; print(piper_comm.build_info()); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

# 3. GPU tests.
step pytest "$PY" -m pytest -ra -m gpu tests/gpu

# 4. compute-sanitizer on the driver.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  step memcheck "$SAN" --tool memcheck --error-exitcode 1 "$PY" "$DRIVER" sanitize
  step racecheck "$SAN" --tool racecheck --error-exitcode 1 "$PY" "$DRIVER" sanitize
else
  echo "### compute-sanitizer not found: memcheck/racecheck NOT run" | tee -a "$OUT"
  STATUS=1
fi

# 5. Timing against the copy ceiling.
step bench "$PY" "$DRIVER" bench

echo "### overall: $([ $STATUS -eq 0 ] && echo OK || echo 'SOME STEP FAILED') -> $OUT" | tee -a "$OUT"
exit $STATUS
