"""The MoE transformer: stage splits equal the whole model bitwise, parameter counts match
params.py, it trains, variants run, masking is causal, and EP over ranks matches one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from piper_moe.layer import MoEConfig
from piper_moe.resource_model.compute import model_flops_per_token
from piper_moe.resource_model.spec import load_model, model_from_dict
from piper_moe.transformer import (
    Stage,
    cross_entropy,
    extra_shared_ffn,
    flops_per_token,
    moe_config,
)
from tests.launch import run_mpi

TINY = load_model("tiny-moe")


def small_spec(**changes) -> object:
    """A 3-layer model (1 dense, 2 MoE) with tiny-moe's features; changes update the mapping
    (attention/moe given as partial dicts)."""
    data = {"name": "small", "num_layers": 3, "num_dense_layers": 1, "hidden": 32, "vocab": 64,
            "dense_ffn": 48, "ffn_kind": "swiglu", "seq_len": 16,
            "attention": {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
            "moe": {"num_experts": 4, "top_k": 2, "expert_ffn": 16, "num_shared_experts": 1}}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return model_from_dict(data)


def full(spec, **kw) -> Stage:
    return Stage(spec, range(spec.num_layers), first=True, last=True, **kw)


def tokens(spec, batch=2, seq=12, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("splits", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)],
                                    [(0, 0), (0, 4), (4, 4)]], ids=["2+2", "1+2+1", "emb|4|head"])
def test_stages_compose_bitwise(splits):
    x = tokens(TINY)
    model = full(TINY, seed=7)
    stages = [Stage(TINY, range(lo, hi), first=i == 0, last=i == len(splits) - 1, seed=7)
              for i, (lo, hi) in enumerate(splits)]
    with torch.no_grad():
        want = model(x)
        h = x
        for stage in stages:
            h = stage(h)
    assert torch.equal(h, want)
    union = {}
    for stage in stages:
        sd = stage.global_state_dict()
        assert not set(sd) & set(union)
        union.update(sd)
    ref = model.global_state_dict()
    assert union.keys() == ref.keys()
    assert all(torch.equal(union[k], t) for k, t in ref.items())


def test_seed_changes_weights_and_load_round_trip():
    x = tokens(TINY)
    a, b = full(TINY, seed=0), full(TINY, seed=1)
    with torch.no_grad():
        ya = a(x)
        assert not torch.equal(ya, b(x))
        b.load_global_state_dict(a.global_state_dict())
        assert torch.equal(b(x), ya)
    with pytest.raises(KeyError, match="missing"):
        b.load_global_state_dict({"embed.weight": a.embed.weight})


@pytest.mark.parametrize("name", ["tiny-moe", "mixtral-8x7b", "deepseek-v2-lite"])
def test_param_count_matches_params_py(name):
    spec = load_model(name)
    device = "cpu" if name == "tiny-moe" else "meta"  # no big allocations
    model = full(spec, device=device)
    assert model.num_params() == spec.params_total
    if name == "tiny-moe":
        split = [Stage(spec, range(0, 1), first=True, last=False),
                 Stage(spec, range(1, spec.num_layers), first=False, last=True)]
        assert sum(s.num_params() for s in split) == spec.params_total


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = full(TINY, seed=1, moe_overrides={"aux_loss_coef": 0.01})
    x = tokens(TINY, batch=4, seq=16, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss_sum, n = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss = loss_sum / n + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert abs(losses[0] - torch.log(torch.tensor(float(TINY.vocab))).item()) < 0.5


VARIANTS = {
    "gelu": {"ffn_kind": "gelu"},
    "mha-qk_norm": {"attention": {"kind": "mha", "num_kv_heads": 0, "qk_norm": True}},
    "sigmoid-grouped": {"moe": {"router_bias": True, "num_groups": 2, "top_groups": 1}},
    "wide-shared": {"moe": {"num_shared_experts": 2, "shared_expert_ffn": 20}},
    "tied": {"tied_embeddings": True},
    "mla": {"attention": {"kind": "mla", "num_kv_heads": 0, "head_dim": 0, "kv_lora_rank": 16,
                          "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}},
    "mla-q_lora": {"attention": {"kind": "mla", "num_kv_heads": 0, "head_dim": 0,
                                 "q_lora_rank": 12, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                 "qk_rope_head_dim": 4, "v_head_dim": 8}},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_run(name):
    spec = small_spec(**VARIANTS[name])
    model = full(spec, seed=3)
    x = tokens(spec)
    y = model(x)
    assert y.shape == (*x.shape, spec.vocab)
    assert torch.isfinite(y).all()
    (cross_entropy(y, x)[0] + model.aux_loss()).backward()
    assert all(p.grad is not None for p in model.parameters())
    if name != "gelu":  # MoELayer's experts are SwiGLU; params.py counts gelu experts as 2 mats
        assert model.num_params() == spec.params_total
    if name == "wide-shared":
        assert extra_shared_ffn(spec) == 40  # not a multiple of expert_ffn 16
        assert model.layers["1"].shared is not None


def test_tied_embeddings_need_one_stage():
    spec = small_spec(tied_embeddings=True)
    with pytest.raises(ValueError, match="tied_embeddings"):
        Stage(spec, range(0, 2), first=True, last=False)
    with pytest.raises(ValueError, match="tied_embeddings"):
        Stage(spec, range(2, 3), first=False, last=True)
    model = full(spec)
    assert model.head is None and "head.weight" not in model.global_state_dict()


@pytest.mark.parametrize("variant", ["tiny-moe", "mla-q_lora"])
def test_causal(variant):
    spec = TINY if variant == "tiny-moe" else small_spec(**VARIANTS[variant])
    model = full(spec, seed=4)
    x = tokens(spec, batch=2, seq=20)
    x2 = x.clone()
    x2[:, 13] = (x2[:, 13] + 1) % spec.vocab
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :13], y2[:, :13], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y[:, 13:], y2[:, 13:])


def test_moe_config():
    cfg = moe_config(TINY)
    assert cfg == MoEConfig(hidden=128, ffn_hidden=64, num_experts=8, top_k=2,
                            num_shared_experts=1, router="softmax")
    v3 = moe_config(load_model("deepseek-v3"), aux_loss_coef=1e-4, bias_update_rate=1e-3)
    assert (v3.router, v3.num_groups, v3.topk_groups, v3.aux_loss_coef) == ("sigmoid", 8, 4, 1e-4)
    assert moe_config(small_spec(moe={"num_shared_experts": 2, "shared_expert_ffn": 32})
                      ).num_shared_experts == 4  # 2 x 32 == 4 x 16: the layer's own shared
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        moe_config(TINY, aux_coef=1.0)


def test_flops_and_cross_entropy():
    s = 128
    a = TINY.attention
    matmul = sum(p.numel() for n, p in full(TINY).named_parameters()
                 if not n.startswith(("embed", "norm")) and "norm" not in n
                 and ".experts." not in n)
    # routed experts: top_k of num_experts per token
    expert = 3 * TINY.hidden * TINY.moe.expert_ffn * TINY.moe.top_k * TINY.num_moe_layers
    core = TINY.num_layers * 2 * 2 * s * a.num_heads * a.head_dim / 2
    assert flops_per_token(TINY, s) == pytest.approx(2 * (matmul + expert) + core)
    assert flops_per_token(TINY, s) == model_flops_per_token(TINY, s)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 0] = -100
    loss, n = cross_entropy(logits, targets)
    assert n == 9 and loss.dtype == torch.float32
    torch.testing.assert_close(loss / n, F.cross_entropy(logits.reshape(-1, 7),
                                                         targets.reshape(-1)))


@pytest.mark.mpi
def test_expert_parallel_matches_one_process():
    run = run_mpi(2, "models.cases:ep_logits", {}, env={"PIPER_LOCAL_SIZE": "2"})
    assert all(r["result"] == 3 for r in run.ranks)


def test_stage_checks_and_dense_aux_loss():
    dense = Stage(TINY, range(0, 1), first=True, last=False)
    assert dense.moe_layers() == [] and dense.aux_loss().shape == ()
    assert dense.aux_loss().item() == 0.0
    assert len(full(TINY).moe_layers()) == TINY.num_moe_layers
    with pytest.raises(ValueError, match="consecutive range"):
        Stage(TINY, range(0, 4, 2), first=True, last=True)
    with pytest.raises(ValueError, match="outside"):
        Stage(TINY, range(2, 5), first=False, last=True)
    with pytest.raises(ValueError, match="int64 tokens"):
        dense(torch.zeros(2, 3, TINY.hidden))
