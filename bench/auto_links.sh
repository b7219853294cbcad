#!/usr/bin/env bash
# Records what algorithm="auto" picks with the default links against the links calibrated on
# this machine: calibrate (all-to-all part) on NP ranks in nodes of LS, then the benchmark with
# halo, flat and auto (PIPER_PLATFORM unset, then set to the calibrated file), same sizes.
# Writes bench/results/auto_links_np{NP}_ls{LS}_{default,calibrated}.{txt,json} and the
# calibrated platform bench/results/platform_cpu_np{NP}_ls{LS}.yaml.
# Usage: [NP=8] [LS=4] bench/auto_links.sh [extra bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results
NP=${NP:-8} LS=${LS:-4}
platform="$OUT/platform_cpu_np${NP}_ls${LS}.yaml"
PIPER_LOCAL_SIZE=$LS OMP_NUM_THREADS=1 .venv/bin/mpirun -n "$NP" .venv/bin/python \
  -m piper_moe.cli.calibrate --out "$platform" --name "cpu-np${NP}-ls${LS}"
for links in default calibrated; do
  base="$OUT/auto_links_np${NP}_ls${LS}_${links}"
  cmd=(.venv/bin/mpirun -n "$NP" .venv/bin/python -m piper_comm.bench --op alltoall
       -b 1K -e 4M -f 4 -n 100 -w 10 --algos halo,flat,auto --local-size "$LS"
       --json "$base.json" -T 600 "$@")
  {
    echo "# command: $([ "$links" = calibrated ] && echo "PIPER_PLATFORM=$platform ")${cmd[*]}"
    echo "# date -u: $(date -u)"
    echo "# git rev-parse HEAD: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "# nproc: $(nproc)"
    echo "#"
  } > "$base.txt"
  if [ "$links" = calibrated ]; then
    PIPER_PLATFORM="$platform" "${cmd[@]}" >> "$base.txt"
  else
    env -u PIPER_PLATFORM "${cmd[@]}" >> "$base.txt"
  fi
done
grep -h "^# auto" "$OUT"/auto_links_np"${NP}"_ls"${LS}"_*.txt
