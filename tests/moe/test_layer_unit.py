"""Single-process checks of the MoE layer: config validation, routing, EP=1 vs the reference."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from piper_moe import MoEConfig, MoELayer
from piper_moe.layer.experts import Experts
from piper_moe.layer.reference import ReferenceMoE
from piper_moe.layer.router import capacity_keep, select

BASE = {"hidden": 8, "ffn_hidden": 16, "num_experts": 8, "top_k": 2}


@pytest.mark.parametrize(("kw", "match"), [
    ({"hidden": 0}, "hidden must be a positive int"),
    ({"top_k": 9}, "top_k=9 exceeds the 8 experts"),
    ({"router": "relu"}, "router must be one of"),
    ({"num_groups": 3}, "not divisible by num_groups=3"),
    ({"num_groups": 2, "topk_groups": 3}, "topk_groups=3 exceeds num_groups=2"),
    ({"num_groups": 4, "topk_groups": 1, "top_k": 3}, "top_k=3 exceeds the 2 experts"),
    ({"num_shared_experts": -1}, "num_shared_experts must be an int >= 0"),
    ({"aux_loss_coef": -1.0}, "must be >= 0"),
    ({"capacity_factor": 0.0}, "capacity_factor must be None or > 0"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, **kw})


def test_ep_must_divide_experts():
    with pytest.raises(ValueError, match=r"num_experts=8 .* EP=3"):
        MoELayer(MoEConfig(**BASE), comm=SimpleNamespace(size=3, rank=0))


def test_import_is_light():
    code = "import sys, piper_moe; piper_moe.MoEConfig; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_group_limited_topk():
    cfg = MoEConfig(**{**BASE, "top_k": 2, "num_groups": 4, "topk_groups": 2})
    # groups (0,1) (2,3) (4,5) (6,7); group scores = sum of the group's two experts.
    s = torch.tensor([[0.9, 0.0, 0.5, 0.45, 0.8, 0.0, 0.1, 0.1],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.45, 0.5]])
    # Row 0: groups score 0.9, 0.95, 0.8, 0.2 -> groups 1 and 0; expert 4 (0.8) is excluded
    # although it beats expert 2 (0.5). Row 1: group 3 holds the two best.
    chosen = select(s, cfg).tolist()
    assert chosen[0] == [0, 2]
    assert sorted(chosen[1]) == [6, 7]
    ungrouped = MoEConfig(**BASE)
    assert select(s, ungrouped).tolist()[0] == [0, 4]


def test_bias_steers_selection_not_weights():
    cfg = MoEConfig(**{**BASE, "top_k": 1, "router": "sigmoid"})
    layer = MoELayer(cfg, seed=1, dtype=torch.float64)
    x = torch.randn(10, 8, dtype=torch.float64)
    layer.router.bias[3] = 10.0
    routing = layer.router(x)
    assert (routing.experts == 3).all()
    assert torch.allclose(routing.weights, torch.ones_like(routing.weights))  # renormalised


def test_bias_update_moves_toward_balance():
    cfg = MoEConfig(**{**BASE, "bias_update_rate": 0.1})
    layer = MoELayer(cfg, seed=1)
    layer.router.bias[2] = 10.0  # overloaded expert
    layer(torch.randn(16, 8))
    load = torch.tensor(layer.stats["tokens_per_expert"])
    assert layer.router.bias[2] == pytest.approx(10.0 - 0.1)
    assert (layer.router.bias[load == 0] == 0.1).all()
    layer.eval()
    before = layer.router.bias.clone()
    layer(torch.randn(16, 8))
    assert torch.equal(layer.router.bias, before)


def _compare(cfg, dtype, seed=4, tokens=23):
    layer = MoELayer(cfg, seed=seed, dtype=dtype)
    ref = ReferenceMoE(cfg, seed=seed, dtype=dtype)
    x = torch.randn(tokens, cfg.hidden, dtype=dtype, generator=torch.Generator().manual_seed(0))
    g = torch.randn_like(x)
    outs = []
    for m in (layer, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        ((y * g).sum() + m.aux_loss).backward()
        outs.append((y, xi.grad, {n: p.grad for n, p in m.named_parameters()}, m.aux_loss))
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    (y, gx, gp, aux), (yr, gxr, gpr, auxr) = outs
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(gx, gxr, **tol)
    torch.testing.assert_close(aux, auxr, **tol)
    for n in gp:
        torch.testing.assert_close(gp[n], gpr[n], **tol, msg=n)
    return layer


CONFIGS = {
    "softmax-shared": {**BASE, "num_shared_experts": 2, "aux_loss_coef": 0.01},
    "sigmoid-grouped": {**BASE, "top_k": 3, "router": "sigmoid", "num_groups": 4,
                        "topk_groups": 2, "aux_loss_coef": 0.01},
    "top_k-all": {**BASE, "top_k": 8},
    "capacity": {**BASE, "capacity_factor": 0.5},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_reference_ep1(name, dtype):
    layer = _compare(MoEConfig(**CONFIGS[name]), dtype)
    assert sum(layer.stats["tokens_per_expert"]) <= 23 * MoEConfig(**CONFIGS[name]).top_k
    assert layer.stats["bytes_sent_inter_node"] == layer.stats["bytes_sent_intra_node"] == 0


def test_capacity_drops_past_capacity():
    cfg = MoEConfig(**{**BASE, "top_k": 1, "capacity_factor": 1.0})  # capacity 2 of 16 pairs
    experts = torch.full((16, 1), 3)
    keep = capacity_keep(experts, cfg)
    assert keep[:, 0].tolist() == [True, True] + [False] * 14


def test_grouped_mm_equals_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch build")
    cfg = MoEConfig(**BASE)
    ex = Experts(cfg, 0, 4, seed=2, dtype=torch.float32, device="cpu")
    counts = [5, 0, 7, 1]
    x = torch.randn(13, 8)
    ys = []
    for grouped in (True, False):
        xi = x.clone().requires_grad_()
        y = ex(xi, counts, grouped=grouped)
        y.square().sum().backward()
        ys.append((y, xi.grad, ex.w1.grad.clone(), ex.w2.grad.clone()))
        ex.zero_grad()
    for a, b in zip(*ys):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_model_any_layout():
    """Expert e's weights depend on (seed, e) only: rank 1 of EP=2 holds experts 4..7."""
    cfg = MoEConfig(**BASE)
    full = MoELayer(cfg, seed=7)
    half = MoELayer(cfg, comm=SimpleNamespace(size=2, rank=1, num_nodes=2), seed=7)
    assert torch.equal(half.experts.w2, full.experts.w2[4:])
    assert torch.equal(half.router.weight, full.router.weight)


def test_chunk_memory_cuda_probe_counts_the_allocator_cache(monkeypatch):
    """On CUDA the free memory is the driver's free bytes plus PyTorch's reserved but
    unallocated cache (mocked: no GPU here)."""
    import torch

    from piper_moe.layer import chunk_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 5000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 3000)
    assert chunk_memory.free_bytes(torch.device("cuda", 0)) == 1000 + 5000 - 3000
