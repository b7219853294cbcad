"""FLOPs and compute time of one layer for one micro-batch on one rank.

GEMM time (``gemm_time``), for an [M, K] x [K, N] product of e-byte elements:
``max(2*M*N*K / (peak(e) * eff(d)), e*(M*K + K*N + M*N) / hbm_bandwidth) + launch_overhead`` with
peak(e) the platform's peak for that element size (``PlatformSpec.peak``: fp32 or 16-bit),
``eff(d) = max_efficiency * d / (d + half_dim)`` and d = min(M, N, K): a skinny GEMM (few tokens per
expert) runs far below peak, and a very skinny one becomes memory bound.

Attention core (flash attention, causal): ``2*b*s^2*a*(d_qk + d_v) / 2`` FLOPs per layer forward,
at ``platform.attention_flops`` FLOP/s (``attention_flops_fp32`` in fp32) when calibrated, else
timed like a GEMM whose smallest dimension is d_qk + d_v. Element-wise work (norms, residual
adds, activation functions, MoE permutes, router softmax) is timed by bytes moved at HBM bandwidth.
Backward costs twice the forward (input and weight gradients; the attention core
``platform.attention_backward``, in fp32 ``attention_backward_fp32``, times its forward); the
weight-gradient half is what zero-bubble
schedules defer. With scaled FP8 expert GEMMs (``scaled_fp8_gemm``) the experts' up
projections run forward at ``peak_flops_fp8`` on 1-byte inputs; their backward stays bf16, so a
layer's backward is twice its bf16 forward (``LayerCompute.fp8_saved`` gives the difference).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import PRECISION_BYTES, shapes
from .params import attention_linears, ffn_linears, moe_layer_linears
from .spec import ModelSpec, PlatformSpec
from .strategy import Strategy, scaled_fp8_gemm


def gemm_efficiency(d: float, platform: PlatformSpec) -> float:
    """Fraction of peak reached by a GEMM whose smallest dimension is ``d``."""
    g = platform.gemm
    return g.max_efficiency * d / (d + g.half_dim)


def gemm_time(m: float, n: float, k: float, platform: PlatformSpec, elem_bytes: int = 2,
              peak: float | None = None) -> float:
    """Seconds for one [m, k] x [k, n] GEMM (see module docstring); peak: FLOP/s to reach at
    full efficiency (None: the platform's peak for e-byte elements, ``PlatformSpec.peak``)."""
    if min(m, n, k) <= 0:
        return 0.0
    flops = 2.0 * m * n * k
    t_flops = flops / ((peak or platform.peak(elem_bytes))
                       * gemm_efficiency(min(m, n, k), platform))
    t_bytes = elem_bytes * (m * k + k * n + m * n) / platform.hbm_bandwidth
    return max(t_flops, t_bytes) + platform.gemm.launch_overhead


@dataclass(kw_only=True, frozen=True)
class LayerCompute:
    """Forward seconds of one layer for one micro-batch, by part; FLOPs of the same."""

    gemm: float
    attention_core: float
    elementwise: float
    flops: float
    fp8_saved: float = 0.0  # forward GEMM seconds the scaled FP8 expert GEMMs save (0: none)

    @property
    def total(self) -> float:
        return self.gemm + self.attention_core + self.elementwise


def attention_core_flops(model: ModelSpec, micro_batch: int, seq_len: int) -> float:
    """Causal attention-core FLOPs of one layer forward, whole model width (not split by TP)."""
    a = model.attention
    return micro_batch * seq_len**2 * a.num_heads * (a.qk_head_dim + a.v_dim)


def model_flops_per_token(model: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model (matmuls with active parameters + attention
    core). Training counts 3x this (MFU convention: no recompute)."""
    from .params import dense_layer_linears

    total = 0.0
    for n, linears in ((model.num_dense_layers, dense_layer_linears(model)),
                       (model.num_moe_layers, moe_layer_linears(model))):
        total += n * sum(2.0 * lin.d_in * lin.d_out * lin.active for lin in linears)
    total += model.num_layers * attention_core_flops(model, 1, seq_len) / seq_len
    total += 2.0 * model.hidden * model.vocab
    return total


def _linears_time(linears, rows: float, s: Strategy, platform: PlatformSpec,
                  e: int) -> tuple[float, float]:
    t = flops = 0.0
    for lin in linears:
        n_out = lin.d_out / s.tp if lin.shard == "tp" else lin.d_out
        t += gemm_time(rows, n_out, lin.d_in, platform, e)
        flops += 2.0 * rows * n_out * lin.d_in
    return t, flops


def layer_compute(model: ModelSpec, platform: PlatformSpec, s: Strategy,
                  moe_layer: bool) -> LayerCompute:
    """Forward compute of one (dense or MoE) layer for one micro-batch on one rank."""
    e = PRECISION_BYTES[s.precision][3]
    h = model.hidden
    sh = shapes(model, s)
    T = sh.tokens
    gated = model.ffn_kind == "swiglu"
    fp8_saved = 0.0
    t_gemm, flops = _linears_time(attention_linears(model), T, s, platform, e)
    a = model.attention
    core_flops = attention_core_flops(model, s.micro_batch, s.seq_len) / s.tp
    d = a.qk_head_dim + a.v_dim
    t_core = core_flops / (platform.attention(e)[0]
                           or platform.peak(e) * gemm_efficiency(d, platform))
    flops += core_flops
    # norms (read + write), two residual adds (2 reads + 1 write)
    ew_bytes = (2 * 2 + 2 * 3) * T * h / s.sp * e
    if not moe_layer:
        t, f = _linears_time(ffn_linears(h, model.dense_ffn, gated, "mlp", "tp"), T, s, platform, e)
        t_gemm += t
        flops += f
        ew_bytes += 3 * T * model.dense_ffn / s.tp * e
    else:
        m = model.moe
        t, f = _linears_time(
            [lin for lin in moe_layer_linears(model) if lin.name == "router"], sh.moe_tokens, s,
            platform, e)
        t_gemm += t
        flops += f
        if m.num_shared_experts:
            shared = ffn_linears(h, m.shared_expert_ffn * m.num_shared_experts, gated, "shared",
                                 "tp")
            t, f = _linears_time(shared, T, s, platform, e)
            t_gemm += t
            flops += f
            ew_bytes += 3 * T * m.shared_expert_ffn * m.num_shared_experts / s.tp * e
        t_fwd = routed_expert_gemm_time(model, platform, s)
        t_gemm += t_fwd
        fp8_saved = routed_expert_gemm_time(model, platform, s, fp8=False) - t_fwd
        ffn = m.expert_ffn / s.etp
        flops += 2.0 * sh.expert_rows * h * ((2 if gated else 1) * ffn + ffn)
        # router softmax/top-k, SiLU-and-mul, permute and unpermute copies
        ew_bytes += 2 * sh.moe_tokens * m.num_experts * 4 + 3 * sh.expert_rows * ffn * e
        ew_bytes += 4 * sh.expert_rows * h * e
    return LayerCompute(gemm=t_gemm, attention_core=t_core,
                        elementwise=ew_bytes / platform.hbm_bandwidth, flops=flops,
                        fp8_saved=fp8_saved)


def routed_expert_gemm_time(model: ModelSpec, platform: PlatformSpec, s: Strategy,
                            fp8: bool | None = None) -> float:
    """Forward GEMM seconds of this rank's routed experts for one micro-batch: per local
    expert, R / E_local rows through the up (gate|up) and down projections; fp8 (None:
    scaled_fp8_gemm): the up projection as a scaled FP8 GEMM (1-byte inputs, FP8 peak)."""
    e = PRECISION_BYTES[s.precision][3]
    sh = shapes(model, s)
    rows = sh.expert_rows / sh.local_experts  # per local expert
    ffn = model.moe.expert_ffn / s.etp
    up = (2 if model.ffn_kind == "swiglu" else 1) * ffn
    h = model.hidden
    if fp8 is None:
        fp8 = scaled_fp8_gemm(model, platform, s)
    t_up = (gemm_time(rows, up, h, platform, 1, platform.peak_flops_fp8) if fp8
            else gemm_time(rows, up, h, platform, e))
    return sh.local_experts * (t_up + gemm_time(rows, h, ffn, platform, e))


def head_compute(model: ModelSpec, platform: PlatformSpec, s: Strategy) -> LayerCompute:
    """Forward compute of the final norm, output head and loss for one micro-batch."""
    e = PRECISION_BYTES[s.precision][3]
    T = s.micro_batch * s.seq_len
    v = model.vocab / s.tp
    t = gemm_time(T, v, model.hidden, platform, e)
    ew = (2 * 2 * T * model.hidden / s.sp * e) + 3 * T * v * 4
    return LayerCompute(gemm=t, attention_core=0.0, elementwise=ew / platform.hbm_bandwidth,
                        flops=2.0 * T * v * model.hidden)
