"""Trainer: one rank's part of a PP x DP x EP training run, built from a TrainConfig.

    cfg = piper_moe.train.config.load("tiny")
    t = Trainer(cfg)            # collective: mesh, model chunks, AdamW, data, pipeline engine
    t.cfg                       # the run's TrainConfig (strategy auto: the strategy chosen)
    t.train(steps)              # every rank; history of per-step records on t.history
    t.save(dir) / t.resume(dir) # collective checkpoints (piper_moe/train/checkpoint.py)
    t.report()                  # measured step time / memory next to the resource model's

Determinism: the initial model depends only on the seed (not on the layout), every global
sequence only on (data seed, its index), and the loss is the mean over the global batch, so
any layout trains the same model up to float32 summation order; on CPU a resumed run repeats
an uninterrupted one bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common import even_split
from ..layer.precision import param_dtype
from ..resource_model import load_model
from ..runtime.engine import PipelineEngine
from ..runtime.mesh import Mesh, all_reduce_bounded, barrier_bounded, build_mesh
from . import config as C

log = logging.getLogger("piper.moe")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layer ranges of the virtual stages, extra layers to the first ones (the
    resource model's split, Strategy.stage_layers)."""
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages for {num_layers} layers: each stage "
                         f"needs at least one layer")
    out, lo = [], 0
    for n in even_split(num_layers, num_stages):
        out.append(range(lo, lo + n))
        lo += n
    return out


def _is_expert(name: str) -> bool:
    return ".experts.w" in name or name.startswith("experts.w")


class Trainer:
    """Builds this rank's part of the run from a TrainConfig (piper_moe.train.config)."""

    def __init__(self, cfg: C.TrainConfig | dict, out_dir: str | Path | None = None, *,
                 progress: bool = True):
        """cfg: a TrainConfig, or the same as a dict (config.load's result), copied and
        validated by TrainConfig.from_dict; neither is changed. self.cfg is the run's
        TrainConfig: with strategy "auto", the strategy and MoE layer options chosen in place
        of "auto". Collective over the job's ranks."""
        import torch.distributed as dist

        from ..data import make_source
        from ..transformer import Stage

        self._rss_before_model = _peak_rss()

        if not isinstance(cfg, C.TrainConfig):
            cfg = C.TrainConfig.from_dict(copy.deepcopy(cfg))
        self.dist = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if self.dist else 1
        st = cfg.strategy
        if st == "auto":
            st = C.plan_for_world(cfg, world)
            chosen = st.pop("moe_layer")
            cfg = dataclasses.replace(cfg, strategy=st, moe_layer={**cfg.moe_layer, **{
                k: chosen[k] for k in ("dispatcher", "pipeline_chunks", "chunk_memory")
                if k in chosen}})
            log.info("piper_moe.train: strategy auto: MoE dispatcher %s (predicted per layer "
                     "forward: all-to-all %s s, ppmoe %s s), pipeline_chunks %s, chunk_memory "
                     "%s", chosen["dispatcher"], _fmt(chosen.get("predicted_a2a_s")),
                     _fmt(chosen.get("predicted_ppmoe_s")), chosen["pipeline_chunks"],
                     chosen.get("chunk_memory", cfg.moe_layer["chunk_memory"]))
            log.info("piper_moe.train: strategy auto: the resource model picked pp=%d dp=%d "
                     "ep=%d %s (vpp %d) for %d ranks, predicted %.3g s/step on %s", st["pp"],
                     st["dp"], st["ep"], st["schedule"], st["vpp"], world,
                     st["predicted_step_s"], cfg.platform)
        self.cfg: C.TrainConfig = cfg
        self.strategy = st
        order = st.get("order", "ep,edp,pp")
        self.mesh: Mesh = build_mesh(int(st["pp"]), int(st["dp"]), int(st["ep"]), order) \
            if self.dist else Mesh(int(st["pp"]), int(st["dp"]), int(st["ep"]), order=order)
        m = self.mesh
        self.rank, self.world = m.rank, m.world
        self.spec = load_model(cfg.model)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:
            # one device per rank of a node: the local rank's (several ranks share one when
            # the node has fewer devices, as the one-GPU check does)
            local = int(os.environ.get("LOCAL_RANK") or os.environ.get("MPI_LOCALRANKID")
                        or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") or 0)
            self.device = torch.device("cuda", local % torch.cuda.device_count())
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # precision: parameters, AdamW state, gradient buffers (so the data-parallel
        # all-reduce) and inter-stage activations in self.dtype (float32 under bf16-mixed)
        self.precision = C.resolve_precision(cfg.precision, cfg.dtype, self.device)
        self.dtype = param_dtype(self.precision, DTYPES[cfg.dtype])
        self.vpp = int(st.get("vpp", 1))
        self.schedule = st.get("schedule", "1f1b")
        b = cfg.batch
        self.micro_batch, self.global_batch, self.seq_len = (b.micro_batch, b.global_batch,
                                                             b.seq_len)
        self.num_micro = C.num_micro(b, m.dp)
        ranges = layer_ranges(self.spec.num_layers, m.pp * self.vpp)
        last = m.pp * self.vpp - 1
        self.chunks: dict[int, torch.nn.Module] = {}
        moe_kwargs = self._moe_kwargs(cfg.moe_layer)
        for v in range(m.pp_rank, m.pp * self.vpp, m.pp):
            self.chunks[v] = Stage(self.spec, ranges[v], first=v == 0, last=v == last,
                                   ep_comm=m.ep_comm, seed=cfg.seed, dtype=self.dtype,
                                   device=self.device, moe_overrides=dict(cfg.moe),
                                   moe_kwargs=moe_kwargs, precision=self.precision)
        self.params = [(f"{v}.{n}", p) for v, ch in self.chunks.items()
                       for n, p in ch.named_parameters()]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=o.lr,
                                           betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, foreach=False)
        self.source = make_source(cfg.data, self.spec.vocab)
        self.engine = PipelineEngine(
            self.chunks, m, schedule=self.schedule, num_micro=self.num_micro,
            act_shape=(self.micro_batch, self.seq_len, self.spec.hidden),
            loss_scale=1.0 / (self.global_batch * self.seq_len),
            aux_scale=1.0 / self.num_micro, vpp=self.vpp, dtype=self.dtype, device=self.device)
        self._grad_buffers = self._bind_grad_buffers()
        self.moe_layers = [layer for v in sorted(self.chunks)
                           for layer in self.chunks[v].moe_layers()]
        self.moe_layer_ids = [int(i) for v in sorted(self.chunks)
                              for i, b in self.chunks[v].layers.items() if b.is_moe]
        self._hook_loads()
        self.step = 0
        self.history: list[dict] = []
        self.out_dir = Path(out_dir) if out_dir else None
        # A bar on an interactive terminal; a log line every log_every steps otherwise.
        self.progress = progress and self.rank == 0 and sys.stderr.isatty()
        self.log_every = int(cfg.log_every) if progress else 0
        self.migrations: list[dict] = []
        self._trackers: list = []
        rb = cfg.rebalance
        if rb.enabled and self.moe_layers:
            from ..layer.rebalance import LoadTracker

            self._trackers = [LoadTracker(self.spec.moe.num_experts, window=rb.window)
                              for _ in self.moe_layers]
        self._above = 0

    def _moe_kwargs(self, ml: dict) -> dict:
        """MoELayer keyword arguments from the config's moe_layer section and the mesh.
        Balancing statistics cover the stage's whole data-parallel micro-batch (stats_comm =
        the dp group), so any layout computes the one-process loss; under ppmoe the EP group
        already holds its group's tokens, so no sum is needed when ep == dp."""
        m = self.mesh
        chunks = ml["pipeline_chunks"]
        spans = len({m.node_of[r] for r in m.ep_ranks()}) > 1
        if chunks == "auto" and spans and ml["dedup"]:
            chunks = 1  # "auto" has no chunked variant on the node-dedup path: nothing to time
        if self.schedule == "zb-h1" and m.pp > 1 and chunks != 1:
            # The chunked layer's expert Function owns both the expert input and the expert
            # weights, so torch's split backward would run it in B and again in W (recompute:
            # another all-to-all). Unchunked only, until it has separate input/weight parts.
            if chunks != "auto":
                raise ValueError(f"moe_layer.pipeline_chunks={chunks} cannot run with schedule "
                                 f"zb-h1 (the chunked layer's backward would run twice, in B "
                                 f"and in W): use pipeline_chunks 1 or auto, or another "
                                 f"schedule")
            log.info("piper_moe.train: schedule zb-h1 runs the MoE layers unchunked "
                     "(pipeline_chunks auto -> 1)")
            chunks = 1
        kw = {"dedup": bool(ml["dedup"]), "pipeline_chunks": chunks,
              "pipeline_recheck": int(ml["pipeline_recheck"]),
              "chunk_memory": ml["chunk_memory"],
              "chunk_memory_headroom": float(ml["chunk_memory_headroom"]),
              "fp8_dispatch": bool(ml["fp8_dispatch"]), "fp8_gemm": ml["fp8_gemm"]}
        if ml["dispatcher"] == "ppmoe":
            if m.ep != m.dp or m.ep == 1:
                raise ValueError(f"moe_layer.dispatcher ppmoe needs ep == dp > 1 (the EP group "
                                 f"is the stage's tensor-parallel-like group), got ep={m.ep} "
                                 f"dp={m.dp}")
            kw.update(dispatcher="ppmoe", sequence_sharded=True)
        elif ml["dispatcher"] != "alltoall":
            raise ValueError(f"moe_layer.dispatcher must be alltoall or ppmoe, got "
                             f"{ml['dispatcher']!r}")
        elif m.dp_comm is not None:
            kw["stats_comm"] = m.dp_comm
        return kw

    # -- expert load bookkeeping: summed over the micro-batches of a step
    def _hook_loads(self) -> None:
        self._step_load = [np.zeros(self.spec.moe.num_experts, dtype=np.int64)
                           for _ in self.moe_layers]

        def hook(i):
            def fn(module, args, out):
                self._step_load[i] += np.asarray(module.stats["tokens_per_expert"],
                                                 dtype=np.int64)
            return fn

        for i, layer in enumerate(self.moe_layers):
            layer.register_forward_hook(hook(i))

    # -- batches
    def _batches(self, step: int) -> tuple[list | None, list | None]:
        """This replica's micro-batches of global step `step`: global micro-batch m is the
        sequences [m * mb * dp, (m + 1) * mb * dp) of the step, replica d takes its d-th
        slice of mb sequences."""
        m = self.mesh
        first_stage = 0 in self.chunks
        last_stage = (m.pp * self.vpp - 1) in self.chunks
        if not (first_stage or last_stage):
            return None, None
        ins, tgs = [], []
        for mb in range(self.num_micro):
            first = (step * self.global_batch + mb * self.micro_batch * m.dp
                     + m.dp_rank * self.micro_batch)
            seqs = torch.from_numpy(self.source.batch(first, self.micro_batch, self.seq_len))
            seqs = seqs.to(self.device)
            ins.append(seqs[:, :-1])
            tgs.append(seqs[:, 1:])
        return ins, tgs

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        total = max(1, self.cfg.steps)
        if step < o.warmup:
            return o.lr * (step + 1) / o.warmup
        frac = min(1.0, (step - o.warmup) / max(1, total - o.warmup))
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))

    # -- gradient reduction
    def _bind_grad_buffers(self) -> dict[bool, torch.Tensor]:
        """One flat gradient buffer for the dense weights and one for the experts (keyed by
        "is expert"); every parameter's .grad is a view of its buffer (DDP's
        gradient_as_bucket_view, Megatron's grad buffer). Autograd accumulates into the views
        in place, the data-parallel all-reduce runs on each buffer as it is (no concatenation
        and copy back), and the gradients persist between steps, zeroed, not freed: the
        lifetime piper_moe.resource_model.estimate() assumes (persistent_grads=True). A weight
        that gets no gradient in a step sees zeros, not None, so AdamW still decays it and advances
        its step (as under Megatron's and DDP's buffers)."""
        buffers = {}
        for expert in (False, True):
            params = [p for n, p in self.params if _is_expert(n) == expert]
            if not params:
                continue
            buf = torch.zeros(sum(p.numel() for p in params), dtype=self.dtype,
                              device=self.device)
            off = 0
            for p in params:
                p.grad = buf[off:off + p.numel()].view_as(p)
                off += p.numel()
            buffers[expert] = buf
        return buffers

    def _check_grad_views(self) -> None:
        """Raises if something replaced a .grad (e.g. zero_grad(set_to_none=True)) instead of
        writing into the buffer: the all-reduce would then miss that gradient."""
        for expert, buf in self._grad_buffers.items():
            lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
            for n, p in self.params:
                if _is_expert(n) == expert and (p.grad is None
                                                or not lo <= p.grad.data_ptr() < hi):
                    raise RuntimeError(f"the gradient of {n} is no longer a view of the "
                                       f"trainer's gradient buffer (something replaced "
                                       f"param.grad): refusing to all-reduce a partial set")

    def _all_reduce_grads(self) -> None:
        """Sums the gradient buffers over their data-parallel groups: dense weights over dp
        (the ranks holding the same stage), experts over edp (the ranks holding the same
        experts). Collective over each group."""
        self._check_grad_views()
        m = self.mesh
        for expert, group in ((False, m.dp_group), (True, m.edp_group)):
            if group is not None and expert in self._grad_buffers:
                all_reduce_bounded(self._grad_buffers[expert],
                                   f"the {'expert' if expert else 'dense'} gradient all-reduce",
                                   m.rank, self.engine.timeout, group=group)

    def _clip(self) -> float:
        """Global gradient norm (each weight counted once over its replicas), clipped to
        optim.clip; returns the norm before clipping."""
        m = self.mesh
        sq = torch.zeros((), dtype=torch.float64, device=self.device)  # where the grads are
        for n, p in self.params:
            if p.grad is not None:
                copies = (m.dp // m.ep) if _is_expert(n) else m.dp
                sq += p.grad.detach().double().pow(2).sum() / copies
        sq = sq.cpu()  # one device sync; the all-reduce of a host scalar goes to gloo
        if self.dist:
            all_reduce_bounded(sq, "the gradient-norm all-reduce", m.rank, self.engine.timeout)
        norm = float(sq.sqrt())
        clip = self.cfg.optim.clip
        if clip and norm > clip:
            for _, p in self.params:
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        return norm

    # -- one step
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        for g in self._step_load:
            g[:] = 0
        for buf in self._grad_buffers.values():  # zeroed in place: .grad are views of them
            buf.zero_()
        for ch in self.chunks.values():
            ch.train()
        ins, tgs = self._batches(self.step)
        out = self.engine.run(ins, tgs)
        for layer in self.moe_layers:  # its grad_fn would keep the step's autograd graph
            layer.aux_loss = layer.aux_loss.detach()  # (and the Functions' ctx) alive
        t_pipe = time.perf_counter() - t0
        self._all_reduce_grads()
        norm = self._clip()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        totals = torch.tensor([out["loss_sum"], out["tokens"], out["aux"]], dtype=torch.float64)
        if self.dist:
            all_reduce_bounded(totals, "the loss all-reduce", self.rank, self.engine.timeout)
        elapsed = time.perf_counter() - t0
        rec = {"step": self.step, "loss": float(totals[0] / max(1.0, float(totals[1]))),
               "aux": float(totals[2]) / max(1, self.num_micro), "grad_norm": norm, "lr": lr,
               "seconds": elapsed, "pipeline_seconds": t_pipe,
               "tokens_per_s": self.global_batch * self.seq_len / elapsed,
               "expert_load": [g.tolist() for g in self._step_load],
               "engine": out["seconds"]}
        self.step += 1
        self._rebalance(rec)
        self.history.append(rec)
        return rec

    def _rebalance(self, rec: dict) -> None:
        """Feeds the loads to the trackers; when the worst layer's imbalance has stayed above
        the threshold for `patience` steps, plans and runs swaps on every MoE layer whose
        imbalance exceeds it (collective over each EP group; every rank of the stage sees the
        same loads, so every EP group makes the same plan)."""
        if not self._trackers or self.mesh.ep == 1:
            return
        from ..layer.rebalance import migrate, plan_swaps

        rb = self.cfg.rebalance
        worst = 0.0
        imb = []
        for tr, layer, load in zip(self._trackers, self.moe_layers, self._step_load):
            tr.add(load)
            imb.append(tr.imbalance(layer.slot_of, layer.e_local, layer.ep))
        worst = self._max_over_world(max(imb) if imb else 0.0)
        rec["imbalance"] = worst
        self._above = self._above + 1 if worst > rb.threshold else 0
        if self._above < rb.patience:
            return
        self._above = 0
        node_of_rank = [self.mesh.node_of[r] for r in self.mesh.ep_ranks()]
        for i, (tr, layer) in enumerate(zip(self._trackers, self.moe_layers)):
            swaps = plan_swaps(tr.total(), layer.slot_of, layer.e_local, layer.ep,
                               node_of_rank, threshold=rb.threshold,
                               max_swaps=rb.max_swaps)
            if swaps:
                migrate(layer, swaps, self.optimizer)
                tr.reset()
                lid = self.moe_layer_ids[i]
                self.migrations.append({"step": self.step, "layer": lid, "swaps": swaps})
                log.info("piper_moe: step %d: MoE layer %d: swapped the slots of experts %s",
                         self.step, lid, swaps)

    def _max_over_world(self, v: float) -> float:
        if not self.dist:
            return v
        import torch.distributed as dist

        t = torch.tensor([v], dtype=torch.float64)
        all_reduce_bounded(t, "the expert-imbalance all-reduce (max)", self.rank,
                           self.engine.timeout, op=dist.ReduceOp.MAX)
        return float(t)

    # -- the loop
    def train(self, steps: int) -> list[dict]:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="train", unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        peak = self._peak_flops()
        flops_tok = 3 * self._flops_per_token()
        ck = self.cfg.checkpoint
        saved = True
        while self.step < steps:
            rec = self.train_step()
            rec["mfu"] = flops_tok * rec["tokens_per_s"] / (peak * self.world) if peak else 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                mfu=f"{100 * rec['mfu']:.2f}%")
            elif self.rank == 0 and self.log_every and (
                    self.step % self.log_every == 0 or self.step == steps):
                log.info("step %d/%d loss %.4f aux %.4f grad-norm %.3f lr %.2e %.0f tok/s "
                         "MFU %.2f%%", self.step, steps, rec["loss"], rec["aux"],
                         rec["grad_norm"], rec["lr"], rec["tokens_per_s"], 100 * rec["mfu"])
            saved = ck.dir and ck.every and self.step % ck.every == 0
            if saved:
                self.save(ck.dir)
        if bar is not None:
            bar.close()
        if ck.dir and self.history and not saved:
            self.save(ck.dir)  # the final state, whatever `every` is
        return self.history

    def _flops_per_token(self) -> float:
        from ..resource_model.compute import model_flops_per_token

        return model_flops_per_token(self.spec, self.seq_len)

    def _peak_flops(self) -> float:
        """The platform's GEMM peak at this run's compute precision (0: no platform file)."""
        from ..resource_model import load_platform
        from ..resource_model.memory import PRECISION_BYTES

        try:
            platform = load_platform(self.cfg.platform)
        except Exception:  # a platform file is optional for training
            return 0.0
        return platform.peak(PRECISION_BYTES[self.precision][3])

    # -- checkpoints
    def state(self) -> dict:
        from .checkpoint import rng_state

        return {"step": self.step,
                "chunks": {str(v): ch.state_dict() for v, ch in self.chunks.items()},
                "slot_of": [torch.tensor(np.asarray(layer.slot_of)) for layer in
                            self.moe_layers],
                "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "trackers": [tr.state_dict() for tr in self._trackers],
                "above": self._above,
                "history": json.dumps(self.history)}

    def load_state(self, s: dict) -> None:
        from .checkpoint import set_rng_state

        self.step = int(s["step"])
        for layer, slots in zip(self.moe_layers, s["slot_of"]):
            layer.set_placement(slots.numpy())
        for v, ch in self.chunks.items():
            ch.load_state_dict(s["chunks"][str(v)])
        self.optimizer.load_state_dict(s["optimizer"])
        set_rng_state(s["rng"])
        for tr, d in zip(self._trackers, s["trackers"]):
            tr.load_state_dict(d)
        self._above = int(s["above"])
        self.history = json.loads(s["history"])

    def _barrier(self) -> None:
        if self.dist:
            barrier_bounded("a checkpoint barrier", self.rank, self.engine.timeout)

    def save(self, root: str | Path) -> None:
        from .checkpoint import save

        save(root, self.step, self.state(), rank=self.rank, world=self.world,
             barrier=self._barrier, meta={"config": self.cfg.to_dict(), "layout": self.layout()},
             keep=self.cfg.checkpoint.keep)

    def resume(self, root: str | Path) -> bool:
        from .checkpoint import load

        got = load(root, rank=self.rank, world=self.world)
        if got is None:
            return False
        _step, state, meta = got
        if meta.get("layout") != self.layout():
            raise ValueError(f"resume from {root}: checkpoint layout {meta.get('layout')} "
                             f"differs from this run's {self.layout()}")
        self.load_state(state)
        return True

    def all_expert_loads(self) -> dict[int, list[list[int]]]:
        """{global layer: per-step tokens per expert} of every MoE layer of the model, gathered
        from the first replica of every stage (collective over the job)."""
        mine = {}
        if self.mesh.dp_rank == 0:
            for j, lid in enumerate(self.moe_layer_ids):
                mine[lid] = [h["expert_load"][j] for h in self.history if h.get("expert_load")]
        if not self.dist:
            return mine
        import torch.distributed as dist

        parts: list = [None] * self.world
        # all_gather_object has no async form: a bounded barrier first names a missing rank
        barrier_bounded("the barrier before gathering the expert loads", self.rank,
                        self.engine.timeout)
        dist.all_gather_object(parts, mine)
        return {k: v for p in parts for k, v in p.items()}

    def layout(self) -> dict:
        m = self.mesh
        return {"pp": m.pp, "dp": m.dp, "ep": m.ep, "vpp": self.vpp, "world": m.world,
                "order": m.order}

    # -- the end of a run
    def report(self) -> dict:
        """Measured step time and peak memory next to the resource model's prediction for this
        strategy on the config's platform. Memory: the prediction counts tensor bytes (weights,
        gradients, optimizer state, activations, buffers); on CUDA it compares with
        peak_gpu_bytes (max_memory_allocated); on CPU only the process's peak RSS is measured
        here, which also holds the interpreter, torch and MPI (rss_before_model_bytes: the
        peak before the model was built) and glibc's freed pages (bench/results/
        model_validation.md measures CPU tensor bytes with the profiler instead)."""
        from ..resource_model import Strategy, estimate, load_platform

        times = [h["seconds"] for h in self.history[1:]] or [h["seconds"] for h in self.history]
        measured = {"step_s": float(np.median(times)) if times else float("nan"),
                    "peak_rss_bytes": _peak_rss(),
                    "rss_before_model_bytes": self._rss_before_model}
        if self.device.type == "cuda":
            measured["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        m = self.mesh
        out = {"measured": measured, "layout": self.layout(), "schedule": self.schedule}
        try:
            last = self.moe_layers[0].stats if self.moe_layers else {}
            chunked = ({"moe_chunks": last["chunks"], "chunk_memory": last["chunk_memory"]}
                       if (last.get("chunks") or 1) > 1 and last.get("chunk_memory") else {})
            s = Strategy(dp=m.dp, tp=1, pp=m.pp, ep=m.ep, vpp=self.vpp,
                         micro_batch=self.micro_batch, global_batch=self.global_batch,
                         seq_len=self.seq_len, zero=0, schedule=self.schedule,
                         # the model's "bf16" is Megatron's (bf16 weights, fp32 master and
                         # Adam): the nearest it has to Piper's all-bf16 runs
                         precision=self.precision,
                         fp8_dispatch=bool(self.cfg.moe_layer["fp8_dispatch"]),
                         fp8_gemm=(self.moe_layers[0].fp8_gemm or "auto") if self.moe_layers
                         else "auto",
                         **chunked)
            e = estimate(self.spec, load_platform(self.cfg.platform), s)
            out["predicted"] = {"step_s": e.time["step"], "memory_bytes": e.memory["total"],
                                "mfu": e.mfu, "bottleneck": e.bottleneck}
        except Exception as exc:  # the report must not fail a finished run
            out["predicted"] = {"error": str(exc)}
        return out


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes (interpreter, libraries, tensors)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fmt(v: Any, scale: float = 1.0) -> str:
    return "n/a" if v is None else f"{v * scale:.3g}"
