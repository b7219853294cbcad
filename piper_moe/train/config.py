"""Training configuration: one YAML file (``piper_moe/configs/train/<name>.yaml`` or a path).

    model: tiny-moe                 # a model file of piper_moe/configs/models (or a path)
    platform: cpu-host              # for strategy: auto and the end-of-run prediction
    seed: 0
    steps: 200
    moe: {aux_loss_coef: 0.01, bias_update_rate: 0.0}      # MoEConfig overrides
    moe_layer: {dispatcher: alltoall, pipeline_chunks: 1, dedup: true, pipeline_recheck: 50,
                chunk_memory: auto, chunk_memory_headroom: 0.25, fp8_dispatch: false,
                fp8_gemm: auto}
        # dispatcher "ppmoe": the EP group all-gathers its tokens, each rank runs its experts
        #   by index selection, a reduce-scatter returns the rows (PPMoE; needs ep == dp and
        #   the EP group inside a node); pipeline_chunks C > 1 or "auto": MPipeMoE-style
        #   chunked dispatch/experts/combine over the asynchronous all-to-all;
        #   chunk_memory (C > 1 only) save | offload | recompute | auto: what the chunked
        #   layer keeps of its dispatched rows for backward (auto: by free memory, the same
        #   choice on every EP rank; see piper_moe/layer/chunk_memory.py);
        #   chunk_memory_headroom in (0, 1]: auto keeps the rows on the device while they
        #   take at most this fraction of its free memory; fp8_dispatch: tokens cross the
        #   dispatch all-to-all as float8 e4m3 with per-128-element scales (needs a bf16
        #   precision; piper_moe/layer/precision.py); fp8_gemm: auto | scaled | dequantize,
        #   how the experts multiply the FP8 rows (auto: scaled FP8 GEMMs on Hopper GPUs,
        #   else bf16 GEMMs on the dequantized rows; piper_moe/layer/fp8_gemm.py)
    precision: auto                 # fp32 | bf16-mixed | bf16 | auto (piper_moe/layer/
        #   precision.py): bf16-mixed keeps float32 parameters and AdamW state and computes
        #   in bf16; auto is bf16-mixed where bf16 GEMMs are native (CUDA with bf16, CPUs with
        #   AVX512-BF16 / AMX), else fp32. dtype (float32 | float64 | bfloat16) is the
        #   parameter dtype of fp32 runs: float64 runs (exactness tests) resolve auto to fp32,
        #   and dtype bfloat16 means precision bf16.
    strategy: {pp: 2, dp: 2, ep: 2, schedule: 1f1b, vpp: 1}  # or: strategy: auto
                                    # (order: "ep,edp,pp" rank order, innermost first)
    batch: {micro_batch: 2, global_batch: 16, seq_len: 64}   # sequences; micro_batch per replica
    optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup: 10, weight_decay: 0.0, betas: [0.9, 0.95],
            eps: 1.0e-8, clip: 1.0}
    data: {kind: markov, seed: 0, branching: 8}               # or {kind: tokens, path: ...}
    rebalance: {enabled: true, threshold: 1.3, patience: 3, max_swaps: 2, window: 5}
    checkpoint: {dir: runs/tiny, every: 50, keep: 2}          # dir null: no checkpoints
    log_every: 10

Unknown keys are errors (a typo must not silently fall back to a default). The same as types:
TrainConfig (keyword-only, frozen, validated) with its sections Batch, Optim, Rebalance and
Checkpoint; the defaults are TrainConfig's (DEFAULTS is its dict), and Trainer takes either. With
``strategy: auto`` the resource model's planner picks pp, dp, ep and the schedule for the
job's world size (runtime limits: tp = 1, no recompute; see plan_for_world).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..common import PRECISIONS
from ..layer.config import MoEOptions

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"

PRECISION_CHOICES = ("auto", *PRECISIONS)


def _positive_ints(obj, where: str, names: tuple[str, ...], least: int = 1) -> None:
    for k in names:
        v = getattr(obj, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"train config: {where}.{k} must be an int >= {least}, got {v!r}")


@dataclass(kw_only=True, frozen=True)
class Batch:
    """Sequences: micro_batch per data-parallel replica and micro-batch, global_batch per step
    over all replicas (a multiple of micro_batch * dp), seq_len tokens each."""

    micro_batch: int = 2
    global_batch: int = 8
    seq_len: int = 64

    def __post_init__(self) -> None:
        _positive_ints(self, "batch", ("micro_batch", "global_batch", "seq_len"))


@dataclass(kw_only=True, frozen=True)
class Optim:
    """AdamW with linear warm-up (steps) to lr, then cosine decay to min_lr; clip: the global
    gradient norm (0: none)."""

    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    clip: float = 1.0

    def __post_init__(self) -> None:
        _positive_ints(self, "optim", ("warmup",), least=0)
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr and self.eps > 0
                and self.clip >= 0 and self.weight_decay >= 0 and len(self.betas) == 2):
            raise ValueError(f"train config: optim out of range: {self}")


@dataclass(kw_only=True, frozen=True)
class Rebalance:
    """Expert migration: when the rank imbalance (max / mean tokens) stays above threshold for
    patience steps of a window-step average, up to max_swaps expert swaps."""

    enabled: bool = False
    threshold: float = 1.3
    patience: int = 3
    max_swaps: int = 2
    window: int = 5

    def __post_init__(self) -> None:
        _positive_ints(self, "rebalance", ("patience", "max_swaps", "window"))
        if not self.threshold >= 1:
            raise ValueError(f"train config: rebalance.threshold must be >= 1, got "
                             f"{self.threshold!r}")


@dataclass(kw_only=True, frozen=True)
class Checkpoint:
    """A checkpoint every `every` steps into dir (None: none), the last `keep` kept."""

    dir: str | None = None
    every: int = 50
    keep: int = 2

    def __post_init__(self) -> None:
        _positive_ints(self, "checkpoint", ("every", "keep"))


def _moe_layer_defaults() -> dict:
    # MoEOptions' fields and defaults, less precision (top level here) and sequence_sharded
    # (the trainer decides it)
    return {f.name: f.default for f in dataclasses.fields(MoEOptions)
            if f.name not in ("precision", "sequence_sharded")}


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One training job, validated on construction (the YAML keys of the module docstring).
    Trainer takes it or the equivalent dict (load()); to_dict() / from_dict() convert."""

    model: str = "tiny-moe"
    platform: str = "cpu-host"
    seed: int = 0
    steps: int = 100
    moe: dict = dataclasses.field(default_factory=dict)
    moe_layer: dict = dataclasses.field(default_factory=_moe_layer_defaults)
    strategy: dict | str = dataclasses.field(default_factory=lambda: {
        "pp": 1, "dp": 1, "ep": 1, "schedule": "1f1b", "vpp": 1, "order": "ep,edp,pp"})
    batch: Batch = dataclasses.field(default_factory=Batch)
    optim: Optim = dataclasses.field(default_factory=Optim)
    data: dict = dataclasses.field(
        default_factory=lambda: {"kind": "markov", "seed": 0, "branching": 8})
    rebalance: Rebalance = dataclasses.field(default_factory=Rebalance)
    checkpoint: Checkpoint = dataclasses.field(default_factory=Checkpoint)
    log_every: int = 10
    dtype: str = "float32"
    precision: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        _positive_ints(self, "", ("steps",), least=0)
        # its values, checked now rather than at the first layer; fp8_dispatch against the
        # precision once that is resolved (auto), by the layer
        MoEOptions(**{**self.moe_layer, "precision": "bf16-mixed"})
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"train config: precision must be one of {PRECISION_CHOICES}, "
                             f"got {self.precision!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a complete config mapping (as load() returns), sections included."""
        sections = {"batch": Batch, "optim": Optim, "rebalance": Rebalance,
                    "checkpoint": Checkpoint}
        kw = {k: (sections[k](**{**v, **({"betas": tuple(v["betas"])} if k == "optim"
                                          else {})}) if k in sections else v)
              for k, v in d.items()}
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d


DEFAULTS: dict[str, Any] = TrainConfig().to_dict()

FREE_FORM = {"moe", "data"}  # passed through to MoEConfig / data.make_source (they validate)


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"train config: unknown key '{where}{key}'; known: "
                             f"{sorted(base)}")
        if isinstance(base[key], dict) and key not in FREE_FORM and value != "auto":
            if not isinstance(value, dict):
                raise ValueError(f"train config: {where}{key} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"train config {p} not found")
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if not q.exists():
        shipped = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no train config named {name_or_path!r}; shipped: {shipped}")
    return q


def load(name_or_path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The merged config dict (defaults <- file <- overrides), validated."""
    data: dict = {}
    if name_or_path is not None:
        with open(resolve_path(name_or_path)) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"train config {name_or_path}: top level must be a mapping")
    cfg = _merge(DEFAULTS, data, "")
    if overrides:
        cfg = _merge(cfg, overrides, "")
    TrainConfig.from_dict(cfg)  # validates every section
    return cfg


def resolve_precision(p: str, dtype: str, device) -> str:
    """The run's precision (fp32 | bf16-mixed | bf16) from a config's precision and dtype:
    dtype bfloat16 means bf16; float64 means fp32 (auto) and refuses a bf16 precision;
    auto is precision.resolve's choice for device. ValueError on a conflict."""
    from ..layer.precision import resolve

    if dtype not in ("float32", "float64", "bfloat16"):
        raise ValueError(f"train config: dtype must be float32, float64 or bfloat16, got "
                         f"{dtype!r}")
    if dtype == "bfloat16":
        if p not in ("auto", "bf16"):
            raise ValueError(f"train config: dtype bfloat16 is precision bf16, got precision "
                             f"{p!r}")
        return "bf16"
    if dtype == "float64":
        if p not in ("auto", "fp32"):
            raise ValueError(f"train config: dtype float64 needs precision fp32 (or auto), "
                             f"got {p!r}")
        return "fp32"
    return resolve(p, device)


def num_micro(batch: Batch, dp: int) -> int:
    """Micro-batches per step of each of dp replicas; ValueError unless they divide evenly."""
    per = batch.micro_batch * dp
    if batch.global_batch % per:
        raise ValueError(f"train config: global_batch={batch.global_batch} must be a multiple "
                         f"of micro_batch * dp = {batch.micro_batch} * {dp}")
    return batch.global_batch // per


def choose_dispatcher(model, platform, st: dict, micro_batch: int, seq_len: int,
                      dtype: str) -> dict:
    """The MoE dispatcher for a strategy, by the resource model
    (piper_moe/resource_model/dispatch_cost.py):
    PPMoE when the EP group is the stage's whole DP group inside one node (what the runtime's
    ppmoe needs) and its all-gather + reduce-scatter is predicted faster than the dispatch +
    combine all-to-all; the chunk count is left to the layer's online choice ("auto": it
    times C in {1, 2, 4} and keeps the fastest, as MPipeMoE does)."""
    from ..resource_model.dispatch_cost import a2a_time, ppmoe_time

    ep, dp = st["ep"], st["dp"]
    elem = {"float32": 4, "float64": 8, "bfloat16": 2}.get(dtype, 4)
    tokens = micro_batch * seq_len  # per rank and micro-batch
    choice = {"dispatcher": "alltoall", "pipeline_chunks": "auto"}
    if ep > 1 and ep == dp and ep <= platform.devices_per_node:
        t_a2a = a2a_time(tokens, model.moe.top_k, model.hidden, elem, ep, ep, platform)
        t_pp = ppmoe_time(tokens * ep, model.hidden, elem, ep, platform, sequence_sharded=True)
        choice["predicted_a2a_s"], choice["predicted_ppmoe_s"] = t_a2a, t_pp
        if t_pp < t_a2a:
            choice = {**choice, "dispatcher": "ppmoe", "pipeline_chunks": 1}
    return choice


def plan_for_world(cfg: TrainConfig, world: int) -> dict:
    """strategy: auto -> the fastest strategy the runtime can run (tp=1, recompute none) that
    the resource model predicts for this world size, and its MoE dispatcher
    (choose_dispatcher); a plan of the chunked MoE layer (a candidate the planner weighs on
    predicted time and memory like any other) is kept as planned: the all-to-all dispatcher
    with its pipeline_chunks and chunk_memory. Returns the strategy mapping (with
    "moe_layer")."""
    from ..resource_model import load_model, load_platform
    from ..resource_model.planner import plan

    model, platform = load_model(cfg.model), load_platform(cfg.platform)
    b = cfg.batch
    result = plan(model, platform, world, global_batch=b.global_batch, seq_len=b.seq_len,
                  top=10_000)
    for e in result.plans:
        s = e.strategy
        if s.tp == 1 and s.etp == 1 and s.recompute == "none" and s.global_batch % (
                b.micro_batch * s.dp) == 0 and s.micro_batch == b.micro_batch:
            out = {"pp": s.pp, "dp": s.dp, "ep": s.ep, "schedule": s.schedule, "vpp": s.vpp,
                   "order": "ep,edp,pp", "predicted_step_s": e.time["step"]}
            if s.moe_chunks > 1:
                # the plan is the chunked layer's (faster, or the one that fits): keep it as
                # planned; PPMoE's memory was not what the planner checked
                out["moe_layer"] = {"dispatcher": "alltoall", "pipeline_chunks": s.moe_chunks,
                                    "chunk_memory": s.chunk_memory}
            else:
                out["moe_layer"] = choose_dispatcher(model, platform, out, b.micro_batch,
                                                     b.seq_len, cfg.dtype)
            return out
    raise ValueError(f"strategy: auto found no runnable strategy for {world} ranks "
                     f"({result.num_fit} fit of {result.num_candidates})")
