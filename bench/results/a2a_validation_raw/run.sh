#!/bin/bash
# quiet-host rerun of the a2a validation (bench/a2a_validation.py reads its output)
cd "$(dirname "$0")/../../.."  # the repository root
D=${1:?usage: run.sh OUTDIR}; mkdir -p $D
for cfg in "2 1" "2 2" "4 1" "4 2" "8 2" "8 4"; do
  set -- $cfg; N=$1; k=$2
  uptime >> $D/load.txt
  .venv/bin/mpirun -genv PIPER_LOCAL_SIZE $k -genv OMP_NUM_THREADS 1 -n $N .venv/bin/python -m piper_moe.cli.calibrate --repeats 5 --out $D/cal_np${N}_ls${k}.yaml > $D/cal_np${N}_ls${k}.log 2>&1
  for r in a b c d e; do
    .venv/bin/mpirun -genv PIPER_LOCAL_SIZE $k -n $N .venv/bin/python -m piper_comm.bench --op alltoall \
      -b $((N*1024)) -e $((N*1048576)) -f 4 -n 20 -w 5 --algos halo,flat --json $D/np${N}_ls${k}_$r.json > $D/np${N}_ls${k}_$r.txt 2>&1
  done
  uptime >> $D/load.txt
  echo "done $N $k $(date +%T)" >> $D/progress.txt
done
