"""Piper's NCCL transport (csrc/cuda/nccl_transport.cpp) on a host without a GPU: exact on every
algorithm and dtype, and bounded errors on every rank when a rank fails, over a mock NCCL
(tests/comm/mock_nccl.c, built here) that moves host bytes (tests/comm/nccl_cases.py).

What this cannot show: NCCL's own behaviour on a device (stream order, CUDA-graph capture,
several ranks on one GPU); that is the one-GPU check's (bench/gpu_check.sh)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import piper_comm as pc
from tests.launch import run_mpi

_INFO = pc.build_info()
_CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"  # as the Makefile
_NCCL_INCLUDE = (Path(_INFO["nccl_build_library"]).parent.parent / "include"
                 if _INFO.get("nccl_header") else None)
_WHY_NOT = ("piper_comm._C was built without NCCL's header (no NCCL transport to test)"
            if not _INFO.get("nccl_header") else
            f"no CUDA headers at {_CUDA_INCLUDE} (nccl.h includes cuda_runtime.h)"
            if not (_CUDA_INCLUDE / "cuda_runtime.h").exists() else None)
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]


@functools.cache
def mock_nccl() -> str:
    """Builds tests/comm/mock_nccl.c into a libnccl.so.2 (once per session) against nccl.h of
    the wheel Piper was built with and this Python's MPI; returns its path."""
    folder = tempfile.mkdtemp(prefix="piper-mock-nccl-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = Path(folder) / "libnccl.so.2"
    prefix = Path(sys.prefix)
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out),
           "-Wl,-soname,libnccl.so.2", str(Path(__file__).with_name("mock_nccl.c")),
           f"-I{_NCCL_INCLUDE}", f"-I{_CUDA_INCLUDE}", f"-I{prefix / 'include'}",
           f"-L{prefix / 'lib'}", "-lmpi", f"-Wl,-rpath,{prefix / 'lib'}"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"building the mock NCCL failed: {' '.join(cmd)}\n{built.stderr}"
    return str(out)


@pytest.mark.parametrize(("nprocs", "local_size"), [(2, 1), (4, 2), (5, 3), (4, 4)])
def test_nccl_transport_is_exact_on_every_algorithm_and_dtype(nprocs, local_size):
    """2 nodes of 1, 2 x 2, uneven nodes of 3 + 2, one node of 4 (halo then sends nothing over
    NCCL; flat and pairwise do)."""
    run = run_mpi(nprocs, "comm.nccl_cases:exact",
                  {"local_size": local_size, "library": mock_nccl()})
    res = [r["result"] for r in run.ranks]
    assert all(r["checked"] == 4 * 14 + 3 for r in res), run.report()
    assert len({r["transport"] for r in res}) == 1, res
    assert res[0]["transport"].startswith("nccl 2."), res


def _failures(nprocs: int, local_size: int, fail: str, algo: str = "flat") -> list[dict]:
    run = run_mpi(nprocs, "comm.nccl_cases:failure",
                  {"local_size": local_size, "library": mock_nccl(), "fail": fail, "algo": algo},
                  env={"PIPER_TIMEOUT": "4"}, timeout=120, expect_ok=False)
    assert all(r is not None and r["status"] == "ok" for r in run.ranks), run.report()
    return [r["result"] for r in run.ranks]


def test_a_rank_whose_nccl_init_fails_raises_and_its_peers_time_out():
    res = _failures(4, 2, "init:1")
    assert res[1]["type"] == "PiperSystemError", res[1]
    assert "ncclCommInitRankConfig" in res[1]["message"], res[1]
    assert "injected failure of ncclCommInitRankConfig" in res[1]["message"], res[1]
    for r in (0, 2, 3):
        assert res[r]["type"] == "PiperTimeoutError", res[r]
        assert f"NCCL communicator set-up on rank {r}" in res[r]["message"], res[r]
        assert "waiting for the other ranks to join" in res[r]["message"], res[r]
    assert all(r["calls"] == 1 for r in res), res


def test_a_rank_that_never_joins_leaves_every_rank_a_timeout():
    res = _failures(3, 1, "hang_init:2")
    for r, got in enumerate(res):
        assert got["type"] == "PiperTimeoutError", got
        assert f"rank {r}" in got["message"] and "timed out after 4 s" in got["message"], got


@pytest.mark.parametrize("algo", ["flat", "halo"])
def test_a_failed_nccl_group_raises_there_and_its_peers_time_out_naming_it(algo):
    """Rank 0's second group reports a remote error: rank 0 raises PiperPeerError with NCCL's
    words and the pending messages; its peers (every rank under flat; rank 2, its rail peer,
    under halo on 2 x 2) time out naming rank 0 (among the peers of the whole NCCL group: a
    group completes as one, so the transport cannot say which of its messages did not)."""
    res = _failures(4, 2, "group:0:2", algo)
    assert res[0]["type"] == "PiperPeerError", res[0]
    assert "NCCL reports" in res[0]["message"], res[0]
    assert "injected remote error in a group" in res[0]["message"], res[0]
    peers = (1, 2, 3) if algo == "flat" else (2,)
    for r in peers:
        assert res[r]["type"] == "PiperTimeoutError", res[r]
        assert "waiting for peer(s) [0" in res[r]["message"], res[r]
        assert "B from rank 0" in res[r]["message"], res[r]
    assert all(r["type"] is not None for r in res), res
    # the failed rank names the group's messages (the executor's "pending"), not an empty list
    assert "(pending: " in res[0]["message"] and "B to rank" in res[0]["message"], res[0]


def test_an_nccl_usage_error_is_a_usage_error():
    """What NCCL returns to ranks sharing a GPU without NCCL_MULTI_RANK_GPU_ENABLE (invalid
    usage) is the caller's to fix: PiperUsageError, not a peer failure."""
    res = _failures(2, 1, "usage:1:1")
    assert res[1]["type"] == "PiperUsageError", res[1]
    assert "injected invalid usage" in res[1]["message"], res[1]
    assert res[0]["type"] == "PiperTimeoutError", res[0]


def test_nccl_missing_on_one_rank_is_one_error_on_every_rank():
    run = run_mpi(3, "comm.nccl_cases:nccl_missing_on_one_rank",
                  {"local_size": 1, "library": mock_nccl()}, env={"PIPER_TIMEOUT": "20"},
                  timeout=120)
    for r in run.ranks:
        msg = r["result"]["message"]
        assert "NCCL is not usable on rank(s) 1" in msg and "raised on every rank" in msg, msg
    assert "/nonexistent/libnccl.so.2" in run.ranks[1]["result"]["message"]
    assert run.elapsed < 15, f"a rank waited for the timeout: {run.elapsed:.1f} s"
