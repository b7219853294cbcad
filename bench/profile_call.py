"""Where one all-to-all's time goes: a loop of calls on every rank, py-spy on rank 0.

    python bench/profile_call.py -n 4 --local-size 2 --algo halo --bytes 1024 \
        --out bench/results/profile_np4_halo_1k.txt
    python bench/profile_call.py -n 4 --local-size 2 --device cuda ...   # torch CUDA tensors

Launches `mpirun -n N python bench/profile_call.py --loop ...` (every rank calls
comm.all_to_all of --bytes per rank, recv given, for --seconds), attaches `py-spy record
--native` to rank 0 and writes the top frames by self time and the inclusive time of Piper's
frames, with the per-call time of the same loop measured without the profiler."""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launchers import MPIRUN, tool

ROOT = Path(__file__).resolve().parents[1]


def loop(a) -> None:
    import numpy as np

    import piper_comm as pc

    comm = pc.init(local_size=a.local_size)
    P = comm.size
    x = np.ones(P * a.bytes // 4, np.float32)
    sync = lambda: None  # noqa: E731
    if a.device == "cuda":  # CUDA tensors; the timed loop ends when the device is done
        import torch

        if not torch.cuda.is_available():
            sys.exit("profile_call.py --device cuda: no CUDA device here "
                     "(torch.cuda.is_available() is False)")
        torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
        x = torch.from_numpy(x).cuda()
        sync = torch.cuda.synchronize
    r = np.empty_like(x) if a.device == "cpu" else x.new_empty(x.shape)
    for _ in range(200):
        comm.all_to_all(x, recv=r, algorithm=a.algo)
    sync()
    comm.barrier()
    n = 2000  # every rank makes the same number of calls (a time-based loop would not)
    t0 = time.perf_counter()
    for _ in range(n):  # unprofiled: the per-call time
        comm.all_to_all(x, recv=r, algorithm=a.algo)
    sync()
    per_call = (time.perf_counter() - t0) / n * 1e6
    algo = comm.last_algorithm
    mine = np.full(comm.size, int(a.seconds * 1e6 / per_call))
    calls = int(comm.all_to_all(mine)[0])  # rank 0's count, for everyone
    if comm.rank == 0:
        Path(a.pid_file).write_text(f"{os.getpid()} {per_call:.2f} {algo}")
    for _ in range(calls):  # profiled
        comm.all_to_all(x, recv=r, algorithm=a.algo)
    sync()
    comm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--local-size", type=int, default=1)
    ap.add_argument("--algo", default="flat")
    ap.add_argument("--bytes", type=int, default=1024, help="bytes each rank sends in all")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pid-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.loop:
        return loop(a)
    with tempfile.TemporaryDirectory() as tmp:
        pid_file, raw = Path(tmp) / "pid", Path(tmp) / "raw.txt"
        cmd = [MPIRUN, "-n", str(a.n), sys.executable, __file__, "--loop",
               "--local-size", str(a.local_size), "--algo", a.algo, "--bytes", str(a.bytes),
               "--seconds", str(a.seconds), "--device", a.device, "--pid-file", str(pid_file)]
        job = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            if job.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the loop did not start (exit {job.poll()})")
            time.sleep(0.1)
        pid, per_call, algo = pid_file.read_text().split()
        subprocess.run([tool("py-spy"), "record", "--native", "-r", "400", "-d",
                        str(int(a.seconds - 1)), "-p", pid, "-f", "raw", "-o", str(raw)],
                       check=True, capture_output=True)
        job.wait(timeout=120)
        self_t, incl = collections.Counter(), collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames, c = stack.split(";"), int(count)
            total += c
            self_t[frames[-1]] += c
            for f in set(frames):
                if "piper" in f.lower() or "Executor" in f or "CallQueue" in f:
                    incl[f] += c
    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    lines = [f"# py-spy record --native -r 400 on rank 0 of `{' '.join(cmd[:3])} ... --loop`: "
             f"comm.all_to_all of {a.bytes} B per rank ({a.device}), recv given, "
             f"algorithm={a.algo} "
             f"(ran: {algo}), {a.n} ranks, local size {a.local_size}; {total} samples",
             f"# per call without the profiler (rank 0): {per_call} us",
             f"# git {rev}  date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "#",
             "# self time, top 15"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(15)]
    lines += ["#", "# inclusive, Piper frames (top 15)"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(15)]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
