#!/usr/bin/env bash
# An emulated cluster on one Linux machine: N "nodes" as network namespaces, each with a veth
# into one bridge and a tc tbf cap on the node's egress (its "NIC"); an MPI job across them
# with MPICH's hydra (one proxy per namespace, entered by rsh.sh), shared memory inside a node
# and OFI tcp between nodes. EMULATED: the link has a bandwidth cap but no added latency (this
# kernel has no netem); every figure measured here is an emulated-network figure.
#
# Usage (root; `ip`, `tc`, `unshare`, `flock`, `timeout` on PATH):
#   bench/cluster/cluster.sh run [options] -- PROGRAM [ARGS...]   up, check, job, down
#   bench/cluster/cluster.sh up [options]      bring the cluster up (and leave it up)
#   bench/cluster/cluster.sh check [options]   the link check on a cluster that is up
#   bench/cluster/cluster.sh mpi [options] -- PROGRAM [ARGS...]   a job on a cluster that is up
#   bench/cluster/cluster.sh down [options]    remove everything this script created (idempotent)
#   bench/cluster/cluster.sh status [options]  what of it exists
# Options (each also an environment variable):
#   -n NODES   PIPER_CLUSTER_NODES   nodes (default 2)
#   -k PPN     PIPER_CLUSTER_PPN     MPI ranks per node (default 2)
#   -r RATE    PIPER_CLUSTER_RATE    tc rate of each node's egress (default 200mbit; e.g. 1gbit)
#   -p PREFIX  PIPER_CLUSTER_PREFIX  name prefix of everything created (default pcl, <= 6 chars)
#   -s NET     PIPER_CLUSTER_NET     the /24 used, as its first 3 octets (default 10.77.0)
#   -t SECS    PIPER_CLUSTER_TIMEOUT bound on the job (default 900 s)
#   -c FILE    PIPER_CLUSTER_COUNTERS  write each node's veth byte counters over the job (JSON)
#              PIPER_CLUSTER_NETMOD  MPICH's netmod between nodes (default ofi, with the tcp
#                                    provider; ucx here bypasses the link through shared memory,
#                                    which the link check catches: a way to see it fail)
#   --no-check                       skip the link check in `run` (never for recorded figures)
#
# What it creates, named from PREFIX (P): namespaces Pn0..Pn{N-1} (also the nodes' host names),
# host-side veths Pv0.., inside each namespace the veth Pnic with NET.(i+1)/24 and the tbf,
# the bridge Pbr with NET.254/24 (the address hydra's proxies call back to), and
# /etc/netns/Pn*/hosts (`ip netns exec` mounts it over /etc/hosts, so node names resolve; and
# /etc/netns itself when it did not exist).
# Each object is written to the state file /run/piper-cluster/P.state BEFORE it is created;
# `down` (and the trap of `run`, on exit, Ctrl-C, failure) removes exactly what that file lists,
# so a run killed with SIGKILL is cleaned by the next one (the empty lock file P.lock stays); a
# failed `up` removes what it made. Names or the subnet already in use by
# anything else make `up` refuse; it never changes an interface it did not create.
set -euo pipefail

fail() { echo "cluster.sh: $*" >&2; exit 2; }

# -- refusals first (bash builtins only, so they work whatever PATH holds)
if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
  fail "refusing: needs root (network namespaces, veth, bridge and tc all need CAP_NET_ADMIN);" \
       "run it with sudo, or on a machine where you are root"
fi
for tool in ip tc unshare flock timeout; do
  command -v "$tool" >/dev/null 2>&1 || fail "refusing: '$tool' is not on PATH (ip and tc: the" \
    "iproute2 package; unshare, flock, timeout: util-linux/coreutils)"
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PIPER_CLUSTER_PYTHON:-$ROOT/.venv/bin/python}
MPIEXEC=${PIPER_CLUSTER_MPIEXEC:-$ROOT/.venv/bin/mpiexec}
STATE_DIR=/run/piper-cluster
PROBE_BYTES=1048576   # the link check's all-to-all: 1 MiB per rank
PROBE_ROUNDS=5        # the first is a warm-up; the counters cover all of them
TBF_BURST=16kb        # small enough that small messages are rate-limited too
TBF_LIMIT=8mb         # queue: > 2x tcp_limit_output_bytes (4 MiB), so tbf never drops

cmd=${1:-}
[[ -n $cmd ]] || fail "usage: cluster.sh run|up|check|mpi|down|status [options] [-- PROGRAM ARGS]"
shift
NODES=${PIPER_CLUSTER_NODES:-2}
PPN=${PIPER_CLUSTER_PPN:-2}
RATE=${PIPER_CLUSTER_RATE:-200mbit}
PREFIX=${PIPER_CLUSTER_PREFIX:-pcl}
NET=${PIPER_CLUSTER_NET:-10.77.0}
JOB_TIMEOUT=${PIPER_CLUSTER_TIMEOUT:-900}
COUNTERS=${PIPER_CLUSTER_COUNTERS:-}
NETMOD=${PIPER_CLUSTER_NETMOD:-ofi}
CHECK=1
while [[ $# -gt 0 ]]; do
  case $1 in
    -n) NODES=$2; shift 2 ;;
    -k) PPN=$2; shift 2 ;;
    -r) RATE=$2; shift 2 ;;
    -p) PREFIX=$2; shift 2 ;;
    -s) NET=$2; shift 2 ;;
    -t) JOB_TIMEOUT=$2; shift 2 ;;
    -c) COUNTERS=$2; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --) shift; break ;;
    *) fail "unknown option '$1' (see the header of $0)" ;;
  esac
done
PROGRAM=("$@")
[[ $NODES =~ ^[0-9]+$ && $NODES -ge 1 && $NODES -le 200 ]] || fail "-n $NODES: 1..200 nodes"
[[ $PPN =~ ^[0-9]+$ && $PPN -ge 1 ]] || fail "-k $PPN: ranks per node must be >= 1"
[[ $PREFIX =~ ^[a-z][a-z0-9]{0,5}$ ]] || fail "-p $PREFIX: 1-6 lower-case letters/digits"
[[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || fail "-s $NET: the first 3 octets of a /24"
[[ $RATE =~ ^[0-9.]+[kmgt]?bit$ ]] || fail "-r $RATE: a tc rate such as 200mbit or 1gbit"
[[ $JOB_TIMEOUT =~ ^[0-9]+$ ]] || fail "-t $JOB_TIMEOUT: whole seconds"

STATE=$STATE_DIR/$PREFIX.state
BRIDGE=${PREFIX}br
NIC=${PREFIX}nic
ns() { echo "${PREFIX}n$1"; }
hostveth() { echo "${PREFIX}v$1"; }
log() { echo "[cluster $(date -u +%H:%M:%S)] $*" >&2; }

# One run at a time per prefix: the lock is held until this script exits.
mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/$PREFIX.lock"
flock -w 30 9 || fail "another cluster.sh with prefix '$PREFIX' holds $STATE_DIR/$PREFIX.lock"

# -- teardown: exactly what the state file lists, newest first; every step tolerates absence
teardown() {
  [[ -f $STATE ]] || return 0
  local kind name pids
  while read -r kind name; do
    # Only names this prefix can have produced (a damaged state file must not widen the reach).
    [[ $name == "$PREFIX"* || $name == "/etc/netns/$PREFIX"* || $name == /etc/netns ]] \
      || continue
    case $kind in
      parent) rmdir -- "$name" 2>/dev/null || true ;;  # rmdir: only if no other prefix uses it
      netns)
        if [[ -e /run/netns/$name ]]; then
          # Processes left in it (ranks of a killed job) were started by this script's jobs.
          pids=$(ip netns pids "$name" 2>/dev/null || true)
          if [[ -n $pids ]]; then
            kill -TERM $pids 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
              pids=$(ip netns pids "$name" 2>/dev/null || true)
              [[ -z $pids ]] && break
              sleep 0.2
            done
            [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
          fi
          ip netns del "$name" 2>/dev/null || true
        fi ;;
      link)
        ip link show dev "$name" >/dev/null 2>&1 && ip link del dev "$name" 2>/dev/null || true ;;
      dir) rm -rf -- "$name" ;;
    esac
  done < <(tac "$STATE")
  rm -f "$STATE" "$STATE_DIR/$PREFIX.probe"
}

record() { echo "$1 $2" >> "$STATE"; }

preflight() {
  local i
  for ((i = 0; i < NODES; i++)); do
    [[ -e /run/netns/$(ns $i) ]] && fail "refusing: network namespace $(ns $i) exists and is not" \
      "this script's (no state file lists it); choose another -p PREFIX"
    ip link show dev "$(hostveth $i)" >/dev/null 2>&1 && fail "refusing: interface" \
      "$(hostveth $i) exists and is not this script's; choose another -p PREFIX"
    [[ -e /etc/netns/$(ns $i) ]] && fail "refusing: /etc/netns/$(ns $i) exists; choose another -p"
  done
  ip link show dev "$BRIDGE" >/dev/null 2>&1 && fail "refusing: interface $BRIDGE exists and is" \
    "not this script's; choose another -p PREFIX"
  # Any route but the default that reaches into NET.0/24 (its own /24, a wider one, a host
  # route) means the subnet is in use here: a bridge address in it would shadow that route.
  local used=""
  for i in 0 1 254 255; do
    used+=$(ip -4 route show table all match "$NET.$i" | grep -v -E '^(default|unreachable)' \
      || true)
  done
  used+=$(ip -4 route show table all root "$NET.0/24" | grep -v '^default' || true)
  [[ -z $used ]] || fail "refusing: $NET.0/24 is already routed here (ip -4 route show table" \
    "all: ${used%%$'\n'*}); choose another -s NET"
  return 0
}

up() {
  teardown  # what a killed run of this prefix left behind
  preflight
  local i n v
  log "up: $NODES nodes x $PPN ranks, egress cap $RATE per node, $NET.0/24, prefix $PREFIX"
  [[ -d /etc/netns ]] || record parent /etc/netns
  record link "$BRIDGE"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((i = 0; i < NODES; i++)); do
    n=$(ns $i) v=$(hostveth $i)
    record dir "/etc/netns/$n"
    mkdir -p "/etc/netns/$n"
    {
      echo "127.0.0.1 localhost"
      for ((j = 0; j < NODES; j++)); do echo "$NET.$((j + 1)) $(ns $j)"; done
    } > "/etc/netns/$n/hosts"
    record netns "$n"
    ip netns add "$n"
    record link "$v"
    ip link add "$v" type veth peer name "$NIC" netns "$n"
    ip link set "$v" master "$BRIDGE"
    ip link set "$v" up
    ip -n "$n" addr add "$NET.$((i + 1))/24" dev "$NIC"
    ip -n "$n" link set lo up
    ip -n "$n" link set "$NIC" up
    tc -n "$n" qdisc replace dev "$NIC" root tbf rate "$RATE" burst "$TBF_BURST" limit "$TBF_LIMIT"
  done
}

require_up() {
  local i
  for ((i = 0; i < NODES; i++)); do
    [[ -e /run/netns/$(ns $i) ]] || fail "the cluster is not up (no namespace $(ns $i)): run" \
      "cluster.sh up with the same -n/-p first"
  done
}

tx_bytes() {  # the TX byte counter of every node's veth, comma-separated
  local i out=()
  for ((i = 0; i < NODES; i++)); do
    out+=("$(ip -n "$(ns $i)" -s -j link show dev "$NIC" | "$PY" -c \
      'import json,sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["bytes"])')")
  done
  (IFS=,; echo "${out[*]}")
}

JOB=
mpi() {  # mpi PROGRAM ARGS...: the job across the namespaces, bounded by JOB_TIMEOUT
  local hosts=() i
  for ((i = 0; i < NODES; i++)); do hosts+=("$(ns $i):$PPN"); done
  timeout -k 10 "$JOB_TIMEOUT" "$MPIEXEC" -launcher ssh -launcher-exec "$HERE/rsh.sh" \
    -hosts "$(IFS=,; echo "${hosts[*]}")" -localhost "$NET.254" -n $((NODES * PPN)) \
    -genv MPIR_CVAR_CH4_NETMOD "$NETMOD" -genv FI_PROVIDER tcp -genv FI_TCP_IFACE "$NIC" \
    -genv OMP_NUM_THREADS 1 "$@" 9>&- &  # the job must not hold this script's lock
  JOB=$!
  local rc=0
  wait "$JOB" || rc=$?
  JOB=
  [[ $rc -eq 124 ]] && log "the job passed the ${JOB_TIMEOUT}s bound (-t) and was killed"
  return $rc
}

check() {
  local before after out secs probe_out=$STATE_DIR/$PREFIX.probe
  before=$(tx_bytes)
  JOB_TIMEOUT=120 mpi "$PY" "$HERE/probe.py" --bytes $PROBE_BYTES --rounds $PROBE_ROUNDS \
    > "$probe_out" || fail "link check: the probe job failed (exit $?)"
  after=$(tx_bytes)
  out=$(tail -n 1 "$probe_out")
  log "probe: $out"
  "$PY" - "$out" "$NODES" "$PPN" <<'EOF' || exit 1
import json, sys
r, nodes, ppn = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
problems = []
if r["wrong"]:
    problems.append(f"{r['wrong']} bytes of the probe's all-to-all arrived wrong")
if len(r["hosts"]) != nodes or set(r["ppn"]) != {ppn}:
    problems.append(f"ranks ran on hosts {r['hosts']} with {r['ppn']} ranks each, not {nodes} "
                    f"nodes of {ppn}")
for p in problems:
    print(f"cluster.sh: link check: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
  secs=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$out")
  local tx
  tx=$("$PY" -c 'import sys; b,a=sys.argv[1].split(","),sys.argv[2].split(","); '\
'print(",".join(str(int(y)-int(x)) for x,y in zip(b,a)))' "$before" "$after")
  "$PY" "$HERE/linkcheck.py" --nodes "$NODES" --ppn "$PPN" --bytes $PROBE_BYTES \
    --rounds $PROBE_ROUNDS --rate "$RATE" --seconds "$secs" --tx "$tx" >&2 \
    || { echo "cluster.sh: FAILED: the capped link is not in the path; no figure of this" \
              "cluster is valid" >&2; exit 1; }
}

job_with_counters() {  # the user's program, with each node's veth bytes over the job
  local before after rc=0 t0 t1
  before=$(tx_bytes)
  t0=$(date +%s.%N)
  mpi "${PROGRAM[@]}" || rc=$?
  t1=$(date +%s.%N)
  after=$(tx_bytes)
  local summary
  summary=$("$PY" - "$before" "$after" "$t0" "$t1" "$RATE" "$NODES" "$PPN" "$rc" <<'EOF'
import json, sys
b, a = [int(x) for x in sys.argv[1].split(",")], [int(x) for x in sys.argv[2].split(",")]
rec = {"emulated": "netns + veth + tc tbf egress cap, no added latency",
       "rate": sys.argv[5], "nodes": int(sys.argv[6]), "ppn": int(sys.argv[7]),
       "exit_code": int(sys.argv[8]), "seconds": float(sys.argv[4]) - float(sys.argv[3]),
       "tx_bytes": [y - x for x, y in zip(b, a)]}
print(json.dumps(rec))
EOF
)
  log "job: $summary"
  [[ -n $COUNTERS ]] && echo "$summary" > "$COUNTERS"
  return $rc
}

undo_failed_up() {  # `up` alone keeps what it made only when it succeeded
  local rc=$?
  [[ $rc -eq 0 ]] || { teardown; log "up failed (exit $rc): removed what it had made"; }
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $JOB ]] && kill -0 "$JOB" 2>/dev/null; then
    kill -TERM "$JOB" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$JOB" 2>/dev/null || break; sleep 0.3; done
    kill -KILL "$JOB" 2>/dev/null || true
  fi
  teardown
  log "down (exit $rc)"
  exit $rc
}

case $cmd in
  up)
    trap undo_failed_up EXIT
    up
    log "up; remove with: $0 down -p $PREFIX" ;;
  down) teardown; log "down: nothing of prefix '$PREFIX' is left" ;;
  status)
    if [[ -f $STATE ]]; then cat "$STATE"; ip netns list | grep "^$PREFIX" || true
    else echo "no cluster with prefix '$PREFIX' (no $STATE)"; fi ;;
  check) require_up; check ;;
  mpi)
    require_up
    [[ ${#PROGRAM[@]} -gt 0 ]] || fail "mpi: give the program after --"
    job_with_counters ;;
  run)
    [[ ${#PROGRAM[@]} -gt 0 ]] || fail "run: give the program after -- (e.g. -- python -m" \
      "piper_comm.bench)"
    trap on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    up
    if [[ $CHECK -eq 1 ]]; then check; else log "link check SKIPPED (--no-check)"; fi
    job_with_counters ;;
  *) fail "unknown command '$cmd': run|up|check|mpi|down|status" ;;
esac
