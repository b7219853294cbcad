"""Command line planner: rank the parallel strategies of a model on a platform.

    python -m piper_moe.cli.plan --model deepseek-v3 --platform dgx-h100 --gpus 1024 [--top 5]
        [--global-batch B] [--seq-len S] [--zero 1] [--overlap] [--json plans.json]

Prints, for the fastest strategies that fit, the predicted step time, throughput, MFU, the memory
per rank by component (most loaded pipeline stage) and the time per step by component, and the
bottleneck. Units: GiB (2**30 bytes) and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from piper_moe.resource_model import load_model, load_platform, plan
from piper_moe.resource_model.estimate import TIME_KEYS, Estimate

log = logging.getLogger("piper")
GIB = 2**30
MEM_KEYS = ("weights", "gradients", "optimizer", "activations", "moe_buffers", "transient",
            "reserved")


def describe(s) -> str:
    """One-line summary of a strategy."""
    sched = s.schedule + (f"(v{s.vpp})" if s.vpp > 1 else "")
    moe = "dispatcher=ppmoe" if s.dispatcher == "ppmoe" else f"a2a={s.a2a}"
    if s.moe_chunks > 1:
        moe += f" chunks={s.moe_chunks}/{s.chunk_memory}"
    return (f"dp={s.dp} tp={s.tp} pp={s.pp} ep={s.ep} etp={s.etp} mb={s.micro_batch} "
            f"m={s.num_micro} zero={s.zero} recompute={s.recompute} {sched} {moe}")


def format_plan(rank: int, e: Estimate, device_memory: float) -> str:
    """Tables of one plan: memory (GiB) and time (s, %) by component."""
    lines = [f"#{rank}  {describe(e.strategy)}",
             f"    step {e.time['step']:.3f} s   {e.tokens_per_second:,.0f} tokens/s   "
             f"MFU {100 * e.mfu:.1f}%   memory {e.memory['total'] / GIB:.1f} / "
             f"{device_memory / GIB:.1f} GiB (stage {e.memory_stage})   "
             f"bottleneck: {e.bottleneck}"]
    lines.append("    memory GiB  " + "  ".join(f"{k}={e.memory[k] / GIB:.2f}" for k in MEM_KEYS))
    step = e.time["step"] or 1.0
    lines.append("    time s      " + "  ".join(
        f"{k}={e.time[k]:.3f}({100 * e.time[k] / step:.0f}%)" for k in TIME_KEYS))
    return "\n".join(lines)


def to_json(e: Estimate) -> dict:
    """A JSON-ready record of one plan."""
    return {"strategy": dataclasses.asdict(e.strategy), "memory_bytes": e.memory,
            "memory_stage": e.memory_stage, "time_s": e.time, "mfu": e.mfu, "fits": e.fits,
            "bottleneck": e.bottleneck, "tokens_per_second": e.tokens_per_second}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m piper_moe.cli.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="shipped model name or YAML path")
    parser.add_argument("--platform", required=True, help="shipped platform name or YAML path")
    parser.add_argument("--gpus", type=int, required=True, help="number of ranks")
    parser.add_argument("--top", type=int, default=5, help="plans to print (default 5)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default 2 x gpus)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--overlap", action="store_true",
                        help="let schedules hide all-to-all behind compute")
    parser.add_argument("--json", default=None, help="write the top plans to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = load_model(args.model)
    platform = load_platform(args.platform)
    t0 = time.perf_counter()
    result = plan(model, platform, args.gpus, global_batch=args.global_batch,
                  seq_len=args.seq_len, zero=args.zero, top=args.top, overlap_a2a=args.overlap)
    elapsed = time.perf_counter() - t0
    print(f"# {model.name} ({model.params_total / 1e9:.4g}B total, "
          f"{model.params_active / 1e9:.4g}B active) on {args.gpus} x {platform.device} "
          f"({platform.name})")
    print(f"# {result.num_candidates} candidates, {result.num_valid} valid, {result.num_fit} fit "
          f"({elapsed:.1f} s); rejected: {result.rejected}")
    if not result.plans:
        print("# no strategy fits: more ranks, ZeRO-3 (--zero 3) or a shorter sequence")
    for i, e in enumerate(result.plans, 1):
        print(format_plan(i, e, platform.device_memory))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": model.name, "platform": platform.name, "gpus": args.gpus,
                       "plans": [to_json(e) for e in result.plans]}, f, indent=2)
    return 0 if result.plans else 1


if __name__ == "__main__":
    sys.exit(main())
