"""The framework-operation counts of the resource model (piper_moe/resource_model/ops.py) are
the runtime's: recounted here with a TorchDispatchMode, within 10% (the table goes stale when
the runtime changes; this test says so), and the estimate charges them at op_overhead."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from piper_moe.resource_model import Strategy, estimate, load_model, load_platform, ops
from piper_moe.transformer import Stage

TOLERANCE = 0.10
PARTS = {"dense": (range(0, 1), False, False), "moe": (range(1, 2), False, False),
         "embed": (range(0, 0), True, False), "head": (range(4, 4), False, True)}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _count(part: str, precision: str, b: int = 2, s: int = 16) -> tuple[int, int, int]:
    """(forward, backward, parameter tensors) of one part of tiny-moe on a micro-batch."""
    spec = load_model("tiny-moe")
    layers, first, last = PARTS[part]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    stage = Stage(spec, layers, first=first, last=last, precision=precision, dtype=dtype)
    x = (torch.randint(0, spec.vocab, (b, s)) if first else
         torch.randn(b, s, spec.hidden, dtype=dtype, requires_grad=True))
    with _Count() as fwd:
        y = stage(x)
    with _Count() as bwd:
        if last:
            F.cross_entropy(y.float().flatten(0, 1),
                            torch.randint(0, spec.vocab, (b * s,))).backward()
        else:
            y.float().sum().backward()
    return fwd.ops, bwd.ops, len(list(stage.parameters()))


@pytest.mark.parametrize("precision", sorted(ops.PART_OPS))
@pytest.mark.parametrize("part", sorted(PARTS))
def test_part_counts_are_the_runtimes(part, precision):
    fwd, bwd, tensors = _count(part, precision)
    want = ops.part_ops(precision, part)
    assert tensors == want.tensors, (part, precision, tensors)
    for got, table in ((fwd, want.forward), (bwd, want.backward)):
        assert abs(got - table) <= TOLERANCE * table, \
            f"{part} {precision}: counted {fwd} forward, {bwd} backward; ops.py says {want}"


def test_moe_layer_count_does_not_depend_on_the_expert_count():
    spec = load_model("tiny-moe")
    counts = set()
    for experts in (4, 16):
        wide = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, num_experts=experts))
        stage = Stage(wide, range(1, 2), first=False, last=False)
        x = torch.randn(2, 16, spec.hidden, requires_grad=True)
        with _Count() as c:
            stage(x).sum().backward()
        counts.add(c.ops)
    assert len(counts) == 1, counts


def test_estimate_charges_every_operation_at_op_overhead():
    """One rank (no bubble): the step grows by (micro-batches x the stage's operations + the
    per-step operations per tensor) x op_overhead, all of it under "overhead"."""
    model = load_model("tiny-moe")
    base = load_platform("cpu-host")
    s = Strategy(dp=1, tp=1, pp=1, ep=1, micro_batch=4, global_batch=32, seq_len=64,
                 precision="fp32")
    without = estimate(model, dataclasses.replace(base, op_overhead=0.0), s)
    c = 1e-5
    with_ = estimate(model, dataclasses.replace(base, op_overhead=c), s)
    table = ops.PART_OPS["fp32"]
    layers = {"dense": model.num_dense_layers, "moe": model.num_moe_layers, "embed": 1, "head": 1}
    per_micro = sum(n * (table[p].forward + table[p].backward) for p, n in layers.items())
    per_step = sum(n * table[p].tensors for p, n in layers.items()) * ops.OPS_PER_TENSOR_STEP
    assert with_.time["overhead"] == pytest.approx((s.num_micro * per_micro + per_step) * c)
    assert with_.time["step"] - without.time["step"] == pytest.approx(with_.time["overhead"])
    assert without.time["overhead"] == 0.0
    # full recompute dispatches every layer's forward operations once more per micro-batch
    full = estimate(model, dataclasses.replace(base, op_overhead=c),
                    dataclasses.replace(s, recompute="full"))
    layer_fwd = sum(n * table[p].forward for p, n in layers.items() if p in ("dense", "moe"))
    assert full.time["overhead"] - with_.time["overhead"] == pytest.approx(
        s.num_micro * layer_fwd * c)


@pytest.mark.parametrize(("precision", "key", "other"),
                         [("fp32", "attention_backward_fp32", "attention_backward"),
                          ("bf16-mixed", "attention_backward", "attention_backward_fp32")])
def test_attention_backward_factor_scales_the_attention_core(precision, key, other):
    """The attention core's backward factor of the run's compute dtype, and only it, scales
    the attention part of the backward."""
    model = load_model("tiny-moe")
    base = load_platform("cpu-host")
    s = Strategy(dp=1, tp=1, pp=1, ep=1, micro_batch=4, global_batch=32, seq_len=64,
                 precision=precision)

    def compute(**factors):
        return estimate(model, dataclasses.replace(base, **factors), s).time["compute"]

    t2, t5 = compute(**{key: 2.0}), compute(**{key: 5.0})
    from piper_moe.resource_model.compute import layer_compute

    core = layer_compute(model, base, s, True).attention_core  # the same in dense layers
    assert t5 - t2 == pytest.approx(3.0 * core * model.num_layers * s.num_micro)
    assert compute(**{key: 2.0, other: 7.0}) == t2


def test_per_step_operations_per_tensor_are_the_trainers():
    """A step of 1 and of 2 micro-batches on one rank: the difference is one micro-batch, the
    rest the per-step work (clipping, AdamW, zeroing), per parameter tensor."""
    from piper_moe.train import config as C
    from piper_moe.train.trainer import Trainer

    def step_ops(global_batch: int) -> tuple[int, int]:
        cfg = C.load("tiny", {"steps": 2, "precision": "fp32", "rebalance": {"enabled": False},
                              "strategy": {"pp": 1, "dp": 1, "ep": 1},
                              "batch": {"micro_batch": 2, "global_batch": global_batch,
                                        "seq_len": 16}})
        t = Trainer(cfg, progress=False)
        t.train(1)
        with _Count() as c:
            t.train(2)
        return c.ops, len(t.params)

    one, tensors = step_ops(2)
    two, _ = step_ops(4)
    per_tensor = (2 * one - two) / tensors
    assert abs(per_tensor - ops.OPS_PER_TENSOR_STEP) <= TOLERANCE * ops.OPS_PER_TENSOR_STEP, \
        per_tensor
