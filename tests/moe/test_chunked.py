"""Chunked pipelining of the MoE layer (pipeline_chunks) equals C = 1 bitwise (mpirun), under
every chunk_memory strategy."""

import pytest
import torch

from piper_moe import MoEConfig, MoELayer
from piper_moe.layer import chunk_memory
from piper_moe.layer.chunk_memory import ChunkMemory
from tests.launch import run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("nprocs", [2, 4], ids=["ep2-ls2", "ep4-ls2"])
def test_chunks_exact(nprocs):
    """Also: save / offload / recompute each run on every scenario and split, and the bytes
    saved for backward (asserted rank-side: recompute < save, offload's host copy = the rows)."""
    run = run_mpi(nprocs, "moe.chunked_cases:exact", {"local_size": 2})
    # 2 token splits x 3 scenarios x C in (2, 3, 4), the strategies rotating with C
    assert all(r["result"]["checks"] == 18 for r in run.ranks)
    for r in run.ranks:
        saved = r["result"]["saved"]
        assert saved["recompute"]["saved"] < saved["save"]["saved"] < saved["C=1"]["saved"]
        print(f"rank saved-for-backward vs unchunked: {saved['ratios_vs_unchunked']}, "
              f"recompute/save {saved['recompute_vs_save']:.3f}")


def test_auto_same_choice_and_exact():
    """Also: on the node-dedup path (EP=4 over 2 nodes) pipeline_chunks runs C = 1, logged."""
    run = run_mpi(4, "moe.chunked_cases:auto", {"local_size": 2})
    choices = {tuple(r["result"]["choices"]) for r in run.ranks}
    assert len(choices) == 1, choices


@pytest.mark.parametrize("nprocs", [2, 4], ids=["ep2-ls2", "ep4-ls2"])
def test_chunk_memory_auto_collective(nprocs):
    """One rank short of memory makes every rank recompute, bitwise equal to C = 1."""
    run = run_mpi(nprocs, "moe.chunked_cases:memory_auto", {"local_size": 2})
    short = {r["result"]["short_rank"] for r in run.ranks}
    assert len(short) == 1
    assert all(r["result"]["seen"] == ["save", "recompute", "save"] for r in run.ranks)


def test_chunk_memory_rule(monkeypatch):
    """The auto rule (local wish) and the argument checks."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    m = ChunkMemory("auto", headroom=0.5)
    monkeypatch.setattr(chunk_memory, "free_bytes", lambda d: 1000)
    monkeypatch.setattr(chunk_memory, "host_available_bytes", lambda: 1000)
    assert m.wish(rows=10, hidden=10, elem_bytes=5, device=cpu) == 0      # 500 <= 0.5 * 1000
    assert m.wish(rows=10, hidden=10, elem_bytes=6, device=cpu) == 2      # 600 > 500, on CPU
    monkeypatch.setattr(chunk_memory, "free_bytes", lambda d: 100)
    assert m.wish(rows=10, hidden=10, elem_bytes=4, device=cuda) == 1     # host has room
    assert m.wish(rows=10, hidden=10, elem_bytes=6, device=cuda) == 2     # host too small
    assert ChunkMemory("offload").wish(10**9, 10**9, 8, cpu) == 1          # forced
    assert m.decide([0, 2, 1], rank=1) == "recompute"
    assert m.decide([0, 1, 0], rank=1) == "offload"
    cfg = MoEConfig(hidden=8, ffn_hidden=16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="save"):
        MoELayer(cfg, chunk_memory="keep")
    with pytest.raises(ValueError, match="headroom"):
        MoELayer(cfg, chunk_memory_headroom=0)


def test_chunk_memory_config_key():
    """train config: moe_layer.chunk_memory defaults to auto, reaches MoELayer's kwargs, and a
    bad value is refused by MoELayer."""
    from types import SimpleNamespace

    from piper_moe.train import config as C
    from piper_moe.train.trainer import Trainer

    cfg = C.load("tiny", {"moe_layer": {"pipeline_chunks": 2, "chunk_memory": "recompute"}})
    assert C.load("tiny")["moe_layer"]["chunk_memory"] == "auto"
    mesh = SimpleNamespace(ep_ranks=lambda: [0], node_of=[0], ep=1, dp=1, dp_comm=None, pp=2)
    kw = Trainer._moe_kwargs(SimpleNamespace(mesh=mesh, schedule="1f1b"), cfg["moe_layer"])
    assert kw["chunk_memory"] == "recompute" and kw["pipeline_chunks"] == 2
    # ZB-H1's split backward would run the chunked experts twice: refused, auto -> 1
    zb = SimpleNamespace(mesh=mesh, schedule="zb-h1")
    with pytest.raises(ValueError, match="zb-h1"):
        Trainer._moe_kwargs(zb, cfg["moe_layer"])
    auto = {**cfg["moe_layer"], "pipeline_chunks": "auto"}
    assert Trainer._moe_kwargs(zb, auto)["pipeline_chunks"] == 1
    with pytest.raises(ValueError, match=r"unknown key 'moe_layer\.chunk_mem'"):
        C.load("tiny", {"moe_layer": {"chunk_mem": "save"}})
    with pytest.raises(ValueError, match="chunk_memory must be one of"):
        MoELayer(MoEConfig(hidden=8, ffn_hidden=16, num_experts=4, top_k=2),
                 **{**kw, "chunk_memory": "host"})
