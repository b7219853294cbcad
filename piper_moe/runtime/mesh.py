"""The PP x DP (x EP) process mesh of a training run, and its groups.

A pipeline stage owns `dp` ranks (its data-parallel replicas); inside a stage the routed
experts are spread over `ep` ranks (an EP group) and the dp / ep EP groups hold copies of
them (EDP). This is the resource model's layout (piper_moe/resource_model/strategy.py, "MoE parallel
folding" with tp=1). Rank order, innermost first, is `order` (default "ep,edp,pp": a stage
owns dp consecutive ranks and an EP group ep consecutive ones), which keeps an EP group inside
one node whenever ep divides the ranks per node: the paper's point, the all-to-all stays on
the fast local fabric. Another order, e.g. "pp,ep,edp" (pipeline neighbours on one node, EP
across nodes), is configurable (strategy.order) for comparison. `Mesh.describe()` says where
each group landed; an EP group that spans nodes still works (HALO then aggregates it).

Groups built here (every rank builds all of them, in the same order: collective):
    ep_comm:  piper_comm Communicator of this rank's EP group (MoE dispatch/combine), with the
              node ids of the world, so emulated nodes stay what they are.
    dp_comm:  piper_comm Communicator of the stage's dp ranks (the MoE balancing statistics
              of the whole data-parallel micro-batch); None when dp == 1.
    dp_group / edp_group: torch.distributed groups for the gradient all-reduce of replicated
              weights (dp) and of expert weights (dp / ep copies); None when of size 1.
    prev_rank / next_rank: the neighbouring pipeline ranks of this replica (None at the ends).
One process (world 1) needs no torch.distributed: every group is None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("piper.moe")


@dataclass
class Mesh:
    pp: int
    dp: int
    ep: int
    rank: int = 0
    world: int = 1
    node_of: list[int] = field(default_factory=lambda: [0])
    ep_comm: Any = None
    dp_comm: Any = None
    dp_group: Any = None
    edp_group: Any = None
    world_group: Any = None
    order: str = "ep,edp,pp"

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"mesh: {name} must be a positive int, got {v!r}")
        if self.pp * self.dp != self.world:
            raise ValueError(f"mesh: pp * dp = {self.pp} * {self.dp} = {self.pp * self.dp} "
                             f"but the job has {self.world} ranks")
        if self.dp % self.ep:
            raise ValueError(f"mesh: ep={self.ep} must divide dp={self.dp} (the experts of a "
                             f"stage are spread over its data-parallel ranks)")
        dims = [d.strip() for d in self.order.split(",")]
        if sorted(dims) != ["edp", "ep", "pp"]:
            raise ValueError(f"mesh: order must list ep, edp and pp once each, innermost "
                             f"first (got {self.order!r})")
        self._dims = dims
        self._size = {"ep": self.ep, "edp": self.dp // self.ep, "pp": self.pp}

    # -- coordinates: rank <-> (ep, edp, pp)
    def coords(self, rank: int | None = None) -> dict[str, int]:
        r = self.rank if rank is None else rank
        out = {}
        for d in self._dims:
            r, out[d] = divmod(r, self._size[d])
        return out

    def rank_at(self, ep: int, edp: int, pp: int) -> int:
        c = {"ep": ep, "edp": edp, "pp": pp}
        r, stride = 0, 1
        for d in self._dims:
            r += c[d] * stride
            stride *= self._size[d]
        return r

    @property
    def pp_rank(self) -> int:
        return self.coords()["pp"]

    @property
    def ep_rank(self) -> int:
        return self.coords()["ep"]

    @property
    def dp_rank(self) -> int:
        """Index of this rank among its stage's replicas (EP index innermost)."""
        c = self.coords()
        return c["edp"] * self.ep + c["ep"]

    def stage_ranks(self, pp_rank: int | None = None) -> list[int]:
        """The dp ranks of a stage, ordered by dp_rank."""
        s = self.pp_rank if pp_rank is None else pp_rank
        return [self.rank_at(e, d, s) for d in range(self._size["edp"]) for e in range(self.ep)]

    def ep_ranks(self) -> list[int]:
        c = self.coords()
        return [self.rank_at(e, c["edp"], c["pp"]) for e in range(self.ep)]

    def edp_ranks(self) -> list[int]:
        c = self.coords()
        return [self.rank_at(c["ep"], d, c["pp"]) for d in range(self._size["edp"])]

    def rank_of_stage(self, pp_rank: int) -> int:
        """The rank that runs pipeline rank `pp_rank` for this replica."""
        c = self.coords()
        return self.rank_at(c["ep"], c["edp"], pp_rank)

    @property
    def prev_rank(self) -> int | None:
        return self.rank_of_stage(self.pp_rank - 1) if self.pp_rank > 0 else None

    @property
    def next_rank(self) -> int | None:
        return self.rank_of_stage(self.pp_rank + 1) if self.pp_rank < self.pp - 1 else None

    def describe(self) -> str:
        spans = len({self.node_of[r] for r in self.ep_ranks()})
        where = "inside one node" if spans == 1 else f"across {spans} nodes"
        return (f"mesh pp={self.pp} x dp={self.dp} (ep={self.ep}, edp={self.dp // self.ep}, "
                f"order {self.order}) "
                f"on {self.world} ranks / {len(set(self.node_of))} nodes; EP group "
                f"{self.ep_ranks()} {where}")


def build_mesh(pp: int, dp: int, ep: int, order: str = "ep,edp,pp") -> Mesh:
    """Builds the mesh and its groups (collective over the job): gloo groups whose waits are
    bounded by PIPER_TIMEOUT (new_group would take gloo's 30-minute default, not the world's).
    torch.distributed must be initialised when the job has more than one rank (see
    piper_moe.train.launch)."""
    from datetime import timedelta

    import torch.distributed as dist

    from piper_comm import envs

    timeout = timedelta(seconds=envs.timeout())

    if not (dist.is_available() and dist.is_initialized()):
        return Mesh(pp, dp, ep, order=order)  # one process: every group is None
    from piper_comm.torch import resolve

    world, rank = dist.get_world_size(), dist.get_rank()
    world_comm = resolve(None)
    node_of = list(world_comm.node_of)
    mesh = Mesh(pp, dp, ep, rank=rank, world=world, node_of=node_of,
                world_group=dist.group.WORLD, order=order)

    def groups(lists: list[list[int]]) -> Any:
        mine = None
        for ranks in lists:  # every rank creates every group, same order
            g = dist.new_group(ranks, backend="gloo", timeout=timeout) \
                if len(ranks) > 1 else None
            if rank in ranks:
                mine = g
        return mine

    edp = dp // ep
    stages = [mesh.stage_ranks(s) for s in range(pp)]
    ep_lists = [[mesh.rank_at(e, d, s) for e in range(ep)] for s in range(pp)
                for d in range(edp)]
    edp_lists = [[mesh.rank_at(e, d, s) for d in range(edp)] for s in range(pp)
                 for e in range(ep)]
    mesh.dp_group = groups(stages)
    mesh.edp_group = groups(edp_lists)
    ep_group = groups(ep_lists)
    mesh.ep_comm = _communicator(mesh.ep_ranks(), ep_group, node_of) if ep > 1 else None
    if dp > 1 and dp != ep:
        mesh.dp_comm = _communicator(mesh.stage_ranks(), mesh.dp_group, node_of)
    elif dp > 1:
        mesh.dp_comm = mesh.ep_comm
    log.debug("piper_moe: %s", mesh.describe())
    return mesh


_built: list = []  # communicators built here, closed by close_all()


def wait_bounded(work: Any, what: str, rank: int, timeout: float) -> None:
    """Waits for a torch.distributed Work (async_op=True) at most ``timeout`` seconds; on
    expiry or failure PiperTimeoutError naming ``what`` (the operation, its peers and sizes)
    and this rank. Who calls: the pipeline engine's point-to-point waits, the trainer's
    collectives (through all_reduce_bounded and barrier_bounded)."""
    from datetime import timedelta

    from piper_comm import PiperTimeoutError

    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except Exception as e:
        raise PiperTimeoutError(
            f"piper_moe: rank {rank}: {what} did not complete within {timeout:g} s "
            f"(PIPER_TIMEOUT): a peer is stuck, dead or runs another schedule "
            f"({type(e).__name__}: {e})") from e


def all_reduce_bounded(t: Any, what: str, rank: int, timeout: float, *, op: Any = None,
                       group: Any = None) -> None:
    """dist.all_reduce of ``t`` in place (``op`` default SUM, ``group`` default the world),
    waited for at most ``timeout`` seconds; on expiry or failure PiperTimeoutError naming
    ``what`` (``"the loss all-reduce"``: its ranks and bytes are added here) and this rank.
    Collective over ``group``."""
    import torch.distributed as dist

    work = dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group,
                           async_op=True)
    wait_bounded(work, f"{what} over {_ranks_of(group)} ({t.numel() * t.element_size()} B)",
                 rank, timeout)


def barrier_bounded(what: str, rank: int, timeout: float, *, group: Any = None) -> None:
    """dist.barrier over ``group`` (default the world), waited for at most ``timeout``
    seconds; on expiry or failure PiperTimeoutError naming ``what`` (e.g. "the barrier after
    the checkpoint's writes"), the ranks and this rank. Collective over ``group``."""
    import torch.distributed as dist

    wait_bounded(dist.barrier(group=group, async_op=True), f"{what} over {_ranks_of(group)}",
                 rank, timeout)


def _ranks_of(group: Any) -> str:
    import torch.distributed as dist

    if group is None:
        return f"the {dist.get_world_size()} ranks of the job"
    return f"ranks {dist.get_process_group_ranks(group)}"


def close_all() -> None:
    """Closes every communicator the meshes of this process built (idempotent)."""
    while _built:
        _built.pop().close()


def _communicator(ranks: list[int], group: Any, node_of: list[int]):
    """A piper_comm Communicator over `ranks` (a torch group), keeping the world's node ids:
    over MPI when the job was launched by MPI with torch's ranks MPI's (Piper's C++ executor
    calls MPI directly), else over the torch group (gloo: Python transport, TCP). Collective
    over the group."""
    import piper_comm as pc

    first: dict[int, int] = {}
    ids = [first.setdefault(node_of[r], len(first)) for r in ranks]  # renumbered 0, 1, ...
    sub = _mpi_group(ranks, group)
    if sub is not None:
        try:
            comm = pc.init("mpi", group=sub, node_ids=ids)
        finally:
            sub.Free()  # Piper works on its own duplicate
    else:
        comm = pc.init("torch", group=group, node_ids=ids)
    _built.append(comm)
    return comm


def _mpi_group(ranks: list[int], group: Any):
    """An mpi4py communicator over `ranks` when every rank of the group runs under MPI with
    its torch rank its MPI_COMM_WORLD rank (agreed over the group: all or none take it), else
    None. MPI_Comm_create_group: collective over `ranks` only, and (an MPI call) without a
    deadline: a rank that dies between the agreement and it leaves the others waiting until the
    launcher ends the job."""
    import sys

    import torch
    import torch.distributed as dist

    MPI = sys.modules.get("mpi4py.MPI")  # imported by the launch when MPI started the job
    ok = MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()
    if ok:
        world = MPI.COMM_WORLD
        ok = world.Get_size() == dist.get_world_size() and world.Get_rank() == dist.get_rank()
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        return None
    everyone = world.Get_group()
    members = everyone.Incl(ranks)
    try:
        return world.Create_group(members)
    finally:
        members.Free()
        everyone.Free()
