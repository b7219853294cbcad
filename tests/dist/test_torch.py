"""piper_comm.torch: the "piper" torch.distributed backend side by side with gloo, autograd
(gradcheck in float64), bad input, and an unchanged training script, under both launchers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.dist.cases import BAD_CASES
from tests.launch import MPIRUN, ROOT, TORCHRUN, run_mpi, run_torchrun

LAYOUTS = [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]


@pytest.mark.mpi
@pytest.mark.parametrize(("nprocs", "local_size"), LAYOUTS,
                         ids=[f"np{n}-ls{ls}" for n, ls in LAYOUTS])
def test_side_by_side_with_gloo_mpirun(nprocs, local_size):
    run = run_mpi(nprocs, "dist.cases:side_by_side",
                  {"seed": nprocs + local_size, "local_size": local_size})
    assert all(r["result"] == 82 for r in run.ranks)  # 3 patterns x 9 dtypes x 3 + 1 each


@pytest.mark.mpi
@pytest.mark.parametrize(("nprocs", "local_size"), [(2, 1), (4, 2)])
def test_side_by_side_with_gloo_torchrun(nprocs, local_size):
    run = run_torchrun(nprocs, "dist.cases:side_by_side", {"seed": 7, "local_size": local_size})
    assert all(r["result"] == 82 for r in run.ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_gradcheck_float64_4_ranks(launcher):
    run = (run_mpi if launcher == "mpirun" else run_torchrun)(
        4, "dist.cases:gradcheck", {"seed": 3, "local_size": 2})
    assert all(r["result"] == 1 for r in run.ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_bad_input_raises_on_every_rank(launcher):
    run = (run_mpi if launcher == "mpirun" else run_torchrun)(
        4, "dist.cases:bad_inputs", {"local_size": 2})
    for r in run.ranks:
        assert sorted(r["result"]) == sorted(BAD_CASES), r["result"]
        assert all(e.startswith("PiperUsageError") for e in r["result"].values())
    first = run.ranks[0]["result"]
    assert "input_split_sizes has 5 entries" in first["split_len"]
    assert "rank 0 sends 2 rows to rank 0, but rank 0 expects 1" in first["mismatch"]
    assert "not divisible by the 4 ranks" in first["not_divisible"]
    assert all(r["result"] == first for r in run.ranks)  # the same message everywhere


@pytest.mark.mpi
@pytest.mark.own_job  # every rank's init_process_group fails: nothing for a later case to reuse
@pytest.mark.parametrize(("values", "subgroup", "sides"), [
    (["nccl", "gloo", None], None, "nccl on ranks [0, 2]; gloo on ranks [1]"),
    ([None, None, "bogus"], None,
     "nccl on ranks [0, 1]; an invalid PIPER_TORCH_CUDA_DELEGATE on ranks [2]"),
    (["gloo", None, "gloo"], [1, 2], "nccl on ranks [0]; gloo on ranks [1]"),
], ids=["world differs", "world invalid", "subgroup differs"])
def test_ranks_delegating_cuda_collectives_differently_fail_together(values, subgroup, sides):
    """PIPER_TORCH_CUDA_DELEGATE differing between ranks (or invalid on one) would leave ranks
    waiting in different backends: group creation raises one PiperUsageError on every rank,
    naming both sides (ranks of the group), at once; also for a subgroup, whose Piper
    communicator runs over gloo."""
    run = run_mpi(3, "dist.cases:cuda_delegate_disagreement",
                  {"values": values, "subgroup": subgroup}, timeout=120)
    for rank, r in enumerate(run.ranks):
        if subgroup is not None and rank not in subgroup:
            assert r["result"] == "not a member", r["result"]
            continue
        assert r["result"].startswith("PiperUsageError"), r["result"]
        assert f"({sides})" in r["result"], r["result"]
    assert "'bogus': expected nccl or gloo" in run.ranks[2]["result"] or values[2] != "bogus"
    assert run.elapsed < 60


@pytest.mark.mpi
def test_torch_local_check_does_not_hang():
    """torch raises ValueError on the rank with mixed dtypes; the others time out cleanly."""
    run = run_mpi(4, "dist.cases:local_torch_check",
                  env={"PIPER_LOCAL_SIZE": "2", "PIPER_TIMEOUT": "3"}, timeout=60)
    assert [r["result"] for r in run.ranks] == ["PiperDistTimeoutError"] * 3 + ["ValueError"]
    assert run.elapsed < 30


def _example(cmd: list[str], backend: str, tmp_path) -> list[float]:
    out = tmp_path / f"{backend}-{cmd[0].rsplit('/', 1)[-1]}.json"
    proc = subprocess.run([*cmd, str(ROOT / "examples" / "train_tiny.py"), "--backend", backend,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**__import__("os").environ, "PYTHONPATH": str(ROOT),
                                            "PIPER_TIMEOUT": "60"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.mpi
def test_example_script_same_losses_as_gloo(tmp_path):
    """examples/train_tiny.py (dist.all_to_all_single + dist.all_reduce in a training loop)
    runs unchanged with "piper" under torchrun and mpirun and matches gloo's losses exactly."""
    torchrun = [TORCHRUN, "--standalone", "--nproc-per-node=4"]
    mpirun = [MPIRUN, "-n", "4", sys.executable]
    gloo = _example(torchrun, "gloo", tmp_path)
    assert len(gloo) == 5 and gloo[-1] < gloo[0]
    assert _example(torchrun, "piper", tmp_path) == gloo
    assert _example(mpirun, "piper", tmp_path) == gloo


def test_single_process_without_torch_distributed():
    import piper_comm as pc
    import piper_comm.torch as pt

    comm = pc.init(backend="single")
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = pt.all_to_all_single(torch.empty(5, 3, dtype=torch.float64), x, [5], [5], group=comm)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    z, recv = pt.all_to_all_v(x, [5], comm=comm)
    assert recv == [5] and torch.equal(z, x)
    with pytest.raises(RuntimeError, match="input_split_sizes sum to 4 rows but input has 5"):
        pt.all_to_all_single(torch.empty_like(x), x.detach(), [5], [4], group=comm)
    pt.register()  # idempotent
    assert "PIPER" in torch.distributed.Backend._plugins
    comm.close()


@pytest.mark.mpi
def test_pytorch_own_all_to_all_tests_pass_on_piper():
    """torch's CPU all-to-all tests (distributed_test.py's test_all_to_all*, world, full group and
    subgroup, equal/unequal splits, complex) on dist.init_process_group("piper")."""
    run = run_mpi(4, "dist.torch_suite_cases:run", {}, timeout=300)
    results = run.ranks[0]["result"]
    assert len(results) == 12, results  # 6 on the world, 3 on a full new group, 3 on ranks 1-2
    for r in run.ranks:
        failed = {k: v for k, v in r["result"].items() if v != "ok"}
        assert not failed, failed


@pytest.mark.mpi
def test_host_staged_delegate_copies_results_back_at_wait():
    """The delegate for CUDA tensors with PIPER_INTER=mpi (gloo through host copies), run on
    CPU: point-to-point with a finite wait timeout (as the pipeline engine waits), results
    landing at completion (wait, is_completed, future) and only in outputs, a receive from
    any source; and the group's all_gather_into_tensor / reduce_scatter_tensor."""
    run = run_mpi(3, "dist.cases:host_staged", timeout=120)
    assert [r["result"]["received"] for r in run.ranks] == [3.0, 1.0, 2.0]
    assert run.ranks[0]["result"]["source"] == 1


def test_a_piper_group_waits_piper_timeout_unless_the_script_gave_one(monkeypatch):
    """PIPER_TIMEOUT when set; else the script's init_process_group(timeout=...); torch's
    30-minute default (what a script that gave none passes) counts as none: 300 s."""
    from datetime import timedelta

    from torch.distributed.constants import default_pg_timeout

    from piper_comm.torch.backend import _timeout_s

    monkeypatch.delenv("PIPER_TIMEOUT", raising=False)
    assert _timeout_s(default_pg_timeout) == 300.0
    assert _timeout_s(timedelta(seconds=7)) == 7.0
    monkeypatch.setenv("PIPER_TIMEOUT", "5")
    assert _timeout_s(timedelta(seconds=7)) == 5.0
    assert _timeout_s(default_pg_timeout) == 5.0
