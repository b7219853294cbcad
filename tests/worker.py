"""Rank side of tests/launch.py.

One case:    python -m tests.worker module:function '<json args>' outdir
    Writes outdir/rank<r>.json = {status: ok|error, result, error, elapsed}. A case that must
    leave without MPI finalisation (after a peer died) returns {"hard_exit": code}.

Many cases:  python -m tests.worker --batch outdir
    Runs the cases of outdir/cases.json ([{"func", "args"}]) in turn in this one process (one
    mpirun job for cases of the same launch shape: tests/batch.py). Case k writes
    outdir/c<k>-rank<r>.json (as above) and its output (fds 1 and 2, C++ and MPI included) goes
    to outdir/c<k>-rank<r>.log. Between cases the ranks agree through those files: every rank
    waits until all ranks wrote case k's result, and goes on only if every rank's case ended ok;
    otherwise the job ends (a rank whose case failed leaves at once, as with one case, and so
    does a hard exit) and tests/batch.py starts the cases left in a new job.
"""

import ctypes
import faulthandler
import importlib
import json
import os
import signal
import sys
import time
import traceback


def _rank() -> int:
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _size() -> int:
    return int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
               or os.environ.get("WORLD_SIZE") or 1)


def _wait_for_all_results(outdir: str, limit: float = 15.0, prefix: str = "") -> None:
    """Before an exit without MPI finalisation: wait (bounded) until every rank has written
    its result, because the launcher kills the whole job when the first process leaves that
    way, and a rank still writing would lose its result."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(outdir, f"{prefix}rank{r}.json"))
               for r in range(_size())):
            return
        time.sleep(0.05)


def _run_case(func: str, args: dict) -> dict:
    module, name = func.split(":")
    t0 = time.monotonic()
    out = {"status": "ok", "result": None, "error": None}
    try:
        out["result"] = getattr(importlib.import_module(f"tests.{module}"), name)(**args)
    except BaseException as e:
        out.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    out["elapsed"] = time.monotonic() - t0
    return out


def _write(path: str, out: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)


def _hard_exit(out: dict, outdir: str, prefix: str = "") -> None:
    """Leaves at once when the case asked for it (its result {"hard_exit": code})."""
    result = out["result"]
    if isinstance(result, dict) and "hard_exit" in result:
        sys.stdout.flush()
        sys.stderr.flush()
        if result.get("hard_exit_after_all"):
            _wait_for_all_results(outdir, prefix=prefix)
        os._exit(result["hard_exit"])


def _finish(modules: list[str], ok: bool) -> None:
    # A case module may own its process's exit (piper_moe.train.launch.finish: explicit teardown
    # then C exit(); see its docstring for why). tests/batch.py batches such a module's cases
    # only with cases of the same module.
    for module in modules:
        finish = getattr(sys.modules.get(f"tests.{module}"), "finish", None)
        if finish is not None:
            finish(0 if ok else 1)
    sys.exit(0 if ok else 1)


def main() -> None:
    func, args, outdir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    # tests/launch.py sends SIGUSR1 before it kills a hung job: every thread's stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    out = _run_case(func, args)
    _write(os.path.join(outdir, f"rank{_rank()}.json"), out)
    sys.stdout.flush()
    sys.stderr.flush()
    _hard_exit(out, outdir)
    _finish([func.split(":")[0]], out["status"] == "ok")


def _flush_all() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # C stdio buffers (C++ and MPI output) too


def _agree(outdir: str, k: int) -> bool:
    """Waits until every rank wrote case k's result (a rank that hangs or dies there is the
    launcher's to end: its per-case timeout, MPI's abort); True when all ended ok."""
    paths = [os.path.join(outdir, f"c{k}-rank{r}.json") for r in range(_size())]
    while not all(os.path.exists(p) for p in paths):
        time.sleep(0.02)
    outs = []
    for p in paths:
        with open(p) as f:
            outs.append(json.load(f))
    return all(o["status"] == "ok" and not (isinstance(o["result"], dict)
                                            and "hard_exit" in o["result"]) for o in outs)


def batch(outdir: str) -> None:
    with open(os.path.join(outdir, "cases.json")) as f:
        cases = json.load(f)
    rank = _rank()
    saved = os.dup(1), os.dup(2)
    modules, ok = [], True
    for k, case in enumerate(cases):
        _flush_all()
        with open(os.path.join(outdir, f"c{k}-rank{rank}.log"), "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # re-registered so that the stacks land in this case's log
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            out = _run_case(case["func"], case["args"])
            _flush_all()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        module = case["func"].split(":")[0]
        if module not in modules:
            modules.append(module)
        _write(os.path.join(outdir, f"c{k}-rank{rank}.json"), out)
        _hard_exit(out, outdir, prefix=f"c{k}-")
        if out["status"] != "ok":  # leaves at once, as with one case: the launcher then ends
            ok = False  # the peers that may wait for this rank inside the case
            break
        if not _agree(outdir, k):
            break
    _flush_all()
    _finish(modules, ok)


if __name__ == "__main__":
    if sys.argv[1] == "--batch":
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        batch(sys.argv[2])
    else:
        main()
