"""Rank-side cases of the pipeline-engine tests (run through tests/launch.py).

A toy model of plain MLP chunks (no MoE, so only the engine is under test): every rank builds
the whole model locally as the reference, runs its own chunks under the schedule, and
compares its chunks' gradients (summed over data-parallel replicas) and the loss with the
reference's on the whole global batch. float64, so the only differences are summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from piper_moe.runtime.engine import PipelineEngine
from piper_moe.runtime.mesh import build_mesh
from piper_moe.train.launch import finish, launch  # noqa: F401 (finish: tests/worker.py)

H, V, S = 8, 16, 5


class Chunk(nn.Module):
    def __init__(self, v: int, first: bool, last: bool):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + v)
        self.embed = nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64)) \
            if first else None
        self.w = nn.Parameter(torch.randn(H, H, generator=g, dtype=torch.float64) / H ** .5)
        self.head = nn.Parameter(torch.randn(H, V, generator=g, dtype=torch.float64)) \
            if last else None
        self.aux_w = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        if self.embed is not None:
            x = self.embed[x]
        y = torch.tanh(x @ self.w) + x
        self._aux = (y.pow(2).sum() * self.aux_w) * 1e-3  # a stand-in (additive) aux loss
        return y @ self.head if self.head is not None else y

    def aux_loss(self):
        return self._aux


def engine_matches_reference(pp: int, dp: int, vpp: int, schedule: str, num_micro: int,
                             mb: int = 2, order: str = "ep,edp,pp") -> int:
    _rank, _world = launch()
    mesh = build_mesh(pp, dp, 1, order)
    n = pp * vpp
    chunks = {v: Chunk(v, v == 0, v == n - 1) for v in range(mesh.pp_rank, n, pp)}
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, V, (num_micro * mb * dp, S + 1), generator=g)
    tokens = num_micro * mb * dp * S
    ins, tgs = [], []
    for m in range(num_micro):
        lo = m * mb * dp + mesh.dp_rank * mb
        ins.append(data[lo:lo + mb, :-1])
        tgs.append(data[lo:lo + mb, 1:])
    eng = PipelineEngine(chunks, mesh, schedule=schedule, num_micro=num_micro,
                         act_shape=(mb, S, H), loss_scale=1 / tokens, aux_scale=1 / num_micro,
                         vpp=vpp, dtype=torch.float64)
    out = eng.run(ins, tgs)
    checks = 0
    if mesh.dp_group is not None:
        for ch in chunks.values():
            for p in ch.parameters():
                torch.distributed.all_reduce(p.grad, group=mesh.dp_group)
    loss = torch.tensor([out["loss_sum"]], dtype=torch.float64)
    torch.distributed.all_reduce(loss)

    # The reference: the whole model on the whole batch, micro-batch by micro-batch.
    ref = [Chunk(v, v == 0, v == n - 1) for v in range(n)]
    total = 0.0
    for m in range(num_micro):
        x = data[m * mb * dp:(m + 1) * mb * dp]
        h, aux = x[:, :-1], 0
        for c in ref:
            h = c(h)
            aux = aux + c.aux_loss()
        ce = nn.functional.cross_entropy(h.reshape(-1, V), x[:, 1:].reshape(-1),
                                         reduction="sum")
        total += float(ce.detach())
        (ce / tokens + aux / num_micro).backward()
    assert abs(float(loss) - total) <= 1e-9 * abs(total), (float(loss), total)
    for v, ch in chunks.items():
        for (name, p), q in zip(ch.named_parameters(), ref[v].parameters()):
            assert p.grad is not None, f"stage {v} {name}: no gradient"
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12,
                                       msg=f"stage {v} {name} ({schedule})")
            checks += 1
    return checks


def peer_never_sends() -> dict:
    """Rank 1 (stage 1) waits for an activation rank 0 never sends: a PiperTimeoutError that
    names the receive, this rank and the peer, after PIPER_TIMEOUT (no hang)."""
    import time

    from piper_comm.errors import PiperTimeoutError

    rank, _ = launch()
    mesh = build_mesh(2, 1, 1)
    chunks = {mesh.pp_rank: Chunk(mesh.pp_rank, rank == 0, rank == 1)}
    eng = PipelineEngine(chunks, mesh, schedule="1f1b", num_micro=1, act_shape=(2, S, H),
                         loss_scale=1.0, aux_scale=1.0, dtype=torch.float64)
    if rank == 0:
        time.sleep(eng.timeout + 2)  # never runs its forward
        return {"message": None}
    t0 = time.monotonic()
    try:
        eng.run(None, [torch.zeros(2, S, dtype=torch.long)])
    except PiperTimeoutError as e:
        return {"message": str(e), "seconds": time.monotonic() - t0}
    return {"message": "no error"}


def dp_peer_skips_all_reduce() -> dict:
    """pp=1 x dp=2: rank 1 never joins rank 0's collectives. The mesh's gloo groups wait
    PIPER_TIMEOUT, not gloo's 30-minute default (a plain all_reduce on dp_group), and the
    trainer's bounded forms name the operation, its ranks and bytes and the rank
    (all_reduce_bounded on edp_group, a group of its own; barrier_bounded on the world).
    Returns rank 0's seconds and messages."""
    import time

    import torch.distributed as dist

    from piper_comm import envs
    from piper_comm.errors import PiperTimeoutError
    from piper_moe.runtime.mesh import all_reduce_bounded, barrier_bounded

    rank, _ = launch()
    mesh = build_mesh(1, 2, 1)
    timeout = envs.timeout()
    if rank == 1:
        time.sleep(3 * timeout + 4)
        return {}
    out = {}
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4), group=mesh.dp_group)
        out["plain"] = "no error"
    except Exception as e:  # gloo's own timeout error is the result
        out["plain"] = f"{type(e).__name__}: {e}"
    out["plain_s"] = time.monotonic() - t0
    for key, wait in (
            ("bounded", lambda: all_reduce_bounded(torch.ones(4), "the expert gradient all-reduce",
                                                   rank, timeout, group=mesh.edp_group)),
            ("barrier", lambda: barrier_bounded("a checkpoint barrier", rank, timeout))):
        t0 = time.monotonic()
        try:
            wait()
            out[key] = "no error"
        except PiperTimeoutError as e:
            out[key] = str(e)
        out[f"{key}_s"] = time.monotonic() - t0
    return out


def mesh_communicators(pp: int, dp: int, ep: int) -> dict:
    """The transports of the mesh's Piper communicators, and one all_to_all on each that
    checks every rank's block: MPI (from C++) when MPI launched the job, else the torch group."""
    rank, _world = launch()
    mesh = build_mesh(pp, dp, ep)
    out = {}
    for name, comm in (("ep", mesh.ep_comm), ("dp", mesh.dp_comm)):
        if comm is None:
            continue
        x = torch.arange(comm.size * 2, dtype=torch.float64) + 1000 * rank
        got = comm.all_to_all(x.numpy())
        members = mesh.ep_ranks() if name == "ep" else mesh.stage_ranks()
        want = [1000 * r + 2 * comm.rank + k for r in members for k in range(2)]
        assert got.tolist() == want, (name, got.tolist(), want)
        out[name] = comm.transport
    return out
