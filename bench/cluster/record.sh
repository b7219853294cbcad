#!/usr/bin/env bash
# Records the measurements on the emulated cluster (cluster.sh: network namespaces, a tc tbf
# egress cap per node, no added latency) into bench/results/cluster/. EMULATED figures: one
# 2-CPU machine plays every node; the "network" is a veth pair through a bridge, capped by tbf.
# Each job is one `cluster.sh run` (up, link check, job, down), so every figure comes with a
# passing link check; its log (link check, veth byte counters of the job) is kept beside it.
#
# Usage (root; hold the machine's lock around it: flock /tmp/piper.lock bash ...):
#   bench/cluster/record.sh a2a    piper_comm.bench, 2 x 2 and 2 x 4 ranks, 200mbit and 1gbit
#                                  (halo, flat, mpi, gloo; 1 KiB - 16 MiB per rank), ~4 min
#   bench/cluster/record.sh moe [RATE]  bench/moe_layer.py, one job per dispatcher (so the
#                                  veth counters are that dispatcher's), top-8 and top-2, at
#                                  RATE (200mbit; 10gbit: the same jobs without a link bottleneck);
#                                  MOE_TOPKS="8 2", MOE_DISPATCHERS="alltoall halo ppmoe" and
#                                  MOE_PPN=2 (ranks per node) select
#   bench/cluster/record.sh train  python -m piper_moe.train, dedup on and off, 200mbit
#   bench/cluster/record.sh auto [RATE]  calibrate on 2 x 4, then what algorithm="auto" picks
#                                  with the default and with the calibrated links (1gbit)
# then `python bench/cluster/report.py` writes the summaries and plots from what is recorded.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=bench/results/cluster
mkdir -p "$OUT"
PY=.venv/bin/python
CLUSTER=bench/cluster/cluster.sh

header() {  # header FILE COMMAND...: what every recorded .txt starts with
  local f=$1
  shift
  {
    echo "# EMULATED cluster (bench/cluster/cluster.sh): network namespaces + veth + bridge, tc tbf"
    echo "# egress cap per node, no added latency; all nodes share one machine's CPUs"
    echo "# command: $*"
    echo "# date -u: $(date -u '+%Y-%m-%dT%H:%M:%SZ')  git: $(git rev-parse HEAD)"
    echo "# working tree: $(git status --porcelain -- csrc piper_comm piper_moe | wc -l) files of csrc/ piper_comm/ piper_moe/ differ from that commit (work in progress of others in the shared tree): $(git status --porcelain -- csrc piper_comm piper_moe | awk '{print $2}' | tr '\n' ' ')"
    echo "# machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), kernel $(uname -r)"
  } > "$f"
}

job() {  # job BASE NODES PPN RATE PROGRAM...: one cluster run, stdout to BASE.txt
  local base=$1 n=$2 k=$3 rate=$4
  shift 4
  local cmd=("$CLUSTER" run -n "$n" -k "$k" -r "$rate" -c "$base.counters.json" -- "$@")
  header "$base.txt" "${cmd[*]}"
  echo "== $base" >&2
  local start rc=0
  start=$(date +%s)
  "${cmd[@]}" >> "$base.txt" 2> "$base.log" || rc=$?
  grep -E "^link check|BYPASS|FAILED" "$base.log" | sed 's/^/# /' >> "$base.txt" || true
  echo "# link bytes of the job: $(cat "$base.counters.json" 2>/dev/null || echo none)" >> "$base.txt"
  echo "# wall time: $(( $(date +%s) - start )) s, exit $rc" >> "$base.txt"
  [[ $rc -eq 0 ]] || { echo "record.sh: $base failed (exit $rc), see $base.log" >&2; exit $rc; }
}

a2a() {
  local rate k base
  for rate in 200mbit 1gbit; do
    for k in 2 4; do
      base=$OUT/a2a_2x${k}_${rate}
      job "$base" 2 "$k" "$rate" "$PY" -m piper_comm.bench -b 1K -e 16M -f 4 -n 5 -w 2 \
        --algos halo,flat,mpi,gloo -T 600 --json "$base.json" --plot "$base.png"
    done
  done
}

auto() {  # auto [RATE]: calibrate on 2 x 4, then halo, flat and auto with the default and the
          # calibrated links (what algorithm="auto" picks, and what it costs)
  local rate=${1:-1gbit} links base
  local platform=$OUT/auto_links_2x4_${rate}_platform.yaml
  job "$OUT/auto_links_2x4_${rate}_calibrate" 2 4 "$rate" "$PY" -m piper_moe.cli.calibrate \
    --out "$platform" --name "emulated-2x4-$rate"
  for links in default calibrated; do
    base=$OUT/auto_links_2x4_${rate}_$links
    job "$base" 2 4 "$rate" env "PIPER_PLATFORM=$([[ $links == calibrated ]] && echo "$platform")" \
      "$PY" -m piper_comm.bench -b 1K -e 4M -f 4 -n 10 -w 2 --algos halo,flat,auto -T 600 \
      --json "$base.json"
  done
  grep -h "^# auto" "$OUT"/auto_links_2x4_"${rate}"_{default,calibrated}.txt
}

# DeepSeek-like routing at a CPU-sized width: 64 routed experts in 8 groups, 4 groups chosen per
# token, top-8 (and top-2 for contrast), 1 shared expert; 512 tokens per rank of hidden 256.
MOE_SHAPE=(--hidden 256 --ffn-hidden 128 --num-experts 64 --num-groups 8 --topk-groups 4
           --tokens 512 --iters 5 --warmup 2)
moe() {  # moe [RATE]: 200mbit by default; 10gbit gives the same jobs with a link that is not
         # the bottleneck (CPU-bound), so that capped - uncapped = the exposed link time
  local rate=${1:-200mbit} k=${MOE_PPN:-2} topk disp base
  for topk in ${MOE_TOPKS:-8 2}; do
    for disp in ${MOE_DISPATCHERS:-alltoall halo ppmoe}; do
      base=$OUT/moe_2x${k}_${rate}_top${topk}_${disp}
      job "$base" 2 "$k" "$rate" "$PY" bench/moe_layer.py "${MOE_SHAPE[@]}" --top-k "$topk" \
        --dispatchers "$disp" --json "$base.json"
    done
  done
}

train() {
  local dedup base cfg
  for dedup in on off; do
    base=$OUT/train_2x2_200mbit_dedup_${dedup}
    cfg=bench/cluster/train_ep4_dedup_${dedup}.yaml
    job "$base" 2 2 200mbit "$PY" -m piper_moe.train --config "$cfg" --out "runs/cluster_$dedup" \
      --quiet
    cp "runs/cluster_$dedup/metrics.json" "$base.metrics.json" 2>/dev/null || true
  done
}

case ${1:-} in
  a2a) a2a ;;
  moe) moe "${2:-200mbit}" ;;
  train) train ;;
  auto) auto "${2:-1gbit}" ;;
  *) echo "usage: bench/cluster/record.sh a2a|moe|train|auto" >&2; exit 2 ;;
esac
