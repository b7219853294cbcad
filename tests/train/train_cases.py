"""Rank-side cases of the training tests (tests/train/test_train.py, via tests/launch.py).

Every case returns what rank 0 compares: loss curves (all-reduced, so equal on every rank) and
a digest of the model. The small config below trains tiny-moe on 8 sequences of 32 tokens per
step, so 20 steps take seconds even on 4 oversubscribed CPU ranks; it pins precision fp32
(the default, auto, is bf16-mixed on bf16-capable hosts), which `curve` may override.
"""

from __future__ import annotations

import torch

from piper_moe.train import config as C
from piper_moe.train import launch as _launch
from piper_moe.train.launch import launch
from piper_moe.train.trainer import Trainer

SMALL = {"precision": "fp32",  # the exactness tests; precision cases override it
         "batch": {"micro_batch": 2, "global_batch": 8, "seq_len": 32},
         "optim": {"lr": 3.0e-3, "warmup": 3},
         "moe": {"aux_loss_coef": 0.01, "bias_update_rate": 0.0},
         "rebalance": {"enabled": False}, "checkpoint": {"dir": None}}


def _cfg(strategy: dict, steps: int, **over) -> dict:
    cfg = C.load("tiny", {**SMALL, "strategy": strategy, "steps": steps})
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def curve(strategy: dict, steps: int, micro_batch: int = 2, dtype: str = "float32",
          **over) -> list[float]:
    """Loss of every step; strategy e.g. {"pp": 2, "dp": 2, "ep": 2, "schedule": "1f1b"}."""
    launch()
    cfg = _cfg(strategy, steps, **over)
    cfg["batch"]["micro_batch"] = micro_batch
    cfg["dtype"] = dtype
    t = Trainer(cfg, progress=False)
    t.train(steps)
    return [h["loss"] for h in t.history]


def _model_digest(t: Trainer) -> dict[str, list[float]]:
    """The global state dict of this rank's chunks (all experts, logical order), as sums and
    a fixed projection per tensor (collective over the EP group)."""
    out = {}
    for v, ch in sorted(t.chunks.items()):
        for k, val in ch.global_state_dict().items():
            x = val.double().reshape(-1)
            w = torch.linspace(-1, 1, x.numel(), dtype=torch.float64)
            out[f"{v}.{k}"] = [float(x.sum()), float((x * w).sum())]
    return out


def migration_identity(steps: int, every: int) -> dict:
    """The same run twice in one job: without rebalancing, and with a migration forced every
    `every` steps (threshold 1.0: any imbalance triggers). Returns both curves, the number of
    migrations and whether this rank's final global state dicts are bitwise equal."""
    launch()
    strategy = {"pp": 2, "dp": 2, "ep": 2, "schedule": "1f1b"}
    runs = []
    for enabled in (False, True):
        cfg = _cfg(strategy, steps, rebalance={"enabled": enabled, "threshold": 1.0,
                                                 "patience": every, "max_swaps": 2,
                                                 "window": every})
        cfg["optim"]["clip"] = 0.0  # the clip norm's summation order follows the placement
        t = Trainer(cfg, progress=False)
        t.train(steps)
        runs.append((t, [h["loss"] for h in t.history], _model_digest(t)))
    (_, la, da), (tb, lb, db) = runs
    return {"losses": [la, lb], "migrations": len(tb.migrations), "same_state": da == db,
            "slots": [list(map(int, layer.slot_of)) for layer in tb.moe_layers]}


def resume(root: str, steps: int, stop: int) -> dict:
    """Trains `steps` steps saving every `stop` steps; then a fresh Trainer resumes from the
    checkpoint of step `stop` (kept) and trains to `steps` again. Returns both curves."""
    launch()
    strategy = {"pp": 2, "dp": 2, "ep": 2, "schedule": "1f1b"}
    over = {"rebalance": {"enabled": True, "threshold": 1.0, "patience": 2, "window": 2},
            "checkpoint": {"dir": root, "every": stop, "keep": 10}}
    a = Trainer(_cfg(strategy, steps, **over), progress=False)
    a.train(steps)
    b = Trainer(_cfg(strategy, steps, **over), progress=False)
    from piper_moe.train.checkpoint import load

    got = load(root, rank=b.rank, world=b.world)
    assert got is not None and got[0] == steps - steps % stop, (got and got[0])
    b._barrier()  # every rank has read `latest` before rank 0 repoints it below
    # resume from step `stop` exactly: load that directory's state
    from pathlib import Path

    step_dir = Path(root) / f"step-{stop:08d}"
    assert step_dir.exists(), f"no checkpoint {step_dir}"
    (Path(root) / "latest").write_text(step_dir.name) if b.rank == 0 else None
    b._barrier()
    assert b.resume(root)
    assert b.step == stop
    b.train(steps)
    return {"full": [h["loss"] for h in a.history], "resumed": [h["loss"] for h in b.history],
            "migrations": len(a.migrations)}


_linger = 0.0  # staggered_exit: seconds this rank waits between MPI_Finalize and its exit


def staggered_exit(delay: float) -> int:
    """Starts torch.distributed and returns; at the exit (finish below), rank r waits
    r * delay s between MPI_Finalize and leaving, as a slow rank of a real job may."""
    global _linger
    rank, _ = launch()
    _linger = rank * delay
    return rank


def finish(code: int = 0) -> None:
    """What tests/worker.py calls last: piper_moe's finish(), with staggered_exit's wait."""
    if not _linger:
        _launch.finish(code)
    import time

    from mpi4py import MPI

    _launch._shutdown()
    MPI.Finalize()
    time.sleep(_linger)
    _launch._leave(code)
