"""A decoder-only MoE transformer sized by a ``ModelSpec``, built as pipeline stages.

Shapes: b batch, s sequence, h hidden, V vocab, T = b*s tokens.

A ``Stage`` holds a consecutive range of global layers (and the embedding if it is the first
stage, the final norm and LM head if it is the last). The single-process model is
``Stage(spec, range(spec.num_layers), first=True, last=True)``; a pipeline gives each rank one
or several (interleaved schedules) consecutive ranges. Who calls what:

    stage = Stage(spec, range(lo, hi), first=..., last=..., ep_comm=comm)   # collective on ep_comm
    y = stage(x)            # tokens [b, s] int64 (first) or hidden [b, s, h] -> hidden or
                            # logits [b, s, V] (last); collective on ep_comm (MoE layers)
    loss = cross_entropy(y, targets)[0] / n + stage.aux_loss()   # last stage; aux on every stage
    sd = stage.global_state_dict()    # collective on ep_comm; union over stages == 1-stage sd

Layer ``i < spec.num_dense_layers`` has a ``DenseFFN``, the others an MoE block
(``piper_moe.layer.MoELayer``, experts spread over ``ep_comm``). Pre-norm residual blocks:
x + attn(norm1(x)), then x + ffn(norm2(x)).

Initialisation depends on (seed, global layer index, parameter name) only, never on the stage
split or on EP: each weight is drawn in float32 from its own generator seeded with
crc32(f"{seed}/{layer}/{name}") (normal(0, 0.02); the output projections attn.o and the FFN's
w2 use 0.02 / sqrt(2 * num_layers)), then cast; norms start at one; the MoE layer gets seed
crc32(f"{seed}/{layer}/moe") and initialises itself per global expert id. Layer ids "embed" and
"head" name the embedding and the LM head.

Parameter counts follow ``piper_moe/resource_model/params.py`` (see ``Stage.num_params``), with two
caveats: MoELayer's experts are always SwiGLU (a ``gelu`` model's MoE layers have 3 expert
matrices where params.py counts 2), and the router bias is a buffer, counted only for specs with
``moe.router_bias`` (as params.py does).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..layer.config import MoEConfig
from ..layer.precision import check_precision, param_dtype
from ..resource_model.spec import ModelSpec
from .blocks import DenseFFN, RMSNorm, make_attention, rope_dim, rope_tables

INIT_STD = 0.02


# -- configuration
def moe_config(spec: ModelSpec, **overrides) -> MoEConfig:
    """The MoEConfig of spec's MoE layers; overrides (aux_loss_coef, bias_update_rate,
    capacity_factor, router, ...) replace the derived fields.

    router: "sigmoid" when spec.moe.router_bias (DeepSeek-V3), else "softmax".
    Shared experts: MoEConfig's shared expert is one SwiGLU of width ffn_hidden *
    num_shared_experts. When spec's total shared width (shared_expert_ffn * num_shared_experts)
    is a multiple of expert_ffn, num_shared_experts is that multiple (same width, same
    parameters); otherwise it is 0 here and ``Block`` adds its own SwiGLU shared FFN of the
    spec's width next to the MoELayer (see ``extra_shared_ffn``).
    """
    m = spec.moe
    fields = {
        "hidden": spec.hidden,
        "ffn_hidden": m.expert_ffn,
        "num_experts": m.num_experts,
        "top_k": m.top_k,
        "num_shared_experts": _shared_multiple(spec),
        "router": "sigmoid" if m.router_bias else "softmax",
        "num_groups": m.num_groups,
        "topk_groups": m.top_groups,
    }
    known = set(MoEConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"moe_config: unknown MoEConfig fields {unknown} (known: {sorted(known)})")
    fields.update(overrides)
    return MoEConfig(**fields)


def _shared_multiple(spec: ModelSpec) -> int:
    m = spec.moe
    width = m.shared_expert_ffn * m.num_shared_experts
    return width // m.expert_ffn if width % m.expert_ffn == 0 else 0


def extra_shared_ffn(spec: ModelSpec) -> int:
    """Width of the shared FFN a Block adds beside the MoELayer: 0 when the MoELayer's own
    shared expert has the spec's width (the usual case), else shared_expert_ffn *
    num_shared_experts."""
    m = spec.moe
    if not m.num_shared_experts or _shared_multiple(spec):
        return 0
    return m.shared_expert_ffn * m.num_shared_experts


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model, for MFU (training: 3x this, no recompute).

    2 * active matmul parameters (attention, dense FFN or router + top_k routed + shared
    experts, LM head; not the embedding lookup) plus the attention core counted causal (half
    the s x s square): per layer and token, QK^T 2 * s * H * qk_dim and AV 2 * s * H * v_dim,
    halved, i.e. s * H * (qk_dim + v_dim) (= 2*2*s*H*d/2 for mha/gqa). The resource model's
    ``compute.model_flops_per_token`` computes exactly this, so it is reused.
    """
    from ..resource_model.compute import model_flops_per_token

    return model_flops_per_token(spec, seq_len)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                  ) -> tuple[torch.Tensor, int]:
    """(sum_loss, n_tokens): logits [..., V], targets int64 [...] (ignore_index: not counted).
    sum_loss is a 0-d float32 tensor summed over the counted tokens (divide by the global token
    count for a mean over a pipeline's or data-parallel group's micro-batches).
    NOTE: n_tokens is a host int (a device-to-host sync on GPU)."""
    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                           ignore_index=ignore_index, reduction="sum")
    return loss, int((flat != ignore_index).sum())


# -- initialisation
def _stable_seed(seed: int, layer, name: str) -> int:
    return zlib.crc32(f"{seed}/{layer}/{name}".encode())


@torch.no_grad()
def _init_normal(weight: torch.Tensor, seed: int, layer, name: str, std: float) -> None:
    """weight <- normal(0, std) drawn in float32 on the CPU from crc32(seed/layer/name)."""
    if weight.device.type == "meta":
        return
    g = torch.Generator().manual_seed(_stable_seed(seed, layer, name))
    weight.copy_(torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def _init_linears(module: nn.Module, prefix: str, seed: int, layer, num_layers: int) -> None:
    """Every Linear/Embedding weight under module (names prefix + local name)."""
    out_std = INIT_STD / math.sqrt(2 * num_layers)
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            full = f"{prefix}{name}.weight"
            std = out_std if name in ("o", "w2") else INIT_STD
            _init_normal(sub.weight, seed, layer, full, std)


# -- layers
class Block(nn.Module):
    """Global layer ``layer`` of spec: x [b, s, h] -> [b, s, h], pre-norm residual.

    Submodules: norm1, attn (Attention or MLAttention), norm2, ffn (DenseFFN for
    layer < num_dense_layers, else MoELayer(moe_config(spec, **moe_overrides), ep_comm,
    **moe_kwargs) on [b*s, h]) and, only when extra_shared_ffn(spec) > 0, shared (SwiGLU).
    Construction and forward are collective over ep_comm for MoE layers.
    forward(x, rope): rope = rope_tables(s, rope_dim(spec.attention)).
    """

    def __init__(self, spec: ModelSpec, layer: int, *, ep_comm=None, seed: int = 0,
                 dtype=torch.float32, device="cpu", moe_overrides: dict | None = None,
                 moe_kwargs: dict | None = None):
        super().__init__()
        self.layer = layer
        self.is_moe = layer >= spec.num_dense_layers
        self.norm1 = RMSNorm(spec.hidden, dtype=dtype, device=device)
        self.attn = make_attention(spec.hidden, spec.attention, dtype=dtype, device=device)
        self.norm2 = RMSNorm(spec.hidden, dtype=dtype, device=device)
        self.shared = None
        if self.is_moe:
            from ..layer.moe import MoELayer

            cfg = moe_config(spec, **(moe_overrides or {}))
            kwargs = dict(moe_kwargs or {})
            moe_seed = _stable_seed(seed, layer, "moe")
            if torch.device(device).type == "meta":
                # MoELayer draws on the CPU then moves; under the meta context nothing is
                # allocated (parameter counting of big models)
                with torch.device("meta"):
                    self.ffn = MoELayer(cfg, ep_comm, seed=moe_seed, dtype=dtype,
                                        device=device, **kwargs)
            else:
                self.ffn = MoELayer(cfg, ep_comm, seed=moe_seed, dtype=dtype, device=device,
                                    **kwargs)
            width = extra_shared_ffn(spec)
            if width:
                self.shared = DenseFFN(spec.hidden, width, "swiglu", dtype=dtype, device=device)
        else:
            self.ffn = DenseFFN(spec.hidden, spec.dense_ffn, spec.ffn_kind, dtype=dtype,
                                device=device)
        _init_linears(self.attn, "attn.", seed, layer, spec.num_layers)
        if not self.is_moe:
            _init_linears(self.ffn, "ffn.", seed, layer, spec.num_layers)
        if self.shared is not None:
            _init_linears(self.shared, "shared.", seed, layer, spec.num_layers)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        h = self.norm2(x)
        if self.is_moe:
            b, s, d = h.shape
            y = self.ffn(h.reshape(b * s, d)).view(b, s, d)
            if self.shared is not None:
                y = y + self.shared(h)
        else:
            y = self.ffn(h)
        return x + y


class Stage(nn.Module):
    """Global layers ``layers`` (a consecutive range) of spec, with the embedding if ``first``
    and the final norm + LM head if ``last``.

    Stage(spec, layers, *, first, last, ep_comm=None, seed=0, dtype=torch.float32,
          device="cpu", moe_overrides=None, moe_kwargs=None, precision="fp32")
        ep_comm: piper_comm.Communicator for the MoE layers' expert parallelism (None: EP=1).
            Construction is collective over it when the stage has MoE layers.
        moe_overrides: MoEConfig fields on top of moe_config(spec) (aux_loss_coef, ...).
        moe_kwargs: passed to every MoELayer (dedup, stats_comm, fp8_dispatch, ...), with
            precision added.
        precision: "fp32" (everything in dtype), "bf16-mixed" (parameters in dtype = float32;
            the forward runs under torch.autocast(bfloat16): attention, dense FFN and head
            GEMMs in bf16; RMSNorm, RoPE and the residual stream in float32; the MoE layers
            apply their own policy, piper_moe/layer/precision.py) or "bf16" (dtype must be
            bfloat16). The logits are bf16 under bf16-mixed; cross_entropy upcasts them.
        tied_embeddings needs first and last in the same Stage (ValueError otherwise).

    y = stage(x): first: x int64 tokens [b, s]; else x hidden [b, s, h]. Returns logits
        [b, s, V] if last, else hidden [b, s, h]. Every position uses RoPE positions 0..s-1.
        Collective over ep_comm (each rank passes its own batch; b may differ per rank).
    Submodules: embed (first), layers (ModuleDict keyed by the global index), norm and head
    (last; no head module when tied: the logits use embed.weight).
    """

    def __init__(self, spec: ModelSpec, layers: range, *, first: bool, last: bool,
                 ep_comm=None, seed: int = 0, dtype=torch.float32, device="cpu",
                 moe_overrides: dict | None = None, moe_kwargs: dict | None = None,
                 precision: str = "fp32"):
        super().__init__()
        check_precision(precision)
        if param_dtype(precision, dtype) != dtype:
            raise ValueError(f"Stage precision={precision!r} keeps parameters in "
                             f"{param_dtype(precision, dtype)}, got dtype={dtype}")
        self.precision = precision
        moe_kwargs = {**(moe_kwargs or {}), "precision": precision}
        if not isinstance(layers, range) or layers.step != 1:
            raise ValueError(f"Stage layers must be a consecutive range (got {layers!r})")
        if layers.start < 0 or layers.stop > spec.num_layers or layers.start > layers.stop:
            raise ValueError(f"Stage layers {layers} outside [0, num_layers={spec.num_layers}) "
                             f"of model {spec.name}")
        if spec.tied_embeddings and not (first and last):
            raise ValueError(f"model {spec.name} has tied_embeddings: the embedding and the LM "
                             f"head must be in the same Stage (got first={first}, last={last} "
                             f"for layers {layers}); use one Stage or an untied spec")
        self.spec, self.layer_range, self.first, self.last = spec, layers, first, last
        self.ep_comm = ep_comm
        self._dtype, self._device = dtype, torch.device(device)
        self.rope_dim = rope_dim(spec.attention)
        self.embed = (nn.Embedding(spec.vocab, spec.hidden, dtype=dtype, device=device)
                      if first else None)
        if self.embed is not None:
            _init_normal(self.embed.weight, seed, "embed", "weight", INIT_STD)
        self.layers = nn.ModuleDict({
            str(i): Block(spec, i, ep_comm=ep_comm, seed=seed, dtype=dtype, device=device,
                          moe_overrides=moe_overrides, moe_kwargs=moe_kwargs)
            for i in layers})
        self.norm = RMSNorm(spec.hidden, dtype=dtype, device=device) if last else None
        self.head = None
        if last and not spec.tied_embeddings:
            self.head = nn.Linear(spec.hidden, spec.vocab, bias=False, dtype=dtype,
                                  device=device)
            _init_normal(self.head.weight, seed, "head", "weight", INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision != "bf16-mixed":
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"first Stage takes int64 tokens [b, s] (got {x.dtype} "
                                 f"{list(x.shape)})")
            x = self.embed(x)
        elif x.dim() != 3 or x.shape[-1] != self.spec.hidden:
            raise ValueError(f"Stage takes hidden [b, s, {self.spec.hidden}] (got "
                             f"{list(x.shape)})")
        rope = rope_tables(x.shape[1], self.rope_dim, x.device)
        for block in self.layers.values():
            x = block(x, rope)
        if self.last:
            x = self.norm(x)
            x = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        return x

    # -- MoE and accounting
    def moe_layers(self) -> list:
        """The MoELayer of every MoE block of this stage, in global layer order."""
        return [b.ffn for b in self.layers.values() if b.is_moe]

    def aux_loss(self) -> torch.Tensor:
        """Sum of this stage's MoE layers' aux_loss from the latest forward (this rank's share,
        see MoELayer); a 0-d zero when the stage has no MoE layer."""
        losses = [m.aux_loss for m in self.moe_layers()]
        if not losses:
            return torch.zeros((), dtype=self._dtype, device=self._device)
        return torch.stack(losses).sum()

    def num_params(self) -> int:
        """Parameters held here (this rank's experts only under EP), counted as params.py does:
        plus the router bias buffers when spec.moe.router_bias."""
        n = sum(p.numel() for p in self.parameters())
        if self.spec.moe.router_bias:
            n += sum(m.router.bias.numel() for m in self.moe_layers())
        return n

    # -- whole-model state across stage splits and EP layouts
    def _moe_prefixes(self) -> dict[str, nn.Module]:
        return {f"layers.{i}.ffn.": b.ffn for i, b in self.layers.items() if b.is_moe}

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's part of the full model (all experts, global order) as detached CPU
        tensors, keyed by global names ("embed.weight", "layers.<i>.attn.qkv.weight", ...,
        "norm.weight", "head.weight"): the union over a pipeline's stages equals the 1-stage
        model's dict. Collective over ep_comm when the stage has MoE layers."""
        prefixes = self._moe_prefixes()
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
              if not k.startswith(tuple(prefixes))}
        for prefix, moe in prefixes.items():
            sd.update({prefix + k: v for k, v in moe.global_state_dict().items()})
        return sd

    @torch.no_grad()
    def load_global_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Loads this stage's part from a full-model dict (as global_state_dict returns, from
        any split or layout; extra keys are ignored): this rank's expert slices and every other
        tensor. Local; every EP rank passes the same dict."""
        prefixes = self._moe_prefixes()
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(prefixes))}
        missing = sorted(k for k in own if k not in sd)
        for prefix, moe in prefixes.items():
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            missing += sorted(prefix + k for k in moe.state_dict() if k not in sub)
        if missing:
            raise KeyError(f"load_global_state_dict: {len(missing)} keys of layers "
                           f"{self.layer_range} missing, e.g. {missing[:5]}")
        for k, t in own.items():
            t.copy_(sd[k])
        for prefix, moe in prefixes.items():
            moe.load_global_state_dict({k[len(prefix):]: v for k, v in sd.items()
                                        if k.startswith(prefix)})
