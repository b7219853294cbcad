"""Memory per rank (bytes) for one pipeline stage: weights, gradients, optimizer states,
activations, MoE dispatch/combine buffers, transient working memory.

Activations are the tensors autograd keeps for backward in Piper's runtime
(``piper_moe.transformer`` blocks and ``piper_moe.layer``, validated tensor by tensor in
``bench/model_validation.py``). Per micro-batch, T = micro_batch * seq_len tokens, e bytes per
activation element, t = TP, t_sp = TP with sequence parallelism (else 1), h = hidden:

- RMSNorm (plain ops): its input, the normalised input and the scaled output (the next linear's
  input), 3*T*h/t_sp per norm.
- attention (MHA/GQA): its norm 3*T*h/t_sp; RoPE'd Q, and K and V
  expanded to all a query heads (GQA repeats K/V heads before SDPA) 3*T*a*d/t; the SDPA output
  once T*a*d/t (the output projection reads it through a view); log-sum-exp T*a*4/t (fp32). No
  T x T score matrix (flash attention).
- dense FFN (SwiGLU): its norm 3*T*h/t_sp; gate output, SiLU output, up output and their
  product, 4*T*f/t. (GeLU: up output and GeLU output 2*T*f/t.)
- MoE: its norm 3*T_m*h (T_m = T/t_sp tokens routed by this rank); router probabilities
  T_m*E*4 (fp32) and top-k indices/weights T_m*k*(8+4+4); expert input rows R*h and routing
  metadata R*16 (sort permutation and token ids, int64); expert FFN 4*R*f/etp; combine: the
  expert output rows back in token order and their product with the gate weights, 2*T_m*k*h, the
  weights T_m*k*4 and two int64 orders T_m*k*16; shared experts like a dense FFN on T tokens. R,
  rows per rank entering the experts: padding-free R = T_m*k*etp*imbalance; capacity-padded
  R = capacity_factor*T_m*k*etp (every expert's buffer padded to its capacity).
  PPMoE dispatcher (``layer/ppmoe.py``): the router runs on the group's T_g = T_m*tp tokens
  (all-gathered input T_g*h kept, probabilities T_g*E*4, top-k T_g*k*16); the R pairs of this
  rank's experts are selected by index (rows R*h, metadata R*16) and their outputs and
  weighted outputs kept (2*R*h, weights R*4). Chunked layer (``moe_chunks`` C > 1,
  ``layer/chunked.py``): no expert FFN internals (the backward recomputes the experts), the
  plan's four int64 row maps R*32, the rows R*h only with chunk_memory "save"; its forward
  buffers and backward recompute are working memory (``chunked_moe_working``).
- head (last stage): final norm 3*T*h/t_sp and fp32 log-softmax T*V/t*4.

Precision "bf16-mixed" (Piper's runtime policy, ``piper_moe/layer/precision.py``): weights,
gradients and AdamW states 4 + 4 + 8 bytes per parameter (fp32, the parameters are the master
copy); e = 2 for what the GEMMs read and write in bf16 (attention core, FFN and expert
internals, dispatched rows, the expert outputs of the combine) and 4 for the residual stream
(``residual_bytes``): each RMSNorm keeps its fp32 input and normalised input plus the bf16 copy
of its output that autocast makes for the next GEMM (the MoE block's norm output stays fp32 for
the router, its bf16 copy is kept by the shared expert), the combine's weighted product is
fp32, the layer inputs and pipeline sends are fp32. Every GEMM weight (attention, dense FFN,
this rank's experts, shared experts, head; not the fp32 router) is cast to bf16 in each
micro-batch's forward and the copy is kept for its backward: 2 bytes per such parameter per
micro-batch in flight (``weight_copies``). With ``fp8_dispatch`` the dispatch buffers carry
(h + 4 * ceil(h / 128)) bytes per row (e4m3 + fp32 scales): forward working memory only,
smaller than the bf16 buffers it replaces and gone before the backward peak priced in
``_transient`` (whose exchanges are bf16); the expert input rows the layer keeps are the
dequantized bf16 ones, so nothing here changes with it (its bytes enter the all-to-all time,
``estimate._stage_time``), except with scaled FP8 expert GEMMs (``fp8_gemm``,
``strategy.resolve_fp8_gemm``): the routed experts' up-projection weights are then kept as
e4m3 + a float32 scale per 128 (1.03 bytes per parameter) instead of a bf16 copy, and the
expert input rows as the delivered e4m3 rows and scales (``fp8_row_bytes``) instead of bf16.

Recompute "full" keeps only each layer's input T*h/t_sp; "selective" drops norm outputs and
activation-function outputs (recomputed in backward). In-flight micro-batches per stage come from
``pipeline.in_flight``. Routed experts are split by EP x ETP, never by TP.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layer.config import FP8_BLOCK, fp8_row_bytes
from .params import (
    Linear,
    attention_linears,
    dense_layer_linears,
    layer_norm_params,
    moe_layer_linears,
)
from .pipeline import in_flight
from .spec import ModelSpec, PlatformSpec
from .strategy import Strategy, resolve_fp8_gemm

# bytes per element of (weights, gradients, optimizer states, activations)
PRECISION_BYTES = {"bf16": (2, 4, 12, 2), "bf16-mixed": (4, 4, 8, 2), "fp32": (4, 4, 8, 4)}
# bytes per element of the residual stream (block inputs and outputs, norms, pipeline sends)
RESIDUAL_BYTES = {"bf16": 2, "bf16-mixed": 4, "fp32": 4}
WEIGHT_COPY_BYTES = 2  # bf16-mixed: the bf16 copy of a GEMM weight kept for backward
INDEX_BYTES = 8  # int64 indices
FP32 = 4


@dataclass(kw_only=True, frozen=True)
class Shapes:
    """Token and row counts of one micro-batch on one rank (counts, not bytes)."""

    tokens: int  # T = micro_batch * seq_len
    moe_tokens: float  # T_m = T / t_sp, tokens this rank routes
    expert_rows: float  # R, rows entering this rank's experts
    local_experts: int  # E / ep


def shapes(model: ModelSpec, s: Strategy) -> Shapes:
    """Token and row counts per micro-batch and rank."""
    m = model.moe
    tokens = s.micro_batch * s.seq_len
    moe_tokens = tokens / s.sp
    routed = moe_tokens * m.top_k * s.etp
    rows = routed * (s.expert_imbalance if s.capacity_factor is None else s.capacity_factor)
    return Shapes(tokens=tokens, moe_tokens=moe_tokens, expert_rows=rows,
                  local_experts=m.num_experts // s.ep)


def _norm_elems(elems: float, recompute: str) -> float:
    """Saved elements of one RMSNorm over ``elems`` input elements: input, normalised input and
    output; selective recompute keeps the input only."""
    return elems * (1 if recompute == "selective" else 3)


def residual_bytes(s: Strategy) -> int:
    """Bytes per element of the residual stream under s.precision (RESIDUAL_BYTES)."""
    return RESIDUAL_BYTES[s.precision]


def _norm_bytes(elems: float, s: Strategy, output_cast: bool = True) -> float:
    """Saved bytes of one RMSNorm over ``elems`` elements: input and normalised input at the
    residual width, its output at the activation width (the same tensor when they are equal);
    under bf16-mixed the output's bf16 copy (``output_cast``: a GEMM reads it) or the fp32
    output itself (not output_cast: the MoE router reads it). Selective recompute: the
    input only."""
    e, r = PRECISION_BYTES[s.precision][3], residual_bytes(s)
    if s.recompute == "selective":
        return elems * r
    if e == r:
        return _norm_elems(elems, s.recompute) * e
    return elems * (2 * r + (e if output_cast else r))


def weight_copies(linears: tuple[Linear, ...], s: Strategy) -> float:
    """Bytes of the low-precision copies of ``linears``' GEMM weights (this rank's share) that
    a forward keeps for backward: bf16 under bf16-mixed (0 for other precisions; the router
    stays fp32); with scaled FP8 expert GEMMs (s.fp8_gemm "scaled", as resolve_fp8_gemm
    sets it) the routed experts' up projections are kept in e4m3 with a float32 scale per
    128 elements instead (under bf16 too: the bf16 weights themselves are not copied)."""
    kept = tuple(lin for lin in linears if lin.name != "router")
    fp8 = s.fp8_dispatch and s.fp8_gemm == "scaled"
    fp8_up = tuple(lin for lin in kept if fp8 and lin.name == "expert_up")
    total = 0.0
    if s.precision == "bf16-mixed":
        dense, expert = rank_params(tuple(lin for lin in kept if lin not in fp8_up), s)
        total += (dense + expert) * WEIGHT_COPY_BYTES
    if fp8_up:
        dense, expert = rank_params(fp8_up, s)
        total += (dense + expert) * fp8_row_bytes(FP8_BLOCK) / FP8_BLOCK
    return total


def _ffn_act(rows: float, ffn: float, gated: bool, recompute: str) -> float:
    """Saved elements of one FFN's internals on ``rows`` rows of width ``ffn`` (per shard)."""
    if gated:  # fused gate|up (2f), SiLU output (f), product (f)
        return rows * ffn * (3 if recompute == "selective" else 4)
    return rows * ffn * (1 if recompute == "selective" else 2)  # up (f), GeLU output (f)


def attention_activations(model: ModelSpec, s: Strategy) -> float:
    """Bytes saved by one attention block for one micro-batch (no recompute)."""
    a, h, t = model.attention, model.hidden, s.tp
    e = PRECISION_BYTES[s.precision][3]
    T = s.micro_batch * s.seq_len
    norms = _norm_bytes(T * h / s.sp, s)
    if a.kind == "mla":
        lora = (a.q_lora_rank * 2 if a.q_lora_rank else 0) + 2 * a.kv_lora_rank + a.qk_rope_head_dim
        core = T * a.num_heads * (2 * a.qk_head_dim + a.qk_nope_head_dim + a.v_head_dim) / t
        elems = T * lora + core + 2 * T * a.num_heads * a.v_head_dim / t
    else:
        qkv = T * 3 * a.num_heads * a.head_dim / t  # K/V repeated to every query head
        elems = qkv + T * a.num_heads * a.head_dim / t
    return (norms + elems * e + T * a.num_heads * FP32 / t
            + weight_copies(attention_linears(model), s))


def dense_mlp_activations(model: ModelSpec, s: Strategy) -> float:
    """Bytes saved by one dense FFN block for one micro-batch (no recompute)."""
    e = PRECISION_BYTES[s.precision][3]
    T = s.micro_batch * s.seq_len
    norms = _norm_bytes(T * model.hidden / s.sp, s)
    inner = _ffn_act(T, model.dense_ffn / s.tp, model.ffn_kind == "swiglu", s.recompute)
    return norms + inner * e + weight_copies(dense_layer_linears(model)[
        len(attention_linears(model)):], s)


def moe_activations(model: ModelSpec, s: Strategy) -> dict[str, float]:
    """Bytes saved by one MoE block for one micro-batch (no recompute), split into
    ``"moe_buffers"`` (router, dispatch, combine, routing metadata) and ``"activations"``
    (norms, expert and shared-expert FFN internals). Per dispatcher (module docstring) and, for
    the chunked all-to-all layer (``s.moe_chunks`` > 1), per ``s.chunk_memory``."""
    m, h = model.moe, model.hidden
    e = PRECISION_BYTES[s.precision][3]
    sh = shapes(model, s)
    gated = model.ffn_kind == "swiglu"
    R = sh.expert_rows
    norms = _norm_bytes(sh.moe_tokens * h, s, output_cast=False)
    if s.precision == "bf16-mixed" and m.num_shared_experts and s.recompute != "selective":
        norms += sh.moe_tokens * h * e  # the bf16 copy of the layer input the shared expert reads
    # the GEMM weights' bf16 copies (this rank's experts, shared experts; not the router)
    norms += weight_copies(moe_layer_linears(model)[len(attention_linears(model)):], s)
    experts = _ffn_act(R, m.expert_ffn / s.etp, gated, s.recompute) * e
    shared = 0.0
    if m.num_shared_experts:
        ffn = m.shared_expert_ffn * m.num_shared_experts / s.tp
        shared = _ffn_act(sh.tokens, ffn, gated, s.recompute) * e
    if s.dispatcher == "ppmoe":
        # every rank of the group routes the group's tokens (its shards all-gathered: the
        # router's input is kept), selects its experts' R pairs by index and sums their weighted
        # outputs into a partial [T, h]: the expert outputs and their products (R rows each)
        group = sh.moe_tokens * s.tp
        router = group * (m.num_experts * FP32 + m.top_k * (INDEX_BYTES + 2 * FP32) + h * e)
        dispatch = R * (h * e + 2 * INDEX_BYTES)
        combine = R * (2 * h * e + FP32)
        return {"activations": norms + experts + shared,
                "moe_buffers": router + dispatch + combine}
    routed = sh.moe_tokens * m.top_k
    router = sh.moe_tokens * m.num_experts * FP32 + routed * (INDEX_BYTES + 2 * FP32)
    # expert outputs back in token order (e) and their product with the gate weights
    # (accumulated in at least fp32 under bf16-mixed: residual width)
    combine = routed * (h * e + h * residual_bytes(s) + FP32 + 2 * INDEX_BYTES)
    if s.moe_chunks > 1:
        # chunked layer: the backward recomputes the experts (no internals kept); the plan keeps
        # four int64 row maps of the received rows; the rows themselves per chunk_memory
        experts = 0.0
        dispatch = R * (4 * INDEX_BYTES + (h * e if s.chunk_memory == "save" else 0))
    else:  # the expert input rows; e4m3 + scales when the scaled FP8 GEMMs keep them
        fp8 = s.fp8_dispatch and s.fp8_gemm == "scaled"
        dispatch = R * ((fp8_row_bytes(h) if fp8 else h * e) + 2 * INDEX_BYTES)
    return {"activations": norms + experts + shared, "moe_buffers": router + dispatch + combine}


def moe_layer_saved(model: ModelSpec, s: Strategy) -> float:
    """Bytes a standalone MoE layer (``piper_moe.MoELayer``, no RMSNorm before it) saves for
    backward per micro-batch: ``moe_activations`` with the block's norm (3 [T_m, h] tensors)
    replaced by the layer input it feeds (1 [T_m, h]). For checking the formulas against a
    layer measured alone (tests/model/test_layer_memory.py, ``bench/moe_layer.py``)."""
    a = moe_activations(model, s)
    T_m = shapes(model, s).moe_tokens
    r = residual_bytes(s)
    return (a["activations"] + a["moe_buffers"]
            - _norm_bytes(T_m * model.hidden, s, output_cast=False) + T_m * model.hidden * r)


def chunked_moe_working(model: ModelSpec, s: Strategy) -> dict[str, float]:
    """Working bytes of one chunked MoE layer (``s.moe_chunks`` = C > 1) on top of what it
    keeps, at its two fullest moments. ``"forward"``: the gathered send rows (N*h), the
    receive, expert-output and combine buffers of all chunks (every chunk's exchange is in
    flight at once: 2*R*h + N*h), the reordered rows and outputs handed to autograd
    (2*R*h + N*h), and one chunk's expert intermediates and input scratch (R/C rows).
    ``"backward"``: the experts recomputed on all R rows (their intermediates 4*R*f, or 2*R*f
    for GeLU) and, unless the rows were kept, the re-dispatched rows R*h. N = T_m*k pairs
    sent, R rows received."""
    m, h = model.moe, model.hidden
    e = PRECISION_BYTES[s.precision][3]
    sh = shapes(model, s)
    R, N, C = sh.expert_rows, sh.moe_tokens * m.top_k, s.moe_chunks
    ffn = m.expert_ffn / s.etp
    inner = _ffn_act(1.0, ffn, model.ffn_kind == "swiglu", "none")  # elements per row
    fwd = (4 * R + 3 * N) * h + (R / C) * (inner + 2 * h)
    bwd = R * inner + (R * h if s.chunk_memory != "save" else 0.0)
    return {"forward": fwd * e, "backward": bwd * e}


def head_activations(model: ModelSpec, s: Strategy) -> float:
    """Bytes saved by the final norm, output head and loss for one micro-batch."""
    T = s.micro_batch * s.seq_len
    head = weight_copies((Linear(name="head", d_in=model.hidden, d_out=model.vocab,
                                 shard="tp"),), s)
    return (_norm_bytes(T * model.hidden / s.sp, s) + T * model.vocab / s.tp * FP32
            + T * INDEX_BYTES + head)


def layer_input_bytes(model: ModelSpec, s: Strategy) -> float:
    """Bytes of one layer's input (what full recompute keeps per layer and micro-batch)."""
    return s.micro_batch * s.seq_len * model.hidden / s.sp * residual_bytes(s)


def layer_activations(model: ModelSpec, s: Strategy, moe_layer: bool) -> dict[str, float]:
    """Saved bytes of one layer for one micro-batch under ``s.recompute``:
    {"activations", "moe_buffers"}."""
    if s.recompute == "full":
        return {"activations": layer_input_bytes(model, s), "moe_buffers": 0.0}
    attn = attention_activations(model, s)
    if not moe_layer:
        return {"activations": attn + dense_mlp_activations(model, s), "moe_buffers": 0.0}
    moe = moe_activations(model, s)
    return {"activations": attn + moe["activations"], "moe_buffers": moe["moe_buffers"]}


def _full_layer(model: ModelSpec, s: Strategy, moe_layer: bool) -> float:
    """Bytes of one layer's activations without any recompute (what full recompute rebuilds)."""
    import dataclasses

    full = dataclasses.replace(s, recompute="none")
    act = layer_activations(model, full, moe_layer)
    return act["activations"] + act["moe_buffers"]


def rank_params(linears: tuple[Linear, ...], s: Strategy) -> tuple[float, float]:
    """(dense, expert) parameter counts of ``linears`` held by one rank."""
    dense = expert = 0.0
    for lin in linears:
        if lin.shard == "expert":
            expert += lin.copies / s.ep * lin.d_in * lin.d_out / s.etp
        elif lin.shard == "tp":
            dense += lin.params / s.tp
        else:
            dense += lin.params
    return dense, expert


def stage_layer_kinds(model: ModelSpec, s: Strategy, stage: int) -> tuple[int, int]:
    """(dense layers, MoE layers) held by pipeline rank ``stage``."""
    split = s.stage_layers(model.num_layers)
    start = sum(split[:stage])
    end = start + split[stage]
    dense = max(0, min(end, model.num_dense_layers) - start)
    return dense, split[stage] - dense


def stage_params(model: ModelSpec, s: Strategy, stage: int) -> tuple[float, float]:
    """(dense, expert) parameter counts held by one rank of pipeline stage ``stage``."""
    n_dense, n_moe = stage_layer_kinds(model, s, stage)
    dense = expert = 0.0
    for n, moe_layer in ((n_dense, False), (n_moe, True)):
        if n == 0:
            continue
        d, x = rank_params(moe_layer_linears(model) if moe_layer else dense_layer_linears(model), s)
        dense += n * (d + layer_norm_params(model, moe_layer))
        expert += n * x
    vh = model.vocab * model.hidden / s.tp
    if stage == 0:
        dense += vh
    if stage == s.pp - 1:
        dense += model.hidden + (0 if (model.tied_embeddings and s.pp == 1) else vh)
    return dense, expert


def _transient(model: ModelSpec, s: Strategy, stage: int, n_dense: int, n_moe: int) -> float:
    """Peak working memory on top of the saved activations (bytes). The peak is the larger of
    two moments of the backward pass: the loss backward on the last stage (fp32 gradients of the
    log-softmax and of the logits, 2*T*V/t*4, next to every saved tensor), and the backward of
    the stage's last layer (the head's saved tensors of that micro-batch are freed by then): that
    layer's widest gradients, the layer rebuilt by full recompute, all-to-all staging. ZeRO-3
    adds the gathered weights of two layers. (``stage_memory`` adds the pipeline sends,
    ``p2p_buffers``.)"""
    e = PRECISION_BYTES[s.precision][3]
    sh = shapes(model, s)
    T, h = sh.tokens, model.hidden
    last = stage == s.pp - 1
    loss = 2 * T * model.vocab / s.tp * FP32 if last else 0.0
    # gradients of one layer's widest tensors while its saved tensors are alive
    dense_ffn = model.dense_ffn / s.tp if n_dense else 0.0
    layer_grad = max(3 * T * dense_ffn * e,
                     (3 * sh.expert_rows * model.moe.expert_ffn / s.etp + sh.expert_rows * h) * e
                     if n_moe else 0.0,
                     2 * T * h / s.sp * residual_bytes(s))
    rebuild = 0.0
    if s.recompute == "full":
        rebuild = max(_full_layer(model, s, False) if n_dense else 0.0,
                      _full_layer(model, s, True) if n_moe else 0.0)
        rebuild -= layer_input_bytes(model, s)  # the kept input is already counted
    a2a = 2 * sh.expert_rows * h * e if (n_moe and s.ep > 1) else 0.0
    chunk_fwd = 0.0
    if n_moe and s.moe_chunks > 1:
        work = chunked_moe_working(model, s)
        rebuild += work["backward"]
        chunk_fwd = work["forward"]
    freed = head_activations(model, s) if last else 0.0
    layer = max(layer_grad + rebuild + a2a - freed, chunk_fwd)
    gather = 0.0
    if s.zero == 3:
        d, x = stage_params(model, s, stage)
        layers = max(1, n_dense + n_moe)
        gather = 2 * (d + x) / layers * PRECISION_BYTES[s.precision][0]
    return max(loss, layer, 0.0) + gather


def weight_grad_inputs(model: ModelSpec, s: Strategy, stage: int) -> float:
    """Bytes one micro-batch holds between its ZB-H1 "B" and "W" on pipeline stage ``stage`` >
    0, on top of its activations: torch's split backward (stage_backward_input) keeps the
    gradient of every weight's output (dY, rows x d_out of each linear: attention, FFNs,
    router, shared and routed experts, and the head's fp32 logits on the last stage) for the
    deferred weight gradient. Stage 0 runs its whole backward in B (nothing to defer)."""
    if stage == 0:
        return 0.0
    e = PRECISION_BYTES[s.precision][3]
    sh = shapes(model, s)
    n_dense, n_moe = stage_layer_kinds(model, s, stage)

    def outputs(linears, moe_layer: bool) -> float:
        total = 0.0
        for lin in linears:
            if lin.shard == "expert":
                total += sh.expert_rows * lin.d_out / s.etp
            elif lin.name == "router":
                total += sh.moe_tokens * lin.d_out
            else:
                total += sh.tokens * lin.d_out / (s.tp if lin.shard == "tp" else 1)
        return total * e

    out = n_dense * outputs(dense_layer_linears(model), False) if n_dense else 0.0
    out += n_moe * outputs(moe_layer_linears(model), True) if n_moe else 0.0
    if stage == s.pp - 1:
        out += sh.tokens * model.vocab / s.tp * FP32
    return out


def p2p_buffers(model: ModelSpec, s: Strategy, stage: int) -> float:
    """Bytes of pipeline sends alive at the peak: Piper's engine posts every activation (forward)
    and input-gradient (backward) send as an isend and waits for them at the end of the step, so
    each of the ``num_micro`` micro-batches leaves one [T, h] buffer per send direction of each of
    this rank's chunks (forward: chunks before the last virtual stage; backward: after the
    first)."""
    if s.pp == 1:
        return 0.0
    chunks = [stage + k * s.pp for k in range(s.vpp)]
    last = s.pp * s.vpp - 1
    sends = sum(c < last for c in chunks) + sum(c > 0 for c in chunks)
    return sends * s.num_micro * layer_input_bytes(model, s)


def stage_memory(model: ModelSpec, platform: PlatformSpec, s: Strategy,
                 stage: int, *, persistent_grads: bool = True) -> dict[str, float]:
    """Bytes per rank of pipeline stage ``stage`` by component, with ``"total"``: what is live
    at the stage's peak.

    ``persistent_grads``: gradients live in buffers kept across steps (Megatron's grad buffer,
    DDP's gradient_as_bucket_view, Piper's ``Trainer``), so all of them are live at the peak.
    False: they are freed before every step (``zero_grad(set_to_none=True)``, plain PyTorch
    loops) and allocated during the
    backward, so the peak is the larger of (a) the first backward of the step, with every
    in-flight micro-batch and no gradient yet, unless the schedule runs a later backward with as
    many micro-batches in flight (1F1B-like schedules when num_micro exceeds the in-flight count),
    where gradients are all allocated; (b) the end of the backward, with every gradient and
    (approximately) no activation left; ``"gradients"`` and ``"activations"`` are then the bytes
    live at that moment."""
    s = resolve_fp8_gemm(model, platform, s)
    p_b, g_b, o_b, _ = PRECISION_BYTES[s.precision]
    dense, expert = stage_params(model, s, stage)
    n_dense, n_moe = stage_layer_kinds(model, s, stage)

    weights = (dense + expert) * p_b
    grads = (dense + expert) * g_b
    optim = (dense + expert) * o_b
    if s.zero >= 1:
        optim = (dense / s.dp + expert / s.edp) * o_b
    if s.zero >= 2:
        grads = (dense / s.dp + expert / s.edp) * g_b
    if s.zero >= 3:
        weights = (dense / s.dp + expert / s.edp) * p_b

    inflight = in_flight(s, stage)
    acts = moe_buf = 0.0
    for n, moe_layer in ((n_dense, False), (n_moe, True)):
        if n:
            layer = layer_activations(model, s, moe_layer)
            acts += n * layer["activations"]
            moe_buf += n * layer["moe_buffers"]
    if stage == s.pp - 1:
        acts += head_activations(model, s)
    if stage == 0:
        acts += s.micro_batch * s.seq_len * INDEX_BYTES  # token ids
    acts, moe_buf = acts * inflight, moe_buf * inflight
    if s.schedule == "zb-h1":  # one micro-batch between its B and its W at the peak
        acts += weight_grad_inputs(model, s, stage)
    if not persistent_grads:
        steady = s.schedule != "gpipe" and s.num_micro > inflight
        if not steady and grads > acts + moe_buf:  # (b): the end of the backward
            acts = moe_buf = 0.0
        elif not steady:  # (a): the first backward, before any gradient
            grads = 0.0
    out = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": acts,
        "moe_buffers": moe_buf,
        "transient": _transient(model, s, stage, n_dense, n_moe) + p2p_buffers(model, s, stage),
        "reserved": platform.memory_reserved,
    }
    out["total"] = sum(out.values())
    return out


def memory(model: ModelSpec, platform: PlatformSpec, s: Strategy) -> tuple[dict[str, float], int]:
    """Memory of the most loaded pipeline stage: (components with "total", stage index)."""
    best: tuple[dict[str, float], int] | None = None
    for stage in range(s.pp):
        mem = stage_memory(model, platform, s, stage)
        if best is None or mem["total"] > best[0]["total"]:
            best = (mem, stage)
    assert best is not None
    return best
