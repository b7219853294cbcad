#!/usr/bin/env bash
# Records the MoE layer benchmark (bench/moe_layer.py: Piper's expert-parallel MoELayer,
# with and without node dedup, vs the plain data-parallel PyTorch ReferenceMoE; forward +
# backward) on this CPU host into bench/results/moe_layer_cpu_np{N}_ls{K}[_TAG].{txt,json}:
#   np4_ls2       4 ranks as 2 emulated nodes of 2, default shape (16 experts, top-4)
#   np8_ls4       8 ranks as 2 emulated nodes of 4, default shape
#   np4_ls2_e64   4 ranks, 64 experts top-6 (8 groups, 4 chosen): more experts per rank
# Each .txt starts with a header (date, git, machine, exact command); about 1-2 minutes in all.
# Usage: bench/run_moe_layer.sh [extra bench flags, e.g. --iters 20]
#        bench/run_moe_layer.sh dispatchers [extra bench flags]
#   the dispatcher comparison alone (--dispatchers alltoall,halo,ppmoe --chunks 1,2,auto, with
#   the resource model's prediction), 4 ranks as 2 nodes of 2 then as 1 node of 4, into
#   bench/results/moe_dispatchers_cpu.txt and moe_dispatchers_cpu_np4_ls{2,4}.json
#        bench/run_moe_layer.sh precisions [extra bench flags]
#   the precision comparison alone: 4 ranks as one node (EP=4), hidden 512, 16 experts top-4,
#   one shared expert, 1024 tokens per rank, Piper's layer in fp32, bf16-mixed and
#   bf16-mixed + fp8 dispatch against torchtitan's MoE layer as shipped (--peer torchtitan,
#   needs torchtitan installed) and the fp32 reference, into
#   bench/results/moe_layer_cpu_np4_ls4_precisions.{txt,json}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results
mkdir -p "$OUT"
run() {  # run NP LS TAG [bench flags...]
  local np=$1 ls=$2 tag=$3
  shift 3
  local base="$OUT/moe_layer_cpu_np${np}_ls${ls}${tag}"
  local cmd=(.venv/bin/mpirun -genv PIPER_LOCAL_SIZE "$ls" -n "$np" .venv/bin/python
             bench/moe_layer.py --json "$base.json" "$@")
  {
    echo "# date -u: $(date -u '+%Y-%m-%dT%H:%M:%SZ')  git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
    echo "# command: ${cmd[*]}"
  } > "$base.txt"
  echo "== $base" >&2
  local start
  start=$(date +%s)
  "${cmd[@]}" >> "$base.txt"
  echo "# wall time: $(( $(date +%s) - start )) s" >> "$base.txt"
}
dispatchers() {  # dispatchers [bench flags...]: both runs appended to one .txt
  local txt="$OUT/moe_dispatchers_cpu.txt"
  echo "# date -u: $(date -u '+%Y-%m-%dT%H:%M:%SZ')  git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), no GPU" > "$txt"
  local ls
  for ls in 2 4; do
    local cmd=(.venv/bin/mpirun -genv PIPER_LOCAL_SIZE "$ls" -n 4 .venv/bin/python
               bench/moe_layer.py --dispatchers alltoall,halo,ppmoe --chunks 1,2,auto
               --json "$OUT/moe_dispatchers_cpu_np4_ls${ls}.json" "$@")
    echo "== $txt (PIPER_LOCAL_SIZE $ls)" >&2
    {
      echo
      echo "# uptime before: $(uptime)"
      echo "# command: ${cmd[*]}"
    } >> "$txt"
    "${cmd[@]}" >> "$txt"
    echo "# uptime after: $(uptime)" >> "$txt"
  done
}
if [[ ${1:-} == precisions ]]; then
  shift
  run 4 4 _precisions --hidden 512 --variants reference,piper-nodedup \
    --precisions fp32,bf16-mixed,bf16-mixed+fp8 --peer torchtitan "$@"
  exit 0
fi
if [[ ${1:-} == dispatchers ]]; then
  shift
  dispatchers "$@"
  exit 0
fi
run 4 2 "" "$@"
run 8 4 "" "$@"
run 4 2 _e64 --iters 5 --warmup 2 --num-experts 64 --top-k 6 --num-groups 8 --topk-groups 4 "$@"
