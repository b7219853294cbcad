"""`python -m piper_moe.train --config NAME|PATH [--steps N] [--resume DIR] [--out DIR]
[--precision auto|fp32|bf16-mixed|bf16] [--fp8-dispatch] [--fp8-gemm auto|scaled|dequantize]`

Trains a DeepSeek-style MoE transformer with pipeline (PP) x data (DP) x expert (EP)
parallelism under mpirun, torchrun or as one process. Every rank runs the same code:

    launch()            torch.distributed ("piper" backend: MPI-launched jobs need no extra env)
    Trainer(cfg)        mesh, model chunks of this rank, AdamW, data, the pipeline engine
    trainer.train(N)    N steps: schedule (engine), gradient all-reduce, clip, step, rebalance,
                        progress, checkpoints; rank 0 writes metrics.json and the plots

Determinism: the initial model depends only on the seed (not on the layout), every global
sequence only on (data seed, its index), and the loss is the mean over the global batch, so
any layout trains the same model up to float32 summation order; on CPU a resumed run repeats
an uninterrupted one bitwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..common import FP8_GEMMS
from ..train import config as C
from ..train.launch import finish, launch
from ..train.trainer import Trainer, _fmt

__all__ = ["main"]
log = logging.getLogger("piper.moe")


def _a2a_choice() -> str:
    """How the MoE dispatch's all-to-all algorithm is chosen, for the run's first line."""
    from piper_comm import cost, envs

    if envs.algorithm():
        return f"{envs.algorithm()}: PIPER_ALGO"
    return f"auto with links {(envs.platform() or cost.Links()).source}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m piper_moe.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="train config name or YAML path")
    ap.add_argument("--steps", type=int, help="train up to this step (overrides the config)")
    ap.add_argument("--resume", help="checkpoint directory to resume from (if it has one)")
    for k, kind in (("pp", int), ("dp", int), ("ep", int), ("vpp", int), ("schedule", str)):
        ap.add_argument(f"--{k}", type=kind, help=f"strategy.{k} (overrides the config)")
    ap.add_argument("--precision", choices=C.PRECISION_CHOICES,
                    help="precision (overrides the config; piper_moe/layer/precision.py)")
    ap.add_argument("--fp8-dispatch", action="store_true",
                    help="moe_layer.fp8_dispatch: FP8 token dispatch (needs a bf16 precision)")
    ap.add_argument("--fp8-gemm", choices=FP8_GEMMS, default=None,
                    help="moe_layer.fp8_gemm: how the experts multiply FP8-dispatched rows "
                         "(auto: scaled FP8 GEMMs where native, i.e. Hopper GPUs)")
    ap.add_argument("--device", default=None,
                    help="cpu | cuda | cuda:<i> (overrides the config; cuda: the device of this "
                         "rank's local rank)")
    ap.add_argument("--out", default=None, help="run directory (metrics.json, plots)")
    ap.add_argument("--plot", action="store_true", help="write loss.png and expert_load.png")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, _world = launch()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    cfg = C.load(args.config)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.precision is not None:
        cfg["precision"] = args.precision
    if args.fp8_dispatch:
        cfg["moe_layer"]["fp8_dispatch"] = True
    if args.fp8_gemm is not None:
        cfg["moe_layer"]["fp8_gemm"] = args.fp8_gemm
    if args.device is not None:
        cfg["device"] = args.device
    given = {k: getattr(args, k) for k in ("pp", "dp", "ep", "vpp", "schedule")
             if getattr(args, k) is not None}
    if given:
        base = {} if cfg["strategy"] == "auto" else cfg["strategy"]
        cfg["strategy"] = {**C.DEFAULTS["strategy"], **base, **given}
    out = Path(args.out or f"runs/{Path(str(args.config)).stem}")
    if args.resume:
        cfg["checkpoint"]["dir"] = args.resume
    trainer = Trainer(cfg, out, progress=not args.quiet)
    if rank == 0:
        floor = trainer.source.entropy_rate()
        log.info("piper_moe.train: %s, %s (all-to-all %s), schedule %s, %d micro-batches of "
                 "%d x %d tokens; data %s (floor %s nats/token); precision %s%s", cfg["model"],
                 trainer.mesh.describe(), _a2a_choice(), trainer.schedule, trainer.num_micro,
                 trainer.micro_batch, trainer.seq_len, cfg["data"].get("kind"),
                 f"{floor:.4f}" if floor is not None else "unknown", trainer.precision,
                 f" + fp8 dispatch ({trainer.moe_layers[0].fp8_gemm} expert GEMMs)"
                 if cfg["moe_layer"]["fp8_dispatch"] and trainer.moe_layers else "")
    if args.resume and trainer.resume(args.resume) and rank == 0:
        log.info("piper_moe.train: resumed at step %d from %s", trainer.step, args.resume)
    trainer.train(cfg["steps"])
    report = trainer.report()
    loads = trainer.all_expert_loads()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        result = {"config": trainer.cfg.to_dict(), "precision": trainer.precision,
                  "device": str(trainer.device), "floor": trainer.source.entropy_rate(),
                  "history": trainer.history, "migrations": trainer.migrations,
                  "expert_load": {str(k): v for k, v in sorted(loads.items())},
                  "report": report}
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        last = trainer.history[-1] if trainer.history else None
        if last:
            m = report["measured"]
            memory = (f"peak GPU memory {m['peak_gpu_bytes'] / 2**20:.0f} MiB"
                      if "peak_gpu_bytes" in m else
                      f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB, "
                      f"{m['rss_before_model_bytes'] / 2**20:.0f} MiB of it before the model "
                      f"(interpreter, torch, MPI)")
            log.info("piper_moe.train: step %d loss %.4f (floor %s); measured %.3f s/step, "
                     "predicted %s s/step on platform %s (its figures, not this machine's, "
                     "unless calibrated: python -m piper_moe.cli.calibrate); %s; predicted "
                     "tensor memory %s MiB",
                     trainer.step, last["loss"], result["floor"], m["step_s"],
                     _fmt(report["predicted"].get("step_s")), cfg["platform"], memory,
                     _fmt(report["predicted"].get("memory_bytes"), 2**-20))
        if args.plot:
            from ..train.plots import plot_run

            for p in plot_run(result, out):
                log.info("piper_moe.train: wrote %s", p)
    return 0


if __name__ == "__main__":
    finish(main())
