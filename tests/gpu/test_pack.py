"""CUDA block copies (csrc/cuda/pack.cu) checked bitwise against a host reference.

The GPU tests need a CUDA device and a build with CUDA; elsewhere they are skipped with the
reason (see `pytest -ra`). The entry points' refusal without a device runs everywhere.
Buffers are torch CUDA tensors; every kernel runs on torch.cuda.current_stream().
"""

import numpy as np
import pytest

import piper_comm as pc
from piper_comm import _C

try:
    import torch
except ImportError:  # pragma: no cover - torch is an optional dependency
    torch = None

BUILD = pc.build_info()
if torch is None:
    SKIP_REASON = "needs torch with CUDA: torch is not installed"
elif not torch.cuda.is_available():
    SKIP_REASON = "needs a CUDA device: torch.cuda.is_available() is False"
elif not BUILD["cuda"]:
    SKIP_REASON = "piper_comm._C was built without CUDA (PIPER_CUDA=OFF or nvcc not found)"
else:
    SKIP_REASON = ""

needs_gpu = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)


# ---------------------------------------------------------------- helpers (host reference)


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def device_bytes(a: np.ndarray, pad: int = 0):
    """A uint8 CUDA tensor with `pad` leading bytes, and the view of a's bytes after them."""
    raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8)
    t = torch.empty(pad + raw.size, dtype=torch.uint8, device="cuda")
    t[:pad] = 0xEE
    t[pad:] = torch.from_numpy(raw.copy()).cuda()
    return t, t[pad:]


def random_blocks(rng, src_bytes: int, num: int, max_len: int):
    """num blocks with random (unaligned) offsets, zero-size ones among them; destination
    ranges never overlap (separated by random gaps), sources may."""
    lens = rng.integers(0, max_len + 1, size=num)
    lens[rng.random(num) < 0.2] = 0
    lens = np.minimum(lens, src_bytes)
    src_off = np.array([rng.integers(0, src_bytes - n + 1) for n in lens], dtype=np.int64)
    order = rng.permutation(num)
    gaps = rng.integers(0, 17, size=num)
    dst_off = np.zeros(num, dtype=np.int64)
    pos = 0
    for i in order:
        pos += int(gaps[i])
        dst_off[i] = pos
        pos += int(lens[i])
    return src_off, dst_off, lens.astype(np.int64), pos + 7


def reference_copy(src: np.ndarray, dst: np.ndarray, src_off, dst_off, lens) -> np.ndarray:
    out = dst.copy()
    for s, d, n in zip(src_off, dst_off, lens):
        out[d : d + n] = src[s : s + n]
    return out


def run_copy_blocks(src_np, dst_np, src_off, dst_off, lens, src_pad=0, dst_pad=0):
    _, src = device_bytes(src_np, src_pad)
    dst_base, dst = device_bytes(dst_np, dst_pad)
    table = torch.from_numpy(np.stack([src_off, dst_off, lens]).astype(np.int64)).cuda()
    _C.cuda_copy_blocks(src.data_ptr(), dst.data_ptr(), table.data_ptr(), len(lens), stream())
    torch.cuda.synchronize()
    assert bool((dst_base[:dst_pad] == 0xEE).all()), "wrote before dst"
    return dst.cpu().numpy()


def reference_pack(src: np.ndarray, counts, row_bytes: int, slot_bytes: int, dst: np.ndarray):
    out = dst.copy()
    displ = np.concatenate([[0], np.cumsum(counts)[:-1]]) * row_bytes
    for p, (c, d) in enumerate(zip(counts, displ)):
        out[p * slot_bytes : p * slot_bytes + c * row_bytes] = src[d : d + c * row_bytes]
    return out


def reference_unpack(src: np.ndarray, counts, row_bytes: int, slot_bytes: int, dst: np.ndarray):
    out = dst.copy()
    displ = np.concatenate([[0], np.cumsum(counts)[:-1]]) * row_bytes
    for p, (c, d) in enumerate(zip(counts, displ)):
        out[d : d + c * row_bytes] = src[p * slot_bytes : p * slot_bytes + c * row_bytes]
    return out


# ---------------------------------------------------------------- everywhere


def test_cuda_entry_points_refuse_rather_than_do_nothing():
    """Without CUDA in the build: "built without CUDA" (usage); without a device: an error."""
    if BUILD["cuda"] and BUILD.get("cuda_devices", 0) > 0:
        pytest.skip("a CUDA device is visible: fake pointers would fault (GPU tests cover it)")
    calls = [
        lambda: _C.cuda_copy_blocks(16, 16, 16, 1, 0),
        lambda: _C.cuda_pack_alltoallv(16, 16, 16, 1, 8, 8, 0),
        lambda: _C.cuda_unpack_alltoallv(16, 16, 16, 1, 8, 8, 0),
    ]
    for call in calls:
        if BUILD["cuda"]:
            with pytest.raises(pc.PiperError):
                call()
        else:
            with pytest.raises(pc.PiperUsageError, match="built without CUDA"):
                call()
    with pytest.raises(pc.PiperUsageError):
        _C.cuda_copy_blocks(16, 16, 16, -1, 0)


# ---------------------------------------------------------------- GPU: copy_blocks


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pads", [(0, 0), (0, 8), (3, 3), (1, 6), (5, 0)])
@pytest.mark.parametrize("max_len", [40, 5000])
def test_copy_blocks_random_misaligned(seed, pads, max_len):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, size=1 << 16, dtype=np.uint8)
    src_off, dst_off, lens, dst_bytes = random_blocks(rng, src.size, 200, max_len)
    dst = rng.integers(0, 256, size=dst_bytes, dtype=np.uint8)
    got = run_copy_blocks(src, dst, src_off, dst_off, lens, *pads)
    np.testing.assert_array_equal(got, reference_copy(src, dst, src_off, dst_off, lens))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("n", [*range(0, 40), 4095, 4096, 4097, (5 << 20) + 3])
@pytest.mark.parametrize("offs", [(0, 0), (1, 1), (7, 15), (2, 6), (4, 12), (3, 0)])
def test_copy_blocks_one_block_every_head_and_tail(n, offs):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, size=n + 32, dtype=np.uint8)
    dst = rng.integers(0, 256, size=n + 32, dtype=np.uint8)
    so, do = np.array([offs[0]]), np.array([offs[1]])
    lens = np.array([n])
    got = run_copy_blocks(src, dst, so, do, lens)
    np.testing.assert_array_equal(got, reference_copy(src, dst, so, do, lens))


@pytest.mark.gpu
@needs_gpu
def test_copy_blocks_many_large_blocks_and_only_zero_blocks():
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, size=24 << 20, dtype=np.uint8)
    lens = np.array([3 << 20, 0, (8 << 20) + 5, 1, 1 << 20] * 2, dtype=np.int64)
    src_off = np.array([rng.integers(0, src.size - n + 1) for n in lens], dtype=np.int64)
    dst_off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    dst = np.zeros(int(lens.sum()) + 1, dtype=np.uint8)
    got = run_copy_blocks(src, dst, src_off, dst_off, lens)
    np.testing.assert_array_equal(got, reference_copy(src, dst, src_off, dst_off, lens))
    zeros = np.zeros(5, dtype=np.int64)
    got = run_copy_blocks(src[:64], dst[:64], zeros, zeros, zeros)
    np.testing.assert_array_equal(got, dst[:64])


@pytest.mark.gpu
@needs_gpu
def test_copy_blocks_host_plan_on_device():
    """A CopyList from the host planner runs unchanged on the device."""
    rng = np.random.default_rng(3)
    send = rng.integers(0, 1000, size=4).astype(np.int64)
    plan = _C.plan_flat(0, send, send)
    blocks = plan.self_copy
    src = rng.integers(0, 256, size=int(send.sum()), dtype=np.uint8)
    dst = np.zeros(int(send.sum()), dtype=np.uint8)
    got = run_copy_blocks(src, dst, blocks.src_off, blocks.dst_off, blocks.len)
    want = reference_copy(src, dst, blocks.src_off, blocks.dst_off, blocks.len)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- GPU: pack / unpack

DTYPES = ["uint8", "float16", "bfloat16", "float32", "int32", "int64", "float64"]


def torch_dtype(name: str):
    return getattr(torch, name)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_peers", [1, 2, 3, 8, 300])
@pytest.mark.parametrize("hidden", [1, 3, 64, 1000])
def test_pack_unpack_random_counts_with_zeros(dtype, num_peers, hidden):
    rng = np.random.default_rng(num_peers * 1000 + hidden)
    counts = rng.integers(0, 9, size=num_peers).astype(np.int64)
    counts[rng.random(num_peers) < 0.3] = 0
    rows = int(counts.sum())
    row_bytes = hidden * torch.empty(0, dtype=torch_dtype(dtype)).element_size()
    src_np = rng.integers(0, 256, size=rows * row_bytes, dtype=np.uint8)  # every bit pattern
    # bytes viewed as dtype (no rows: torch cannot view an empty byte tensor, which has stride 0)
    x = (torch.from_numpy(src_np.copy()).view(torch_dtype(dtype)) if rows
         else torch.empty(0, dtype=torch_dtype(dtype))).reshape(rows, hidden)
    slot_bytes = int(counts.max(initial=0)) * row_bytes + 24  # padded, unaligned slots
    counts_dev = torch.from_numpy(counts).cuda()

    # Pack: dense rows -> slots; the slack of every slot keeps its sentinel.
    slots = torch.full((num_peers * slot_bytes,), 0xAB, dtype=torch.uint8, device="cuda")
    x_dev = x.cuda()
    _C.cuda_pack_alltoallv(
        x_dev.data_ptr(),
        slots.data_ptr(),
        counts_dev.data_ptr(),
        num_peers,
        row_bytes,
        slot_bytes,
        stream(),
    )
    torch.cuda.synchronize()
    slots_ref = reference_pack(
        src_np, counts, row_bytes, slot_bytes, np.full(num_peers * slot_bytes, 0xAB, np.uint8)
    )
    np.testing.assert_array_equal(slots.cpu().numpy(), slots_ref)

    # Unpack: slots -> dense rows, bitwise the input again.
    out = torch.zeros_like(x_dev)
    _C.cuda_unpack_alltoallv(
        slots.data_ptr(),
        out.data_ptr(),
        counts_dev.data_ptr(),
        num_peers,
        row_bytes,
        slot_bytes,
        stream(),
    )
    torch.cuda.synchronize()
    assert torch.equal(out.cpu().view(torch.uint8), x.view(torch.uint8))
    dense_ref = reference_unpack(
        slots_ref, counts, row_bytes, slot_bytes, np.zeros(rows * row_bytes, np.uint8)
    )
    np.testing.assert_array_equal(out.view(torch.uint8).reshape(-1).cpu().numpy(), dense_ref)


@pytest.mark.gpu
@needs_gpu
def test_equal_split_pack_is_identity_on_a_side_stream():
    """Equal split (slot = count rows): pack and unpack reproduce the buffer, ordered only by
    the stream they ran on (no host sync between the launches)."""
    num_peers, count, hidden = 8, 512, 1024
    x = torch.randn(num_peers * count, hidden, device="cuda")
    counts = torch.full((num_peers,), count, dtype=torch.int64, device="cuda")
    row_bytes = hidden * x.element_size()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        slots = torch.empty_like(x)
        back = torch.empty_like(x)
        s = side.cuda_stream
        _C.cuda_pack_alltoallv(
            x.data_ptr(),
            slots.data_ptr(),
            counts.data_ptr(),
            num_peers,
            row_bytes,
            count * row_bytes,
            s,
        )
        _C.cuda_unpack_alltoallv(
            slots.data_ptr(),
            back.data_ptr(),
            counts.data_ptr(),
            num_peers,
            row_bytes,
            count * row_bytes,
            s,
        )
    side.synchronize()
    assert torch.equal(slots, x) and torch.equal(back, x)
