"""comm.all_to_all(_v) on CUDA memory: 4 ranks on the one device as 2 emulated nodes of 2 and as
1 node of 4 (HALO's intra-node stage over CUDA IPC, its inter-node stage and flat/pairwise over
NCCL, or staged through host memory with PIPER_INTER=mpi), checked bitwise against the host
result; CuPy; CUDA-graph capture; CPU/GPU mixes. Skipped, with the reason, where no device is
visible (CI); bench/gpu_check.sh runs them on the lent GPU machine. The argument checks that do
not need a device (a CUDA array where no device is, a CPU/GPU mix) run everywhere: see
tests/comm/cases.py:bad_input."""

import importlib.util

import pytest

from tests.gpu.test_cuda_context import NO_DEVICE
from tests.launch import run_mpi

needs_gpu = pytest.mark.skipif(bool(NO_DEVICE), reason=NO_DEVICE)
pytestmark = [pytest.mark.gpu, pytest.mark.mpi, needs_gpu]



def _one_gpu_nccl_reason() -> str:
    """Why NCCL cannot run several ranks on this one GPU ("" when it can): NCCL >= 2.30 does,
    with NCCL_MULTI_RANK_GPU_ENABLE=1 (experimental). The NCCL that Piper's transport uses is
    the one torch loaded (csrc/cuda/nccl_transport.cpp)."""
    if NO_DEVICE:
        return NO_DEVICE
    import torch

    version = tuple(torch.cuda.nccl.version())
    if version < (2, 30, 0):
        return (f"torch's NCCL {'.'.join(map(str, version))} < 2.30 cannot run several ranks "
                f"on one GPU (NCCL_MULTI_RANK_GPU_ENABLE)")
    return ""


NCCL_ONE_GPU = _one_gpu_nccl_reason()
needs_nccl_one_gpu = pytest.mark.skipif(bool(NCCL_ONE_GPU), reason=NCCL_ONE_GPU)
# Several ranks on one GPU: NCCL >= 2.30 allows it with this variable (experimental); with an
# older NCCL the tests that do not need NCCL itself run over the host-staged transport.
ONE_GPU = ({"NCCL_MULTI_RANK_GPU_ENABLE": "1"} if not NCCL_ONE_GPU
           else {"PIPER_INTER": "mpi"})
LAYOUTS = [(4, 2), (4, 4)]  # (ranks, ranks per emulated node)


@pytest.mark.parametrize("inter", [pytest.param("nccl", marks=needs_nccl_one_gpu), "mpi"])
@pytest.mark.parametrize(("nprocs", "local_size"), LAYOUTS)
def test_every_algorithm_and_dtype_equals_the_host_result(nprocs, local_size, inter):
    """halo, flat, pairwise and auto in one job (each call checked on every rank)."""
    run = run_mpi(nprocs, "gpu.comm_cases:exact", {"local_size": local_size,
                                                   "seed": nprocs + local_size},
                  env={**ONE_GPU, "PIPER_INTER": inter}, timeout=240)
    res = [r["result"] for r in run.ranks]
    for algo in ("halo", "flat", "pairwise", "auto"):
        assert all(r["checked"][algo] == res[0]["checked"][algo] > 0 for r in res), algo
    want = "nccl" if inter == "nccl" else "host-staged"
    assert all(r["device_transport"].startswith(want) for r in res), res


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_cupy_arrays():
    run = run_mpi(4, "gpu.comm_cases:cupy_arrays", {"local_size": 2}, env=ONE_GPU, timeout=180)
    assert all(r["result"]["ok"] for r in run.ranks), run.report()


@needs_nccl_one_gpu
@pytest.mark.parametrize(("nprocs", "local_size"), LAYOUTS)
def test_cuda_graph_capture_and_replay(nprocs, local_size):
    run = run_mpi(nprocs, "gpu.comm_cases:graph_capture", {"local_size": local_size},
                  env={**ONE_GPU, "PIPER_INTER": "nccl"}, timeout=180)
    res = [r["result"] for r in run.ranks]
    assert all(r["captured"] in ("flat", "pairwise") for r in res), res  # never HALO
    assert all(r["refused"] for r in res), res  # algorithm="halo" while capturing


@needs_nccl_one_gpu
def test_device_work_of_a_skipped_call_is_aborted_after_the_timeout():
    """csrc/runtime/watchdog.hpp on a device: a group whose peer never posts is aborted after
    PIPER_TIMEOUT (the device sync returns), and the next call names it."""
    run = run_mpi(2, "gpu.comm_cases:device_watchdog", {"local_size": 2},
                  env={**ONE_GPU, "PIPER_INTER": "nccl", "PIPER_CHECK": "0",
                       "PIPER_TIMEOUT": "10"}, timeout=120)
    res = run.ranks[0]["result"]
    assert 10 <= res["synced_s"] < 40, res
    msg = res["message"]
    assert msg.startswith("piper: rank 0: NCCL group ") and "peers 1" in msg, msg
    assert "not completed" in msg and "PIPER_TIMEOUT" in msg and "aborted" in msg, msg


def test_cpu_gpu_mixes_raise_on_every_rank():
    run = run_mpi(4, "gpu.comm_cases:bad_input", {"local_size": 2}, env=ONE_GPU, timeout=180)
    assert all({"mixed", "memory", "noncontig"} <= set(r["result"]["cases"]) for r in run.ranks)


def test_torch_backend_runs_cuda_all_to_all_single_on_piper():
    run = run_mpi(4, "gpu.comm_cases:torch_backend", {"local_size": 2},
                  env={**ONE_GPU, "PIPER_LOCAL_SIZE": "2"}, timeout=180)
    assert all(r["result"]["device_transport"] for r in run.ranks), run.report()
