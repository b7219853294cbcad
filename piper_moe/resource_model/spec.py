"""Model and platform descriptions: kw-only dataclasses loaded from YAML.

A model file (``piper_moe/configs/models/<name>.yaml``) describes the architecture of a decoder-only
MoE transformer; a platform file (``piper_moe/configs/platforms/<name>.yaml``) describes one device
kind, its node and its links. Both are read with ``yaml.safe_load`` and validated on construction;
errors name the offending values.

Units everywhere: bytes, seconds, FLOPs, bytes/second, FLOP/s.

Parameter counts are derived from the architecture (``params.py``) and exposed as
``ModelSpec.params_total`` / ``ModelSpec.params_active``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ATTENTION_KINDS = ("mha", "gqa", "mla")
FFN_KINDS = ("swiglu", "gelu")


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{owner}: {name} must be > 0 (got {value!r})")


@dataclass(kw_only=True, frozen=True)
class AttentionSpec:
    """Attention block of one layer.

    ``mha``/``gqa``: Q is [h, num_heads*head_dim], K and V are [h, num_kv_heads*head_dim], O is
    [num_heads*head_dim, h]. ``mla`` (DeepSeek multi-head latent attention): optional low-rank Q
    (``q_lora_rank`` 0 means a direct [h, heads*(nope+rope)] projection), a joint KV down-projection
    [h, kv_lora_rank + qk_rope_head_dim], an up-projection [kv_lora_rank, heads*(nope + v)] and
    O [heads*v_head_dim, h].
    """

    kind: str
    num_heads: int
    num_kv_heads: int = 0
    head_dim: int = 0
    qk_norm: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention.kind must be one of {ATTENTION_KINDS} (got {self.kind!r})")
        _positive("attention", num_heads=self.num_heads)
        if self.kind == "mla":
            _positive(
                "attention (mla)",
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
            )
            if self.q_lora_rank < 0:
                raise ValueError(f"attention.q_lora_rank must be >= 0 (got {self.q_lora_rank})")
        else:
            kv = self.num_kv_heads or self.num_heads
            object.__setattr__(self, "num_kv_heads", kv)
            _positive("attention", head_dim=self.head_dim)
            if self.num_heads % kv:
                raise ValueError(
                    f"attention.num_heads ({self.num_heads}) must be a multiple of "
                    f"num_kv_heads ({kv})"
                )

    @property
    def qk_head_dim(self) -> int:
        """Per-head dimension of Q and K (nope + rope for MLA)."""
        if self.kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head dimension of V and of the attention output."""
        return self.v_head_dim if self.kind == "mla" else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Number of K/V heads seen by the attention core (MLA expands to all heads)."""
        return self.num_heads if self.kind == "mla" else self.num_kv_heads


@dataclass(kw_only=True, frozen=True)
class MoESpec:
    """Mixture-of-experts block: ``num_experts`` routed experts of FFN size ``expert_ffn``, top-k
    routing, ``num_shared_experts`` always-on experts of size ``shared_expert_ffn`` (defaults to
    ``expert_ffn``), optional group-limited routing (``num_groups``/``top_groups``)."""

    num_experts: int
    top_k: int
    expert_ffn: int
    num_shared_experts: int = 0
    shared_expert_ffn: int = 0
    num_groups: int = 1
    top_groups: int = 1
    router_bias: bool = False

    def __post_init__(self) -> None:
        _positive("moe", num_experts=self.num_experts, top_k=self.top_k, expert_ffn=self.expert_ffn)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be a multiple of "
                f"num_groups ({self.num_groups})"
            )
        if not 1 <= self.top_groups <= self.num_groups:
            raise ValueError(
                f"moe.top_groups ({self.top_groups}) must be in [1, num_groups={self.num_groups}]"
            )
        if self.num_shared_experts and not self.shared_expert_ffn:
            object.__setattr__(self, "shared_expert_ffn", self.expert_ffn)


@dataclass(kw_only=True, frozen=True)
class ModelSpec:
    """A decoder-only transformer whose first ``num_dense_layers`` layers have a dense FFN and the
    rest an MoE block. RMSNorm before attention and FFN, a final norm, untied or tied
    embedding/head."""

    name: str
    num_layers: int
    num_dense_layers: int
    hidden: int
    vocab: int
    attention: AttentionSpec
    moe: MoESpec
    dense_ffn: int = 0
    ffn_kind: str = "swiglu"
    tied_embeddings: bool = False
    seq_len: int = 4096
    source: str = ""

    def __post_init__(self) -> None:
        _positive("model", num_layers=self.num_layers, hidden=self.hidden, vocab=self.vocab)
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"model {self.name}: num_dense_layers ({self.num_dense_layers}) must be in "
                f"[0, num_layers={self.num_layers}]"
            )
        if self.num_dense_layers and self.dense_ffn <= 0:
            raise ValueError(
                f"model {self.name}: dense_ffn must be > 0 with {self.num_dense_layers} "
                "dense layers"
            )
        if self.ffn_kind not in FFN_KINDS:
            raise ValueError(f"ffn_kind must be one of {FFN_KINDS} (got {self.ffn_kind!r})")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def params_total(self) -> int:
        """All parameters (embedding, head, every expert), a count."""
        from .params import count_params

        return count_params(self).total

    @property
    def params_active(self) -> int:
        """Parameters one token touches: every dense weight, top-k routed + shared experts, the
        router, the output head and the input embedding table (the convention of Mistral's
        "12.9B active" and of Hugging Face model cards)."""
        from .params import count_params

        return count_params(self).active

    @property
    def params_active_no_embedding(self) -> int:
        """``params_active`` without the input embedding table (a lookup, not a matmul): the
        convention DeepSeek uses for "activated parameters"."""
        from .params import count_params

        return count_params(self).active_no_embedding


@dataclass(kw_only=True, frozen=True)
class LinkSpec:
    """One link level: per-message latency ``latency`` (s) and per-device, per-direction bandwidth
    ``bandwidth`` (bytes/s) that one rank can drive when all ranks of a node communicate."""

    latency: float
    bandwidth: float

    def __post_init__(self) -> None:
        _positive("link", bandwidth=self.bandwidth)
        if self.latency < 0:
            raise ValueError(f"link.latency must be >= 0 (got {self.latency})")


@dataclass(kw_only=True, frozen=True)
class GemmSpec:
    """GEMM efficiency curve (see ``compute.gemm_time``): achieved/peak FLOP rate is
    ``max_efficiency * d / (d + half_dim)`` with d the smallest GEMM dimension, capped by the
    memory-bound time at ``hbm_bandwidth``, plus ``launch_overhead`` seconds per GEMM."""

    max_efficiency: float
    half_dim: float
    launch_overhead: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.max_efficiency <= 1:
            raise ValueError(f"gemm.max_efficiency must be in (0, 1] (got {self.max_efficiency})")
        if self.half_dim < 0 or self.launch_overhead < 0:
            raise ValueError(
                f"gemm.half_dim ({self.half_dim}) and launch_overhead ({self.launch_overhead}) "
                "must be >= 0"
            )


@dataclass(kw_only=True, frozen=True)
class PlatformSpec:
    """A machine: ``devices_per_node`` devices of ``device_memory`` bytes each, dense 16-bit peak
    ``peak_flops`` (FLOP/s per device), HBM bandwidth, copy bandwidth (device-local memcpy), an
    intra-node link level and an inter-node level (``inter.bandwidth`` is the per-device share of
    the node's NICs), ``barrier_latency`` seconds per node barrier (None: one ``intra.latency``),
    ``memory_reserved`` bytes per device the framework cannot use (context, communicator
    buffers, allocator fragmentation), ``peak_flops_fp32`` the dense fp32 GEMM peak (None:
    ``peak_flops``, one rate for both), and ``peak_flops_fp8`` the dense FP8 peak of a native
    block-scaled FP8 GEMM (None: none; the FP8 expert GEMMs then run at ``peak_flops``).
    Which peak a GEMM runs at follows its element size (``peak``): a run in ``fp32`` computes
    at ``peak_flops_fp32``, ``bf16`` and ``bf16-mixed`` at ``peak_flops``.

    Host-side costs: ``op_overhead`` seconds per framework operation (an aten op dispatched,
    with its autograd bookkeeping and the Python between ops; counted per layer by
    ``resource_model.ops``) that do not overlap the compute: on CPU hosts, where the same core
    runs both; 0 on GPU platforms, whose host dispatch runs ahead of the kernels of a model of
    real size (not modelled there). The attention core's forward runs at ``attention_flops``
    FLOP/s (None: the GEMM curve at the head dimensions) and its backward takes
    ``attention_backward`` times the forward (2 for a GEMM-like kernel; calibrate measures
    both); in fp32 at ``attention_flops_fp32`` and ``attention_backward_fp32`` (None: the
    16-bit figures). The two differ on CPUs, whose bf16 flash-attention kernels are slower
    than their fp32 ones at short sequences (``attention``)."""

    name: str
    device: str
    devices_per_node: int
    device_memory: float
    memory_reserved: float
    peak_flops: float
    hbm_bandwidth: float
    copy_bandwidth: float
    gemm: GemmSpec
    intra: LinkSpec
    inter: LinkSpec
    barrier_latency: float | None = None
    peak_flops_fp32: float | None = None
    peak_flops_fp8: float | None = None
    op_overhead: float = 0.0
    attention_flops: float | None = None
    attention_backward: float = 2.0
    attention_flops_fp32: float | None = None
    attention_backward_fp32: float | None = None
    source: str = ""
    calibrated: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(
            f"platform {self.name}",
            devices_per_node=self.devices_per_node,
            device_memory=self.device_memory,
            peak_flops=self.peak_flops,
            hbm_bandwidth=self.hbm_bandwidth,
            copy_bandwidth=self.copy_bandwidth,
        )
        for key in ("peak_flops_fp32", "peak_flops_fp8", "attention_flops",
                    "attention_flops_fp32", "attention_backward_fp32"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"platform {self.name}: {key} must be > 0 or absent "
                                 f"(got {value})")
        if self.op_overhead < 0 or self.attention_backward <= 0:
            raise ValueError(f"platform {self.name}: op_overhead must be >= 0 and "
                             f"attention_backward > 0 (got {self.op_overhead}, "
                             f"{self.attention_backward})")
        if self.barrier_latency is not None and self.barrier_latency < 0:
            raise ValueError(f"platform {self.name}: barrier_latency must be >= 0 "
                             f"(got {self.barrier_latency})")
        if not 0 <= self.memory_reserved < self.device_memory:
            raise ValueError(
                f"platform {self.name}: memory_reserved ({self.memory_reserved}) must be in "
                f"[0, device_memory={self.device_memory})"
            )

    def peak(self, elem_bytes: int) -> float:
        """Dense GEMM peak (FLOP/s) for inputs of ``elem_bytes`` bytes per element: fp32 (4)
        at ``peak_flops_fp32``, 16-bit (2) at ``peak_flops``, FP8 (1) at ``peak_flops_fp8``
        (each None falls back to ``peak_flops``)."""
        if elem_bytes >= 4:
            return self.peak_flops_fp32 or self.peak_flops
        if elem_bytes == 1:
            return self.peak_flops_fp8 or self.peak_flops
        return self.peak_flops

    def attention(self, elem_bytes: int) -> tuple[float | None, float]:
        """(forward FLOP/s of the attention core or None for the GEMM curve, backward / forward
        time) for elements of ``elem_bytes`` bytes: fp32 (4) or 16-bit."""
        if elem_bytes >= 4:
            return (self.attention_flops_fp32 or self.attention_flops,
                    self.attention_backward_fp32 or self.attention_backward)
        return self.attention_flops, self.attention_backward

    @property
    def usable_memory(self) -> float:
        """Bytes per device available to weights, gradients, optimizer and activations."""
        return self.device_memory - self.memory_reserved


def _resolve(kind: str, name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise FileNotFoundError(f"no {kind[:-1]} {name_or_path!r}: not a YAML file, known: {known}")


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    return data


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    data = dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        # YAML 1.1 reads "64e9" as a string; accept it for float fields
        if (types[key] in ("float", "float | None") and isinstance(value, (str, int))
                and not isinstance(value, bool)):
            try:
                data[key] = float(value)
            except ValueError:
                raise ValueError(f"{where}.{key}: expected a number, got {value!r}") from None
    return cls(**data)


def model_from_dict(data: dict[str, Any], where: str = "model") -> ModelSpec:
    """Build a ``ModelSpec`` from a mapping as found in a model YAML file."""
    data = dict(data)
    data["attention"] = _build(AttentionSpec, data.pop("attention"), f"{where}.attention")
    data["moe"] = _build(MoESpec, data.pop("moe"), f"{where}.moe")
    return _build(ModelSpec, data, where)


def platform_from_dict(data: dict[str, Any], where: str = "platform") -> PlatformSpec:
    """Build a ``PlatformSpec`` from a mapping as found in a platform YAML file."""
    data = dict(data)
    data["gemm"] = _build(GemmSpec, data.pop("gemm"), f"{where}.gemm")
    for level in ("intra", "inter"):
        data[level] = _build(LinkSpec, data.pop(level), f"{where}.{level}")
    return _build(PlatformSpec, data, where)


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a shipped model by name (``"deepseek-v3"``) or any model YAML by path."""
    path = _resolve("models", name_or_path)
    return model_from_dict(_read(path), str(path))


def load_platform(name_or_path: str | Path) -> PlatformSpec:
    """Load a shipped platform by name (``"frontier"``) or any platform YAML by path (e.g. one
    written by ``python -m piper_moe.cli.calibrate``)."""
    path = _resolve("platforms", name_or_path)
    return platform_from_dict(_read(path), str(path))


def shipped(kind: str) -> list[str]:
    """Names of the shipped ``"models"`` or ``"platforms"``."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
