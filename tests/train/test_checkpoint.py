"""Checkpoints: bitwise roundtrip, crash leftovers never loaded, pruning, refusals."""

import hashlib
import json
import random
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

from piper_moe.train.checkpoint import CheckpointError, load, rng_state, save, set_rng_state


def noop():
    pass


def _save1(root, step, state, **kw):
    return save(root, step, state, rank=0, world=1, barrier=noop, **kw)


def _trained():
    """A model and AdamW after one step, so that the optimizer state is non-trivial."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(16, 4)).square().mean().backward()
    opt.step()
    return model, opt


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(4))


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def test_roundtrip_is_bitwise(tmp_path):
    model, opt = _trained()
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
             "data": {"next_index": 4096, "name": "markov"}, "flags": [True, None, 1.5]}
    after_save = _draws()
    path = _save1(tmp_path, 7, state, meta={"layout": {"dp": 1}})
    assert path == tmp_path / "step-00000007"
    assert (tmp_path / "latest").read_text().strip() == "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank00000.pt"]
    _draws()  # move every generator on

    step, got, meta = load(tmp_path, rank=0, world=1)
    assert step == 7 and meta == {"layout": {"dp": 1}}
    assert _equal(got["model"], state["model"]) and _equal(got["optimizer"], state["optimizer"])
    assert got["data"] == state["data"] and got["flags"] == [True, None, 1.5]
    set_rng_state(got["rng"])
    assert _equal(_draws(), after_save)

    # The restored optimizer continues exactly as the original
    model2, opt2 = _trained()
    model2.load_state_dict(got["model"])
    opt2.load_state_dict(got["optimizer"])
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    assert _equal(model.state_dict(), model2.state_dict())


def test_no_checkpoint_is_none(tmp_path):
    assert load(tmp_path / "absent", rank=0, world=1) is None
    assert load(tmp_path, rank=0, world=1) is None
    (tmp_path / "step-00000005.tmp").mkdir()  # a torn save alone
    assert load(tmp_path, rank=0, world=1) is None


def test_torn_saves_are_never_loaded(tmp_path):
    _save1(tmp_path, 1, {"x": torch.ones(3)})
    # A crash before publishing: the .tmp dir is complete but for the rename
    _save1(tmp_path, 2, {"x": torch.full((3,), 2.0)})
    shutil.copytree(tmp_path / "step-00000002", tmp_path / "step-00000003.tmp")
    # A step dir without manifest (half-copied by hand) and a latest naming it
    shutil.copytree(tmp_path / "step-00000002", tmp_path / "step-00000004")
    (tmp_path / "step-00000004" / "manifest.json").unlink()
    (tmp_path / "latest").write_text("step-00000004\n")
    with pytest.warns(UserWarning, match="names 'step-00000004', which is not a complete"):
        step, state, _ = load(tmp_path, rank=0, world=1)
    assert step == 2 and torch.equal(state["x"], torch.full((3,), 2.0))
    # Without latest: the newest step dir with a valid manifest
    (tmp_path / "latest").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing named, nothing to warn about
        assert load(tmp_path, rank=0, world=1)[0] == 2
    # The next save removes the torn .tmp dir
    _save1(tmp_path, 5, {"x": torch.zeros(1)}, keep=3)
    assert not (tmp_path / "step-00000003.tmp").exists()
    assert load(tmp_path, rank=0, world=1)[0] == 5


def test_corrupted_rank_file_is_an_error(tmp_path):
    path = _save1(tmp_path, 1, {"x": torch.arange(1000)}) / "rank00000.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"rank00000.pt: \d+ bytes on disk, the manifest"):
        load(tmp_path, rank=0, world=1)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"rank00000.pt: sha256 does not match"):
        load(tmp_path, rank=0, world=1)


def test_keep_prunes_older_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        _save1(tmp_path, step, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step-00000030", "step-00000040"]
    _save1(tmp_path, 50, {"step": 50}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000050"]
    # A second save of the same step replaces it
    _save1(tmp_path, 50, {"step": 51}, keep=1)
    assert load(tmp_path, rank=0, world=1)[1] == {"step": 51}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000050"]


def test_two_ranks_in_sequence_and_world_mismatch(tmp_path):
    # Rank 1 runs to completion first (a no-op barrier), then rank 0 publishes
    for rank in (1, 0):
        save(tmp_path, 3, {"rank": rank, "w": torch.full((2,), float(rank))}, rank=rank,
             world=2, barrier=noop, meta={"world": 2})
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    assert manifest["world"] == 2 and sorted(manifest["files"]) == ["rank00000.pt",
                                                                     "rank00001.pt"]
    for rank in (0, 1):
        step, state, meta = load(tmp_path, rank=rank, world=2)
        assert (step, state["rank"], meta) == (3, rank, {"world": 2})
        assert torch.equal(state["w"], torch.full((2,), float(rank)))
    with pytest.raises(CheckpointError, match=r"saved by world=2 ranks, but this run has world=4"):
        load(tmp_path, rank=0, world=4)


def test_two_ranks_in_threads(tmp_path):
    barrier = threading.Barrier(2, timeout=30)
    errors = []

    def rank_main(rank):
        try:
            for step in (1, 2, 3):
                save(tmp_path, step, {"rank": rank, "step": step}, rank=rank, world=2,
                     barrier=barrier.wait)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step-00000002", "step-00000003"]
    assert [load(tmp_path, rank=r, world=2)[1] for r in (0, 1)] == [
        {"rank": 0, "step": 3}, {"rank": 1, "step": 3}]


def test_a_missing_rank_is_not_published(tmp_path):
    _save1(tmp_path, 1, {"ok": True})
    with pytest.raises(CheckpointError, match=r"rank 1 of world=2 left no complete shard"):
        save(tmp_path, 2, {"r": 0}, rank=0, world=2, barrier=noop)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()


class Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_arbitrary_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"state\['opt'\]\[0\]: a numpy.float64 cannot be loaded"):
        _save1(tmp_path, 1, {"opt": [np.float64(1.0)]})
    with pytest.raises(TypeError, match=r"state\['p'\]: a .*Payload cannot be loaded"):
        _save1(tmp_path, 1, {"p": Payload()})
    assert not (tmp_path / "latest").exists()
    # A rank file replaced with a pickled object, its manifest entry forged to match
    ckpt = _save1(tmp_path, 2, {"x": torch.ones(1)})
    torch.save({"x": Payload()}, ckpt / "rank00000.pt")
    forged = (ckpt / "rank00000.pt").read_bytes()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["rank00000.pt"] = {"sha256": hashlib.sha256(forged).hexdigest(),
                                         "size": len(forged)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        load(tmp_path, rank=0, world=1)
    (ckpt / "rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank00000.pt: missing, though .* lists it"):
        load(tmp_path, rank=0, world=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_roundtrip(tmp_path):
    torch.cuda.manual_seed(5)
    _save1(tmp_path, 1, {"rng": rng_state()})
    expect = torch.rand(8, device="cuda")
    torch.rand(8, device="cuda")
    set_rng_state(load(tmp_path, rank=0, world=1)[1]["rng"])
    assert torch.equal(torch.rand(8, device="cuda"), expect)


@pytest.mark.parametrize(("kw", "match"), [
    ({"rank": 2, "world": 2}, r"rank must be an int in \[0, world=2\)"),
    ({"world": 0}, "world must be an int >= 1"),
    ({"keep": 0}, "keep must be an int >= 1"),
    ({"step": -1}, "step must be an int >= 0"),
])
def test_argument_errors(tmp_path, kw, match):
    args = {"step": 1, "rank": 0, "world": 1, "keep": 2, **kw}
    with pytest.raises(ValueError, match=match):
        save(tmp_path, args.pop("step"), {}, barrier=noop, **args)
