"""The MoE layer and training on CUDA against the same on CPU: two steps of bench/gpu_check.sh.

    mpirun -n 4 python bench/gpu_moe_check.py layer       # PIPER_LOCAL_SIZE=2: 2 nodes of 2
    python bench/gpu_moe_check.py train --steps 20 --ranks 4

layer: every rank builds the same layer twice from one seed, on CPU and on its CUDA device
(local_rank % device_count), runs its slice of one batch forward and backward through both, and
compares outputs, input gradients and every parameter gradient. Variants: the all-to-all
dispatcher with and without node dedup, chunked (C = 2) with chunk_memory offload, PPMoE, in
fp32 and bf16-mixed, and bf16-mixed with FP8 dispatch (expert GEMMs on the dequantized rows,
and scaled FP8 GEMMs: native on Hopper, against the CPU's composed form). Tolerances, relative
to the largest element of the CPU tensor: fp32 1e-4 (GEMM blocking differs between the CPU
and cuBLAS); bf16-mixed and FP8 3e-2 (both sides round to bf16 at the same places, cuBLAS and
the CPU's bf16 GEMMs accumulate in other orders). Prints one line per variant with the
measured error; exits 1 on any failure.

train: runs `python -m piper_moe.train --config tiny` for N steps on CPU and on CUDA (4 ranks as
2 emulated nodes of 2, the Makefile's demo layout) in each precision of TRAIN_TOL, checks that
each run trained in the precision and on the device asked (its metrics.json), and compares the
loss of every step within that precision's relative tolerance (the same data and initial
weights; GEMM rounding differs between the devices and compounds over the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launchers import MPIRUN

ROOT = Path(__file__).resolve().parent.parent
TOL = {"fp32": 1e-4, "bf16-mixed": 3e-2}
VARIANTS = [
    ("alltoall", {"dedup": False}),
    ("alltoall", {"dedup": True}),
    ("alltoall", {"dedup": False, "pipeline_chunks": 2, "chunk_memory": "offload"}),
    ("ppmoe", {}),
]


def _rel(a, b) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    largest = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / largest if largest else float((a - b).abs().max())


def layer_check(device: str) -> int:
    """device: "cuda", or "cpu" to check this script where no GPU is (CPU against CPU)."""
    import torch

    import piper_comm as pc
    from piper_moe import MoEConfig, MoELayer

    comm = pc.init()
    if device == "cuda":
        torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
    P, me = comm.size, comm.rank
    cfg = MoEConfig(hidden=256, ffn_hidden=64, num_experts=8, top_k=2, num_shared_experts=1,
                    aux_loss_coef=0.01)
    g = torch.Generator().manual_seed(11)
    total = 24 * P
    X = torch.randn(total, cfg.hidden, generator=g)
    G = torch.randn(total, cfg.hidden, generator=g)
    failures = 0
    runs = [(d, o, p, False) for d, o in VARIANTS for p in ("fp32", "bf16-mixed")]
    # FP8 dispatch with both expert GEMMs; "scaled" is the native block-scaled FP8 GEMM on
    # Hopper and the composed row-wise form on CPU (the same sum of exact products)
    runs += [("alltoall", {"dedup": True, "fp8_gemm": gemm}, "bf16-mixed", True)
             for gemm in ("dequantize", "scaled")]
    runs += [("alltoall", {"dedup": False, "pipeline_chunks": 2, "fp8_gemm": "scaled"},
              "bf16-mixed", True)]
    if me == 0 and device == "cuda":
        from piper_moe.layer.fp8_gemm import native_scaled_gemm
        print(f"note: fp8_gemm 'scaled' on {torch.cuda.get_device_name()}: "
              f"{'native block-scaled GEMM' if native_scaled_gemm('cuda') else 'composed'}; "
              f"'auto' resolves to "
              f"{MoELayer(cfg, precision='bf16-mixed', fp8_dispatch=True, device='cuda').fp8_gemm}",
              flush=True)
    if comm.num_nodes > 1:
        runs = [r for r in runs if r[0] != "ppmoe"]
        if me == 0:
            print("note: ppmoe runs over one node's ranks: checked on a one-node layout only")
    for dispatcher, opts, precision, fp8 in runs:
        # ppmoe on the whole batch (replicated), the all-to-all path on this rank's slice
        lo, hi = (0, total) if dispatcher == "ppmoe" else (me * 24, (me + 1) * 24)
        results = {}
        for side, dev in (("cpu", "cpu"), ("cuda", device)):
            layer = MoELayer(cfg, comm, seed=5, device=dev, dispatcher=dispatcher,
                             precision=precision, fp8_dispatch=fp8, **opts)
            x = X[lo:hi].to(dev).requires_grad_()
            y = layer(x)
            ((y * G[lo:hi].to(dev)).sum() + layer.aux_loss).backward()
            results[side] = {"output": y, "input grad": x.grad,
                               **{n: p.grad for n, p in layer.named_parameters()
                                  if p.grad is not None}}
        tol = TOL[precision]
        worst = max(_rel(results["cuda"][k], v) for k, v in results["cpu"].items())
        ok = worst <= tol and results["cpu"].keys() == results["cuda"].keys()
        failures += not ok
        if me == 0:
            name = f"{dispatcher} {opts} {precision}" + (" fp8-dispatch" if fp8 else "")
            print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative difference {worst:.2e} "
                  f"(tolerance {tol:g}), {len(results['cpu'])} tensors", flush=True)
    failures = _sum_over_ranks(comm, failures)
    comm.close()
    return 1 if failures else 0


def _sum_over_ranks(comm, value: int) -> int:
    import numpy as np

    return int(comm.all_to_all(np.full(comm.size, value, dtype=np.int64)).sum())


TRAIN_TOL = {"fp32": 5e-3, "bf16-mixed": 2e-2}  # relative, per step's loss


def _train_pair(steps: int, ranks: int, device: str,
                precision: str) -> tuple[list[float], list[float]]:
    """The per-step losses of the same training run on CPU and on `device` (4 ranks as 2 nodes
    of 2); RuntimeError when a run trained in another precision or device than asked."""
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side, dev in (("cpu", "cpu"), ("cuda", device)):
            out = Path(tmp) / side
            cmd = [MPIRUN, "-genv", "PIPER_LOCAL_SIZE", "2", "-genv", "OMP_NUM_THREADS", "1",
                   "-n", str(ranks), sys.executable, "-m", "piper_moe.train", "--config",
                   "tiny", "--precision", precision, "--device", dev, "--steps", str(steps),
                   "--out", str(out), "--quiet"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ})
            result = json.loads((out / "metrics.json").read_text())
            ran = (result["precision"], result["device"].split(":")[0])
            if ran != (precision, dev):
                raise RuntimeError(f"the {side} run trained in {ran[0]} on {ran[1]}, not "
                                   f"{precision} on {dev}")
            losses[side] = [h["loss"] for h in result["history"]]
    return losses["cpu"], losses["cuda"]


def train_check(steps: int, ranks: int, device: str,
                precisions: tuple[str, ...] = tuple(TRAIN_TOL)) -> int:
    failures = 0
    for precision in precisions:
        try:
            cpu, cuda = _train_pair(steps, ranks, device, precision)
        except (subprocess.CalledProcessError, RuntimeError) as e:  # the next precision runs
            failures += 1
            print(f"FAIL {precision}: {e}", flush=True)
            continue
        worst = max(abs(a - b) / abs(b) for a, b in zip(cuda, cpu)) if cpu else float("inf")
        tol = TRAIN_TOL[precision]
        ok = len(cpu) == len(cuda) > 0 and worst <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {precision}, {steps} steps: loss cpu {cpu[-1]:.4f} "
              f"{device} {cuda[-1]:.4f}, max relative difference per step {worst:.2e} "
              f"(tolerance {tol:g})", flush=True)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("layer", "train"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--precisions", default=",".join(TRAIN_TOL),
                    help="train: comma-separated, of " + ", ".join(TRAIN_TOL))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="the side compared with CPU (cpu: checks this script without a GPU)")
    a = ap.parse_args()
    unknown = set(a.precisions.split(",")) - set(TRAIN_TOL)
    if unknown:
        ap.error(f"--precisions: unknown {sorted(unknown)}; known: {', '.join(TRAIN_TOL)}")
    return (layer_check(a.device) if a.what == "layer"
            else train_check(a.steps, a.ranks, a.device, tuple(a.precisions.split(","))))


if __name__ == "__main__":
    sys.exit(main())
