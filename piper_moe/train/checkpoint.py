"""Atomic, pickle-free checkpoints for multi-rank training on a shared filesystem.

Layout under root:
    step-00001000/          a complete checkpoint: renamed into place only once whole
        manifest.json       {"format", "step", "world", "meta", "files": {name: {sha256, size}}}
        rank00000.pt ...    one torch.save file per rank: that rank's shard of the state
    step-00002000.tmp/      a save in progress, or torn by a crash: never loaded
    latest                  text: the directory name of the newest complete checkpoint

save() is collective (every rank calls it with the same step); barrier() is the caller's:
    1. each rank writes step-N.tmp/rankR.pt and a digest of it (sha256, size), both fsynced;
    2. barrier();
    3. rank 0 removes other steps' torn .tmp dirs, writes manifest.json (temp file, fsync,
       os.replace), renames step-N.tmp to step-N, fsyncs root, points `latest` at it (temp
       file, os.replace) and deletes complete checkpoints older than the newest `keep`;
    4. barrier().
A crash at any point leaves `latest` naming either the previous complete checkpoint or the new
one, never a torn one. Only rank 0 acts after the first barrier, so calling save for ranks
world-1 .. 0 in turn with a no-op barrier also works (single-process tests).

load() reads `latest` (or, when it is missing or names no valid checkpoint, the newest step-*
dir with a valid manifest), checks the world size and this rank's sha256, and loads with
torch.load(weights_only=True): tensors, numbers, strings, None and dicts, lists and tuples of
them come back; no arbitrary object is unpickled. save() refuses other types up front.

Costs: each rank reads its shard back once to hash it (page cache) on save, and once on load.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FORMAT = "piper-checkpoint-v1"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded as asked (the message names the file)."""


def save(root, step: int, state: dict, *, rank: int, world: int, barrier: Callable[[], None],
         meta: dict | None = None, keep: int = 2) -> Path:
    """Write this rank's shard of checkpoint `step`; collective over the `world` ranks.

    root: a directory on a filesystem every rank sees (created if absent).
    state: this rank's shard, a dict nesting dicts (str or int keys), lists and tuples of
        tensors, bools, ints, floats, strings, bytes, None, torch dtypes and devices (e.g. model
        and optimizer state_dicts, rng_state(), the data position). Anything else raises
        TypeError naming its path (after the barriers, like a failed write).
    barrier: a callable that returns once every rank has called it (e.g. dist.barrier).
    meta: JSON-serialisable dict stored in the manifest and returned by load (rank 0's copy).
    keep: complete checkpoints to keep, this one included (>= 1); older steps are deleted.
        Steps above `step` (left by an abandoned run) are left alone.
    Returns root/step-{step:08d}. A rank whose write fails still joins both barriers, then
    raises; rank 0 then raises CheckpointError naming the missing shard and the step is not
    published. Only rank 0 sees an error in publishing (step 3).
    """
    root = Path(root)
    _check_rank(rank, world)
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")

    name = f"step-{step:08d}"
    tmp, final = root / f"{name}.tmp", root / name
    shard = tmp / _rank_file(rank)
    digest = tmp / f"{shard.name}.json"
    error = None
    try:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        _check_state(state, "state")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta must be JSON-serialisable: {e}") from e
        # Write the shard, then its digest: a digest only exists for a whole, durable shard
        tmp.mkdir(parents=True, exist_ok=True)
        digest.unlink(missing_ok=True)  # from a torn earlier save of this step
        with open(shard, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(digest, json.dumps({"sha256": _sha256(shard),
                                          "size": shard.stat().st_size}))
    except Exception as e:  # join the barriers anyway, so that no rank waits forever
        error = e
    barrier()
    try:
        if rank == 0 and error is None:
            _publish(root, step, tmp, final, world, meta, keep)
    finally:
        barrier()
    if error is not None:
        raise error
    return final


def load(root, *, rank: int, world: int):
    """(step, state, meta) of this rank from the newest complete checkpoint, or None.

    None when root holds no complete checkpoint. Raises CheckpointError when the checkpoint
    was saved by another number of ranks, when this rank's file fails its size or sha256
    check, or when it holds anything torch.load(weights_only=True) refuses to unpickle.
    Tensors come back on the CPU.
    """
    root = Path(root)
    _check_rank(rank, world)
    found = _find_latest(root) if root.is_dir() else None
    if found is None:
        return None
    ckpt, manifest = found
    if manifest["world"] != world:
        raise CheckpointError(f"{ckpt} was saved by world={manifest['world']} ranks, but this "
                              f"run has world={world}; resharding is not supported")
    path = ckpt / _rank_file(rank)
    want = manifest["files"][path.name]
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, though {ckpt / 'manifest.json'} lists it")
    size = path.stat().st_size
    if size != want["size"]:
        raise CheckpointError(f"{path}: {size} bytes on disk, the manifest says "
                              f"{want['size']} (truncated or replaced)")
    if _sha256(path) != want["sha256"]:
        raise CheckpointError(f"{path}: sha256 does not match {ckpt / 'manifest.json'} "
                              f"(corrupted or replaced)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which "
                              f"unpickles no arbitrary object: {e}") from e
    return manifest["step"], state, manifest["meta"]


def rng_state() -> dict:
    """The random states of python `random`, numpy's global RNG, torch CPU and the current
    CUDA device (when CUDA is available), as a dict that save() accepts."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = {"device": torch.cuda.current_device(),
                         "state": torch.cuda.get_rng_state()}
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state(): the random numbers drawn next are bitwise those drawn after it.

    The CUDA state is restored to the device it came from when CUDA is available, and
    skipped otherwise (a GPU run resumed on CPU).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"]["state"], state["cuda"]["device"])


# -- publishing (rank 0)
def _publish(root: Path, step: int, tmp: Path, final: Path, world: int, meta, keep: int):
    """Step 3 of save: manifest, rename, latest, pruning. Runs on rank 0 only."""
    # Remove other steps' torn saves: every rank has finished writing this one
    for d in root.iterdir():
        if d != tmp and d.is_dir() and d.name.startswith("step-") and d.name.endswith(".tmp"):
            shutil.rmtree(d, ignore_errors=True)

    # Collect the ranks' digests; drop them and any file of a torn save by more ranks
    files = {}
    for r in range(world):
        shard = tmp / _rank_file(r)
        try:
            digest = json.loads((tmp / f"{shard.name}.json").read_text())
            size = shard.stat().st_size
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{tmp}: rank {r} of world={world} left no complete shard "
                                  f"{shard.name} (did its write fail?); step {step} is not "
                                  f"published") from e
        if size != digest["size"]:
            raise CheckpointError(f"{shard}: {size} bytes, but rank {r} wrote "
                                  f"{digest['size']}; step {step} is not published")
        files[shard.name] = {"sha256": digest["sha256"], "size": size}
    for p in tmp.iterdir():
        if p.name not in files:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    # Complete the directory, then publish it with one rename
    manifest = {"format": FORMAT, "step": step, "world": world, "meta": meta, "files": files}
    _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    old = None
    if final.exists():  # a second save of this step: move the first aside (.tmp: not loaded)
        old = root / f"{final.name}.old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name + "\n")

    # Prune: keep this step and the keep - 1 newest complete ones below it
    older = sorted(s for s, d in _step_dirs(root) if s < step and (d / "manifest.json").is_file())
    for s in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(root / f"step-{s:08d}", ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- finding a checkpoint
def _find_latest(root: Path):
    """(dir, manifest) named by root/latest, else of the newest valid step dir, else None."""
    named = None
    with contextlib.suppress(OSError):
        named = (root / "latest").read_text().strip()
    if named is not None and _STEP_DIR.fullmatch(named):
        manifest = _read_manifest(root / named)
        if manifest is not None:
            return root / named, manifest
    for _, d in sorted(_step_dirs(root), reverse=True):
        manifest = _read_manifest(d)
        if manifest is not None:
            if named is not None:
                warnings.warn(f"{root / 'latest'} names {named!r}, which is not a complete "
                              f"checkpoint; loading {d.name}, the newest complete one",
                              stacklevel=3)
            return d, manifest
    return None


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step-NNNNNNNN directory (never the .tmp ones)."""
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return out


def _read_manifest(d: Path) -> dict | None:
    """The manifest of step dir d if it is well-formed and consistent with d's name."""
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        world, files = manifest["world"], manifest["files"]
        ok = (manifest["format"] == FORMAT
              and manifest["step"] == int(_STEP_DIR.fullmatch(d.name).group(1))
              and isinstance(world, int) and world >= 1
              and set(files) == {_rank_file(r) for r in range(world)}
              and all(isinstance(f["sha256"], str) and isinstance(f["size"], int)
                      for f in files.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if ok else None


# -- helpers
def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _check_rank(rank: int, world: int) -> None:
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")


def _check_state(x, path: str) -> None:
    """Raise TypeError naming the first value under x that weights_only loading refuses."""
    if type(x) in (dict, collections.OrderedDict):
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{path}: key {k!r} is a {type(k).__name__}; use str or int")
            _check_state(v, f"{path}[{k!r}]")
    elif type(x) in (list, tuple, torch.Size):
        for i, v in enumerate(x):
            _check_state(v, f"{path}[{i}]")
    elif not (isinstance(x, torch.Tensor) or type(x) in _LEAVES):  # np.float64 is a float
        raise TypeError(f"{path}: a {type(x).__module__}.{type(x).__qualname__} cannot be "
                        f"loaded with weights_only=True; store tensors, numbers, strings, "
                        f"None, or dicts/lists/tuples of them (e.g. numpy -> torch.from_numpy, "
                        f"numpy scalar -> float/int)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path via a fsynced temp file and os.replace, then fsync the directory."""
    part = path.with_name(f".{path.name}.part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """Make d's entries (creations, renames) durable; a no-op where directories can't be
    opened (Windows)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
