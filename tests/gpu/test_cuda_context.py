"""The CUDA execution context (csrc/cuda/cuda_context.hpp), tested as far as a CPU host allows.

Here: the context protocol the algorithms follow (every ExecContext call of flat, pairwise and
HALO recorded on the host context, ranks as threads of this process), which the CUDA context's
fences rely on; its host-side parts (the IPC record in the node channel's exchange area, the
copy table of the block-copy kernel and its bounds checks, the segment's growth); and the
refusal of CudaContext.create without CUDA or without a device. The GPU tests (two processes
sharing a segment over CUDA IPC on one device) skip with the reason where no device is visible.
"""

import os
from collections import Counter

import numpy as np
import pytest

import piper_comm as pc
from piper_comm import _C
from tests.launch import run_mpi

BUILD = pc.build_info()
FLAT, PAIRWISE, HALO = 0, 1, 2  # runtime::Algorithm


def _no_device_reason() -> str:
    if not BUILD["cuda"]:
        return "no CUDA device: piper_comm._C was built without CUDA"
    if BUILD.get("cuda_devices", 0) <= 0:
        return f"no CUDA device ({BUILD.get('cuda_error', 'none visible')})"
    return ""


NO_DEVICE = _no_device_reason()
needs_gpu = pytest.mark.skipif(bool(NO_DEVICE), reason=NO_DEVICE)


# ---------------------------------------------------------------- the context protocol


def expected_recv(S: np.ndarray, r: int) -> bytes:
    """Rank r's receive buffer: from every rank s, s's block for r (bytes (s*31 + r*7 + i))."""
    out = bytearray()
    for s in range(S.shape[0]):
        out += bytes((s * 31 + r * 7 + i) & 0xFF for i in range(S[s, r]))
    return bytes(out)


def probe(node_of, S, algorithm):
    S = np.asarray(S, dtype=np.int64)
    ranks = _C.probe_context_protocol(list(node_of), S.reshape(-1), algorithm)
    for r, res in enumerate(ranks):
        assert res["recv"] == expected_recv(S, r), f"rank {r} received wrong bytes"
    return [res["trace"] for res in ranks]


def uneven(P: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = rng.integers(0, 300, size=(P, P))
    S[rng.random((P, P)) < 0.25] = 0
    return S


def step(line: str) -> str:
    """A trace line without its sizes: "copy send->segment", "fence blocks packed", ..."""
    if line.startswith("fence"):
        return line
    words = line.split(" ")
    return " ".join(words[:2]) if words[0] == "copy" else words[0]


HALO_STEPS = ["publish_counts", "fence counts shared", "read_counts", "ensure_segment",
              "segment", "copy send->segment", "staging", "fence blocks packed",
              "copy segment->recv"]


@pytest.mark.parametrize("node_of", [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1, 1, 1]],
                         ids=["2x2", "1x4", "2x2-strided", "2x3"])
@pytest.mark.parametrize("seed", range(3))
def test_halo_calls_the_context_in_the_documented_order(node_of, seed):
    """Every rank: counts published, fence, counts read, segment sized (the same size on every
    rank of a node: it is collective), packed, fence, local blocks out, then at most an unpack
    from staging. The data arrives exact."""
    P = len(node_of)
    traces = probe(node_of, uneven(P, seed), HALO)
    for r, trace in enumerate(traces):
        steps = [step(line) for line in trace]
        assert steps[: len(HALO_STEPS)] == HALO_STEPS, f"rank {r}: {trace}"
        assert all(s == "copy staging->recv" for s in steps[len(HALO_STEPS):]), trace
    for node in set(node_of):
        sizes = {t[3] for r, t in enumerate(traces) if node_of[r] == node}
        assert len(sizes) == 1, f"node {node}: ensure_segment sizes differ {sizes}"


@pytest.mark.parametrize("algorithm", [FLAT, PAIRWISE, HALO])
@pytest.mark.parametrize("node_of", [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 1, 1, 1]])
def test_segment_reads_follow_a_fence_after_every_write(algorithm, node_of):
    """What the CUDA context needs from any algorithm: a copy that reads the node segment comes
    after a fence that comes after this rank's last write to it (a fence is a node barrier, so
    after every local rank's writes), and every rank of a node makes the same number of fences
    (the context alternates its IPC events by fence parity)."""
    traces = probe(node_of, uneven(len(node_of), 7), algorithm)
    for r, trace in enumerate(traces):
        dirty = False
        for line in trace:
            if line.startswith("fence"):
                dirty = False
            elif line.startswith("copy"):
                src, dst = line.split(" ")[1].split("->")
                assert not (src == "segment" and dirty), f"rank {r} reads unfenced: {trace}"
                dirty = dirty or dst == "segment"
        assert not any("other" in line for line in trace), trace
    for node in set(node_of):
        fences = {sum(line.startswith("fence") for line in t)
                  for r, t in enumerate(traces) if node_of[r] == node}
        assert len(fences) == 1, f"node {node}: fence counts differ {fences}"


def test_flat_and_pairwise_only_copy_the_block_to_self():
    """Flat and pairwise touch the context for one copy (send -> recv) and nothing else."""
    for algorithm in (FLAT, PAIRWISE):
        traces = probe([0, 0, 1, 1], uneven(4, 3), algorithm)
        for trace in traces:
            assert [step(line) for line in trace] == ["copy send->recv"], trace


def test_halo_of_one_rank_nodes_runs_flat_and_equal_split_halo_never_stages():
    assert probe([0, 1, 2], uneven(3, 1), HALO)[0][0].startswith("copy send->recv")
    S = np.full((4, 4), 64)
    traces = probe([0, 0, 1, 1], S, HALO)  # contiguous nodes: remote blocks land in place
    assert Counter(t[-1].split(" ")[1] for t in traces) == Counter({"segment->recv": 4})


# ---------------------------------------------------------------- host parts of the context


def test_device_table_is_row_major_without_empty_blocks():
    t = _C.cuda_device_table([0, 5, 9, 2], [10, 0, 3, 30], [5, 0, 1, 4], 16, 40)
    assert t.dtype == np.int64 and t.shape == (3, 3)
    np.testing.assert_array_equal(t, [[0, 9, 2], [10, 3, 30], [5, 1, 4]])
    assert _C.cuda_device_table([], [], [], 0, 0).shape == (3, 0)


@pytest.mark.parametrize(("s", "d", "n", "src_bytes", "dst_bytes"), [
    (12, 0, 5, 16, 40),             # reads past the source
    (0, 36, 5, 16, 40),             # writes past the destination
    (-1, 0, 1, 16, 40),             # negative offset
    (0, 0, -3, 16, 40),             # negative length
    (2**62, 0, 2**62, 2**62, 40),   # an offset + length that would overflow int64
])
def test_device_table_refuses_blocks_outside_the_buffers(s, d, n, src_bytes, dst_bytes):
    with pytest.raises(pc.PiperError, match=rf"pack on rank 3: block 1 .* exceeds buffers of "
                                            rf"{src_bytes} B / {dst_bytes} B"):
        _C.cuda_device_table([0, s], [0, d], [1, n], src_bytes, dst_bytes, "pack on rank 3")


def test_copy_list_arrays_must_be_equally_long():
    with pytest.raises(pc.PiperUsageError, match="2 src offsets, 1 dst offsets and 2 lengths"):
        _C.cuda_device_table([0, 1], [0], [1, 1], 8, 8)


def test_ipc_record_round_trip_fits_the_exchange_area():
    assert _C.CUDA_IPC_RECORD_BYTES <= _C.CUDA_EXCHANGE_BYTES
    handle = bytes(range(64))
    area = _C.cuda_ipc_encode({"pid": 4242, "device": 3, "bus_id": "0000:3b:00.0",
                               "segment_gen": 2, "segment_bytes": 4 << 20,
                               "segment_handle": handle})
    assert len(area) == _C.CUDA_EXCHANGE_BYTES
    rec = _C.cuda_ipc_decode(area, 5, "test")
    assert rec == {"pid": 4242, "device": 3, "bus_id": "0000:3b:00.0", "segment_gen": 2,
                   "segment_bytes": 4 << 20, "error": "", "segment_handle": handle}
    _C.cuda_check_segment(area, 0, 2, 3 << 20, "grow")


def test_missing_record_names_the_rank_and_the_mixed_memory_kinds():
    with pytest.raises(pc.PiperSystemError,
                       match=r"all_to_all #4: rank 6 published no CUDA IPC record .* same memory"):
        _C.cuda_ipc_decode(bytes(_C.CUDA_EXCHANGE_BYTES), 6, "all_to_all #4")


def test_segment_check_reports_the_owners_error_and_stale_generations():
    failed = _C.cuda_ipc_encode({"segment_gen": 3, "error": "cudaMalloc failed: out of memory"})
    with pytest.raises(pc.PiperSystemError,
                       match=r"grow: rank 4 could not create .* 8388608 B: cudaMalloc failed"):
        _C.cuda_check_segment(failed, 4, 3, 8 << 20, "grow")
    stale = _C.cuda_ipc_encode({"segment_gen": 2, "segment_bytes": 8 << 20})
    with pytest.raises(pc.PiperError, match="generation 2 of 8388608 B, expected generation 3"):
        _C.cuda_check_segment(stale, 4, 3, 8 << 20, "grow")


def test_exchange_areas_are_shared_between_ranks_and_apart_from_the_counts():
    """Two channels of one node (as two ranks would map it): what rank 1 writes in its area,
    rank 0 reads; the areas do not overlap each other or the published count rows."""
    prefix = f"/piper-unittest.{os.getpid()}-cudax"
    a = _C.NodeChannel(prefix, 0, [0, 1], 4, True)
    b = _C.NodeChannel(prefix, 1, [0, 1], 4, False)
    a.unlink()
    try:
        rows = np.arange(8, dtype=np.int64).reshape(2, 4)
        a.publish_row(1, rows[0])
        b.publish_row(1, rows[1])
        mine = _C.cuda_ipc_encode({"pid": os.getpid(), "device": 1, "segment_gen": 1,
                                   "segment_bytes": 1 << 21})
        _C.node_exchange_view(b, 1)[:] = mine
        _C.node_exchange_view(a, 0)[:] = _C.cuda_ipc_encode({"device": 0})
        assert bytes(_C.node_exchange_view(a, 1)) == mine
        assert _C.cuda_ipc_decode(bytes(_C.node_exchange_view(b, 0)), 0, "t")["device"] == 0
        np.testing.assert_array_equal(a.read_rows(1, 4), rows)
        with pytest.raises(pc.PiperError, match="assertion"):
            _C.node_exchange_view(a, 2)
    finally:
        a.close()
        b.close()


def test_segment_grows_at_least_double_in_whole_granules():
    mib = 1 << 20
    assert _C.cuda_grown_segment_bytes(1, 0) == 2 * mib          # at least 1 MiB, 2 MiB granule
    assert _C.cuda_grown_segment_bytes(5 * mib, 2 * mib) == 6 * mib
    assert _C.cuda_grown_segment_bytes(3 * mib, 4 * mib) == 8 * mib   # at least double
    for want, cur in [(7, 0), (10**9 + 1, 3 * mib), (64 * mib, 64 * mib - 1)]:
        got = _C.cuda_grown_segment_bytes(want, cur)
        assert got >= want and got >= 2 * cur and got % (2 * mib) == 0


def test_create_refuses_clearly_without_cuda_or_without_a_device():
    if not NO_DEVICE:
        pytest.skip("a CUDA device is visible: the GPU tests create real contexts")
    error, match = ((pc.PiperError, r"cudaSetDevice\(0\) on rank 2 failed") if BUILD["cuda"]
                    else (pc.PiperUsageError, r"rank 2 .*built without CUDA"))
    with pytest.raises(error, match=match):
        _C.CudaContext.create(None, 4, 2, 0, 1.0)
    with pytest.raises(error, match=match):
        _C.CudaNodeExecutor(None, 4, 2, 0, 1.0)


# ---------------------------------------------------------------- GPU: two processes, one device


@pytest.mark.gpu
@pytest.mark.mpi
@needs_gpu
@pytest.mark.parametrize("nprocs", [2, 4])
def test_ipc_segment_shared_and_fenced_between_processes(nprocs):
    """nprocs ranks on one device, one node: each packs its block into the shared segment
    with the context's copy, fences, and reads every other rank's block back (through the
    IPC mapping, ordered only by the IPC events); the segment then grows and the check
    repeats; close() releases the handles in order."""
    run = run_mpi(nprocs, "gpu.cases:ipc_segment_round_trip", {"rows": 4096}, timeout=180)
    assert all(r["result"] == "ok" for r in run.ranks), run.report()


@pytest.mark.gpu
@pytest.mark.mpi
@needs_gpu
@pytest.mark.parametrize("nprocs", [2, 4])
def test_halo_on_device_memory_one_node(nprocs):
    """The executor's HALO over the CUDA context, nprocs processes on one device as one node,
    uneven counts, the segment grown between calls: bitwise the bytes sent."""
    run = run_mpi(nprocs, "gpu.cases:halo_one_node_cuda", {"seed": nprocs}, timeout=180)
    assert all(r["result"] == 3 for r in run.ranks), run.report()
