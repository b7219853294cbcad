#!/usr/bin/env bash
# Native backtraces of the ranks of a GPU check step that die of a signal, on the lent GPU
# machine (no gdb there; cuda-gdb reads core files):
#
#   bash bench/gpu_backtrace.sh STEP [STEP...]   # e.g. pytest_gpu_context
#
# Turns core dumps on (this shell's limit and the VM's core_pattern, /tmp/core.<exe>.<pid>),
# builds with symbols (PIPER_BUILD_TYPE=RelWithDebInfo: Release strips them), runs the steps
# through bench/gpu_check.sh --steps, then prints the first 40 frames of every core's crashing
# thread (also into the device tool's $OUT). PYTEST_ADDOPTS narrows a pytest step ("-x -k name").
cd "$(dirname "$0")/.." || exit 1
[ $# -gt 0 ] || { echo "usage: bash bench/gpu_backtrace.sh STEP [STEP...]" >&2; exit 2; }
ulimit -c unlimited
rm -f /tmp/core.*
echo '/tmp/core.%e.%p' > /proc/sys/kernel/core_pattern || echo "could not set core_pattern"
STEPS=$(IFS=,; echo "$*")
PIPER_BUILD_TYPE=${PIPER_BUILD_TYPE:-RelWithDebInfo} bash bench/gpu_check.sh --steps "$STEPS"
GDB=$(command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2>/dev/null)
PY=${PYTHON:-python3}
TRACES=/dev/null  # under the device tool, a file in its $OUT folder (it comes back)
[ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && TRACES=$OUT/backtraces_$(date -u +%Y%m%d_%H%M%S).txt
{
  for core in $(ls /tmp/core.* 2>/dev/null | head -4); do
    echo "### backtrace of $core"
    timeout 120 "$GDB" -q -batch -ex "set pagination off" -ex "bt 40" "$(command -v "$PY")" \
      "$core" 2>&1 | grep -v "^\[New LWP\|^warning: \|Reading symbols\|^Downloading" | tail -60
  done
  [ -n "$(ls /tmp/core.* 2>/dev/null)" ] || echo "### no core file was written"
} | tee "$TRACES"
