"""Mesh coordinates: every order is a bijection, groups partition the ranks, and the default
order keeps an EP group on consecutive ranks (inside a node when ep divides its size)."""

import itertools

import pytest

from piper_moe.runtime.mesh import Mesh

ORDERS = [",".join(p) for p in itertools.permutations(["ep", "edp", "pp"])]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("pp", "dp", "ep"), [(1, 1, 1), (2, 2, 2), (2, 2, 1), (2, 4, 2),
                                               (3, 4, 4), (4, 2, 1)])
def test_groups_partition(pp, dp, ep, order):
    world = pp * dp
    meshes = [Mesh(pp, dp, ep, rank=r, world=world, node_of=[0] * world, order=order)
              for r in range(world)]
    assert sorted(m.rank_at(**m.coords()) for m in meshes) == list(range(world))
    for kind in ("stage_ranks", "ep_ranks", "edp_ranks"):
        groups = {tuple(getattr(m, kind)()) for m in meshes}
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), (kind, groups)  # a partition
        for m in meshes:
            assert m.rank in getattr(m, kind)()
    for m in meshes:
        assert len(m.stage_ranks()) == dp and len(m.ep_ranks()) == ep
        assert set(m.ep_ranks()) <= set(m.stage_ranks())
        assert m.stage_ranks()[m.dp_rank] == m.rank
        # the pipeline neighbour has the same replica index on the next stage
        if m.next_rank is not None:
            n = meshes[m.next_rank]
            assert n.pp_rank == m.pp_rank + 1 and n.dp_rank == m.dp_rank


def test_default_order_keeps_ep_consecutive():
    m = Mesh(2, 4, 2, rank=5, world=8, node_of=[0, 0, 1, 1, 2, 2, 3, 3])
    assert m.ep_ranks() == [4, 5] and m.stage_ranks() == [4, 5, 6, 7]
    assert "inside one node" in m.describe()
    m = Mesh(2, 4, 2, rank=5, world=8, node_of=[0, 0, 1, 1, 2, 2, 3, 3], order="pp,ep,edp")
    assert "across" in m.describe()


def test_bad_mesh():
    with pytest.raises(ValueError, match="job has 4 ranks"):
        Mesh(2, 1, 1, world=4)
    with pytest.raises(ValueError, match="must divide dp"):
        Mesh(1, 4, 3, world=4)
    with pytest.raises(ValueError, match="order must list"):
        Mesh(1, 1, 1, order="ep,pp")


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_mesh_communicators_ride_mpi_when_mpi_launched(launcher):
    """Under mpirun the EP and DP communicators are MPI sub-communicators (Piper's C++ executor
    calls MPI); under torchrun they ride the torch group (gloo through Python). Either way each
    delivers every rank's block."""
    from tests.launch import run_mpi, run_torchrun

    run = (run_mpi if launcher == "mpirun" else run_torchrun)(
        4, "runtime.cases:mesh_communicators", {"pp": 1, "dp": 4, "ep": 2})
    want = "mpi" if launcher == "mpirun" else "python:torch"
    for r in run.ranks:
        assert r["result"] == {"ep": want, "dp": want}, run.report()
