"""Training config: merging and validation, and strategy: auto's dispatcher choice."""

import dataclasses

import pytest
import torch

from piper_moe.resource_model import load_model, load_platform
from piper_moe.train import config as C


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match=r"unknown key 'optim\.lrr'"):
        C.load("tiny", {"optim": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        C.load("tiny", {"stepz": 3})
    with pytest.raises(FileNotFoundError, match="shipped"):
        C.load("no-such-config")
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        C.num_micro(C.TrainConfig.from_dict(C.load("tiny", {"batch": {"global_batch": 30}})).batch,
                    dp=2)


def test_dispatcher_choice_follows_the_model():
    """PPMoE moves g / top_k times the all-to-all's bytes (resource_model/dispatch_cost.py): with
    top_k = 4 over an EP group of 2 it is predicted faster and chosen; with top_k = 2 = g the
    two tie and the all-to-all stays; when ep != dp the runtime cannot run ppmoe."""
    m, p = load_model("tiny-moe"), load_platform("cpu-host")
    st = {"pp": 1, "dp": 2, "ep": 2}
    tie = C.choose_dispatcher(m, p, st, 4, 64, "float32")
    assert tie["dispatcher"] == "alltoall" and tie["pipeline_chunks"] == "auto"
    assert tie["predicted_ppmoe_s"] == pytest.approx(tie["predicted_a2a_s"])
    wide = dataclasses.replace(m, moe=dataclasses.replace(m.moe, top_k=4))
    got = C.choose_dispatcher(wide, p, st, 4, 64, "float32")
    assert got["dispatcher"] == "ppmoe" and got["pipeline_chunks"] == 1
    assert got["predicted_ppmoe_s"] < got["predicted_a2a_s"]
    assert C.choose_dispatcher(wide, p, {"pp": 1, "dp": 4, "ep": 2}, 4, 64,
                               "float32")["dispatcher"] == "alltoall"


def test_auto_plans_a_runnable_strategy():
    cfg = C.load("tiny", {"strategy": "auto", "batch": {"micro_batch": 2, "global_batch": 8,
                                                        "seq_len": 32}})
    st = C.plan_for_world(C.TrainConfig.from_dict(cfg), 4)
    assert st["pp"] * st["dp"] == 4 and st["dp"] % st["ep"] == 0
    assert st["moe_layer"]["dispatcher"] in ("alltoall", "ppmoe")


def test_auto_hands_a_chunked_plan_to_the_layer(monkeypatch):
    """When the planner's pick is the chunked MoE layer (faster, or the one that fits:
    tests/model/test_estimate_planner.py), strategy auto keeps it as planned: the all-to-all
    dispatcher with its chunk count and chunk_memory (not a PPMoE switch whose memory the
    planner did not check)."""
    from piper_moe import resource_model as model_pkg
    from piper_moe.resource_model import planner

    cfg = C.load("tiny", {"strategy": "auto", "batch": {"micro_batch": 2, "global_batch": 8,
                                                        "seq_len": 32}})
    model, cpu = model_pkg.load_model(cfg["model"]), model_pkg.load_platform(cfg["platform"])
    chunked = model_pkg.Strategy(dp=2, tp=1, pp=2, ep=2, micro_batch=2, global_batch=8,
                                 seq_len=32, moe_chunks=4, chunk_memory="recompute")
    picked = planner.PlanResult(plans=[model_pkg.estimate(model, cpu, chunked)])
    monkeypatch.setattr(planner, "plan", lambda *a, **k: picked)
    st = C.plan_for_world(C.TrainConfig.from_dict(cfg), 4)
    assert (st["pp"], st["dp"], st["ep"]) == (2, 2, 2)
    layer = st["moe_layer"]
    assert layer["dispatcher"] == "alltoall", st
    assert (layer["pipeline_chunks"], layer["chunk_memory"]) == (4, "recompute"), st


def test_chunk_memory_headroom_reaches_the_layers():
    """moe_layer.chunk_memory_headroom is handed to every MoELayer's ChunkMemory; a value
    outside (0, 1] is refused when the layers are built, naming the key."""
    from piper_moe.train.trainer import Trainer

    def cfg(headroom):
        return C.load("tiny", {"strategy": {"pp": 1, "dp": 1, "ep": 1},
                               "moe_layer": {"chunk_memory_headroom": headroom},
                               "batch": {"micro_batch": 2, "global_batch": 2,
                                         "seq_len": 16}})

    t = Trainer(cfg(0.5), progress=False)
    assert t.moe_layers and {m.chunk_memory.headroom for m in t.moe_layers} == {0.5}
    with pytest.raises(ValueError, match="chunk_memory_headroom"):
        Trainer(cfg(1.5), progress=False)


def test_precision_key():
    """precision: auto | fp32 | bf16-mixed | bf16, resolved with the dtype key; the Trainer's
    parameters (so AdamW state and gradient buffers) are float32 under bf16-mixed."""
    from piper_moe.layer import precision as P
    from piper_moe.train.trainer import Trainer

    assert C.load("tiny")["precision"] == "auto"
    with pytest.raises(ValueError, match="precision must be one of"):
        C.load("tiny", {"precision": "fp16"})
    resolve = C.resolve_precision
    native = "bf16-mixed" if P.bf16_native("cpu") else "fp32"
    assert resolve("auto", "float32", "cpu") == native
    assert resolve("auto", "float64", "cpu") == "fp32"
    assert resolve("auto", "bfloat16", "cpu") == "bf16"
    assert resolve("bf16-mixed", "float32", "cpu") == "bf16-mixed"
    with pytest.raises(ValueError, match="float64 needs precision fp32"):
        resolve("bf16-mixed", "float64", "cpu")
    with pytest.raises(ValueError, match="bfloat16 is precision bf16"):
        resolve("bf16-mixed", "bfloat16", "cpu")
    for precision, dtype in (("bf16-mixed", torch.float32), ("bf16", torch.bfloat16)):
        cfg = C.load("tiny", {"precision": precision, "steps": 1,
                              "strategy": {"pp": 1, "dp": 1, "ep": 1},
                              "batch": {"micro_batch": 2, "global_batch": 2, "seq_len": 16}})
        t = Trainer(cfg, progress=False)
        t.train(1)
        assert t.precision == precision
        assert all(p.dtype == dtype and p.grad.dtype == dtype for _, p in t.params)
        moe = t.moe_layers[0]
        assert moe.precision == precision and moe.compute_dtype == torch.bfloat16
        state = t.optimizer.state[t.params[0][1]]
        assert state["exp_avg"].dtype == dtype
    with pytest.raises(ValueError, match="fp8_dispatch=True needs precision"):
        Trainer(C.load("tiny", {"precision": "fp32", "moe_layer": {"fp8_dispatch": True},
                                "strategy": {"pp": 1, "dp": 1, "ep": 1}}), progress=False)
    with pytest.raises(ValueError, match="fp8_gemm must be one of"):
        C.load("tiny", {"moe_layer": {"fp8_gemm": "fast"}})
    with pytest.raises(ValueError, match="fp8_gemm='scaled' needs fp8_dispatch"):
        C.load("tiny", {"moe_layer": {"fp8_gemm": "scaled"}})
    cfg = C.load("tiny", {"precision": "bf16-mixed", "steps": 1,
                          "moe_layer": {"fp8_dispatch": True, "fp8_gemm": "scaled"},
                          "strategy": {"pp": 1, "dp": 1, "ep": 1},
                          "batch": {"micro_batch": 2, "global_batch": 2, "seq_len": 16}})
    t = Trainer(cfg, progress=False)
    t.train(1)
    assert all(m.fp8_gemm == "scaled" for m in t.moe_layers) and t.moe_layers
