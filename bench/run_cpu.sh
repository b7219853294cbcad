#!/usr/bin/env bash
# Records the CPU all-to-all benchmark (Piper halo/flat/pairwise vs MPI and torch gloo) into
# bench/results/: by default 8 ranks as 2 emulated nodes of 4 (ls4) and as 8 nodes of 1 rank
# (ls1). Each run writes cpu_alltoall_np{N}_ls{K}.txt (header + nccl-tests-style tables),
# .json and .png.
# Usage: [LAYOUTS="2:1 4:2 8:4"] [ALGOS=halo,flat,mpi] [MAXBYTES=16M] bench/run_cpu.sh
#        [extra bench flags, e.g. -f 4]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results
mkdir -p "$OUT"
LAYOUTS=${LAYOUTS:-"8:4 8:1"}
ALGOS=${ALGOS:-halo,flat,pairwise,mpi,gloo}
MAXBYTES=${MAXBYTES:-64M}
for layout in $LAYOUTS; do
  NP=${layout%%:*} LS=${layout##*:}
  base="$OUT/cpu_alltoall_np${NP}_ls${LS}"
  cmd=(.venv/bin/mpirun -n "$NP" .venv/bin/python -m piper_comm.bench --op alltoall
       -b 8 -e "$MAXBYTES" -f 2 -n 20 -w 5 --algos "$ALGOS" --local-size "$LS"
       --json "$base.json" --plot "$base.png" -T 600 "$@")
  {
    echo "# command: ${cmd[*]}"
    echo "# date -u: $(date -u)"
    echo "# git rev-parse HEAD: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "# nproc: $(nproc)"
    lscpu | head | sed 's/^/# lscpu: /'
    echo "#"
  } > "$base.txt"
  echo "== $base (progress on stderr)" >&2
  start=$(date +%s)
  "${cmd[@]}" >> "$base.txt"
  echo "# wall time: $(( $(date +%s) - start )) s" >> "$base.txt"
done
