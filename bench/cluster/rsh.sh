#!/usr/bin/env bash
# The "ssh" of hydra on the emulated cluster (mpiexec -launcher ssh -launcher-exec rsh.sh):
# hydra calls `rsh.sh [ssh options] HOST COMMAND...`; HOST is the name of one of the cluster's
# network namespaces. The command (hydra's proxy, which forks that node's ranks) runs inside
# that namespace with its own UTS host name HOST, so MPI and Piper see one host per node.
set -euo pipefail
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    -o|-l|-p|-i|-F) shift 2 ;;
    *) shift ;;
  esac
done
[[ $# -ge 2 ]] || { echo "rsh.sh: usage: rsh.sh [ssh options] HOST COMMAND..." >&2; exit 2; }
host=$1
shift
exec ip netns exec "$host" unshare --uts /bin/sh -c "hostname '$host' && exec $*"
