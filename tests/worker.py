"""Rank side of tests/launch.py: python -m tests.worker module:function '<json args>' outdir.

Writes outdir/rank<r>.json = {status: ok|error, result, error, elapsed}. A case that must
leave without MPI finalisation (after a peer died) returns {"hard_exit": code}.
"""

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


def _wait_for_all_results(outdir: str, limit: float = 15.0) -> None:
    """Before an exit without MPI finalisation: wait (bounded) until every rank has written
    its result, because the launcher kills the whole job when the first process leaves that
    way, and a rank still writing would lose its result."""
    size = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE")
               or os.environ.get("WORLD_SIZE") or 1)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(outdir, f"rank{r}.json")) for r in range(size)):
            return
        time.sleep(0.05)


def main() -> None:
    func, args, outdir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    # tests/launch.py sends SIGUSR1 before it kills a hung job: every thread's stack to stderr
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    module, name = func.split(":")
    t0 = time.monotonic()
    out = {"status": "ok", "result": None, "error": None}
    try:
        out["result"] = getattr(importlib.import_module(f"tests.{module}"), name)(**args)
    except BaseException as e:
        out.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    out["elapsed"] = time.monotonic() - t0
    path = os.path.join(outdir, f"rank{_rank()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    result = out["result"]
    if isinstance(result, dict) and "hard_exit" in result:
        if result.get("hard_exit_after_all"):
            _wait_for_all_results(outdir)
        os._exit(result["hard_exit"])
    # A case module may own its process's exit (piper_moe.train.launch.finish: explicit teardown
    # then C exit(); see its docstring for why).
    finish = getattr(sys.modules.get(f"tests.{module}"), "finish", None)
    if finish is not None:
        finish(0 if out["status"] == "ok" else 1)
    sys.exit(0 if out["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
