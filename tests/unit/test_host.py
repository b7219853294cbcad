"""Shared segments, error translation, environment parsing, array views, the cost model."""

import os
import stat
import time

import numpy as np
import pytest

import piper_comm as pc
from piper_comm import _C, cost, envs


def test_segment_is_private_exclusive_and_unlinked():
    prefix = f"/piper-unittest.{os.getpid()}-{os.getpid()}-n0"
    ch = _C.NodeChannel(prefix, 0, [0], 1, True)
    path = f"/dev/shm{prefix}.ctl"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(pc.PiperSystemError, match="O_EXCL"):
        _C.NodeChannel(prefix, 0, [0], 1, True)  # a squatted name is refused
    ch.unlink()
    assert not os.path.exists(path)
    assert ch.ensure_data(100, "test", 1.0) is True and ch.data_bytes >= 100
    assert not os.path.exists(f"/dev/shm{prefix}.d1")  # data segments unlink too
    ch.barrier("test", 1.0)  # a node of one rank passes at once
    ch.close()


def test_barrier_times_out_naming_the_missing_peer():
    prefix = f"/piper-unittest.{os.getpid()}-{os.getpid()}-n1"
    ch = _C.NodeChannel(prefix, 0, [4, 5], 8, True)
    ch.unlink()
    with pytest.raises(pc.PiperTimeoutError, match=r"rank 4 timed out .* \[5\]"):
        ch.barrier("all_to_all #3 (halo: blocks packed)", 0.2)
    ch.close()


def test_dead_local_peer_raises_peer_error_quickly():
    """A local peer maps the node channel and dies (left a zombie, as under a launcher that
    has not reaped it yet): the barrier raises PiperPeerError naming it, long before timeout."""
    prefix = f"/piper-unittest.{os.getpid()}-{os.getpid()}-n2"
    ch = _C.NodeChannel(prefix, 0, [0, 1], 2, True)
    pid = os.fork()
    if pid == 0:  # the peer: map, then die without a word
        _C.NodeChannel(prefix, 1, [0, 1], 2, False)
        os._exit(0)
    try:
        time.sleep(0.2)
        ch.unlink()
        t0 = time.monotonic()
        with pytest.raises(pc.PiperPeerError, match=r"rank 1 \(pid \d+, same node\) has died"):
            ch.barrier("all_to_all #9 (halo: counts shared)", 10.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        os.waitpid(pid, 0)
        ch.close()


def test_stale_segment_sweep_spares_live_owners(tmp_path):
    from piper_comm.bootstrap import sweep_stale_segments

    dead = "/dev/shm/piper-unittest.x-999999999-n0.ctl"
    live = f"/dev/shm/piper-unittest.x-{os.getpid()}-n0.ctl"
    for p in (dead, live):
        open(p, "w").close()
    try:
        removed = sweep_stale_segments()
        assert os.path.basename(dead) in removed and os.path.exists(live)
    finally:
        for p in (dead, live):
            if os.path.exists(p):
                os.unlink(p)


@pytest.mark.parametrize(("name", "value", "match"), [
    ("PIPER_TIMEOUT", "abc", "not a number"), ("PIPER_TIMEOUT", "-1", "> 0"),
    ("PIPER_LOCAL_SIZE", "0", ">= 1"), ("PIPER_ALGO", "ring", "expected one of"),
    ("PIPER_TORCH_CUDA_DELEGATE", "mpi", "expected nccl or gloo"),
])
def test_bad_environment_is_refused(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    fn = {"PIPER_TIMEOUT": envs.timeout, "PIPER_LOCAL_SIZE": envs.local_size,
          "PIPER_ALGO": envs.algorithm, "PIPER_TORCH_CUDA_DELEGATE": envs.torch_cuda_delegate}[name]
    with pytest.raises(pc.PiperUsageError, match=match):
        fn()


@pytest.mark.parametrize(("inter", "delegate", "expected"), [
    (None, None, "nccl"), ("mpi", None, "gloo"), ("nccl", None, "nccl"), ("mpi", "nccl", "nccl"),
    (None, "gloo", "gloo")])
def test_torch_cuda_delegate_follows_piper_inter_unless_set(monkeypatch, inter, delegate,
                                                             expected):
    for name, value in (("PIPER_INTER", inter), ("PIPER_TORCH_CUDA_DELEGATE", delegate)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert envs.torch_cuda_delegate() == expected


def test_arrays_move_without_copies():
    """recv given: the call fills it in place and returns it (or a view of its head rows)."""
    import torch

    comm = pc.init(backend="single")
    x = (np.arange(24, dtype=np.float32) + 1j).astype(np.complex64).reshape(4, 3, 2)
    r = np.zeros((6, 3, 2), np.complex64)
    out = comm.all_to_all(x, recv=r)
    assert out.base is r and np.array_equal(r[:4], x)
    t = torch.arange(10, dtype=torch.bfloat16).reshape(5, 2)
    tr = torch.zeros(5, 2, dtype=torch.bfloat16)
    assert comm.all_to_all(t, recv=tr) is tr and torch.equal(tr, t)
    out, counts = comm.all_to_all_v(t, np.array([5]))
    assert counts == [5] and torch.equal(out, t) and out.data_ptr() != t.data_ptr()
    not_array = "a numpy array, a torch tensor or a CUDA array"
    for bad, words in ((x[:, :2], "not contiguous"), (np.float32(1.0), not_array),
                       (np.zeros(()), "at least one dimension"), ("rows", not_array)):
        with pytest.raises(pc.PiperUsageError, match=words):
            comm.all_to_all(bad)



def test_cost_model_prefers_halo_for_small_messages_across_many_nodes():
    node_of = np.repeat(np.arange(8), 8)
    links = cost.Links(alpha_inter=5e-6, beta_inter=25e9, alpha_intra=1e-6, beta_intra=200e9,
                       alpha_barrier=2e-6, beta_copy=100e9)
    small = np.full((64, 64), 256)
    big = np.full((64, 64), 8 << 20)
    assert cost.choose(small, node_of, links) == "halo"
    t = cost.predict(big, node_of, links)
    assert t["halo"] > 0 and t["flat"] > 0
    # Single node: HALO = pack + copy-out vs direct messages; huge blocks favour flat.
    one = np.zeros(8, dtype=np.int64)
    assert cost.choose(np.full((8, 8), 64 << 20), one, cost.Links(beta_copy=1e9)) == "flat"


def test_build_info():
    info = pc.build_info()
    assert {"version", "cuda", "cuda_archs", "mpi", "nccl_version"} <= set(info)
    assert "MPICH" in info["mpi"] or "Open MPI" in info["mpi"]
