"""Rank-side cases of the model tests (run through tests/launch.py).

Every rank builds the EP=1 reference model (the whole model, one process) and the same model
with its MoE layers expert-parallel over all ranks, feeds its own slice of a global batch
and compares its logits with the reference's rows of that slice.
"""

from __future__ import annotations

import torch

import piper_comm as pc
from piper_moe.resource_model.spec import load_model
from piper_moe.transformer import Stage, cross_entropy

# float32: the expert GEMMs run over different row counts under EP (another blocking and
# summation order), rounding at 2^-24 relative, a little amplified through 4 layers.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def ep_logits(seed: int = 3, batch: int = 4, seq: int = 16) -> int:
    """EP = comm.size over the ranks: rank r feeds sequences [r*b/P, (r+1)*b/P); its logits,
    the global state dict and the summed aux loss equal the one-process model's."""
    comm = pc.init()
    spec = load_model("tiny-moe")
    overrides = {"aux_loss_coef": 0.01}
    ref = Stage(spec, range(spec.num_layers), first=True, last=True, seed=seed,
                moe_overrides=overrides)
    model = Stage(spec, range(spec.num_layers), first=True, last=True, seed=seed,
                  ep_comm=comm, moe_overrides=overrides)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab, (batch, seq), generator=g)
    per = batch // comm.size
    lo, hi = comm.rank * per, (comm.rank + 1) * per
    with torch.no_grad():
        want = ref(tokens)
        got = model(tokens[lo:hi])
    torch.testing.assert_close(got, want[lo:hi], **TOL,
                               msg=lambda m: f"rank {comm.rank} logits: {m}")
    # the aux loss shares add up over ranks to the whole batch's
    mine = model.aux_loss().reshape(1).expand(comm.size).contiguous()
    total = comm.all_to_all(mine).sum()
    torch.testing.assert_close(total, ref.aux_loss(), **TOL)
    # loss and backward run through the expert-parallel layers
    loss_sum, n = cross_entropy(model(tokens[lo:hi]), tokens[lo:hi])
    (loss_sum / n + model.aux_loss()).backward()
    assert all(p.grad is not None for p in model.parameters())
    sd, ref_sd = model.global_state_dict(), ref.global_state_dict()
    assert sd.keys() == ref_sd.keys()
    for k, t in ref_sd.items():
        assert torch.equal(sd[k], t), f"rank {comm.rank} global_state_dict {k}"
    return 3
