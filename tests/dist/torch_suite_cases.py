"""PyTorch's own CPU all-to-all tests, run with backend "piper" (by tests/dist/test_torch.py).

The tests are torch.testing._internal.distributed.distributed_test's `test_all_to_all*`
methods (the CPU ones: torch runs them for its MPI backend, they are gated on BACKEND ==
"mpi"): equal and unequal splits, complex dtypes, the world, a full new group and a subgroup
of ranks 1 and 2, for dist.all_to_all_single and dist.all_to_all. Each runs unchanged on a
process group made by dist.init_process_group("piper"); the one piece of torch's harness
replaced is its file-based barrier between test bodies, by dist.barrier().
"""

from __future__ import annotations

import os
import tempfile
import unittest

# Read when torch's test module is imported: the CPU all-to-all tests are the MPI backend's.
os.environ.setdefault("BACKEND", "mpi")
os.environ.setdefault("TEMP_DIR", tempfile.gettempdir())


# The case sets up and destroys torch.distributed's default group: its own job (tests/batch.py).
BATCH = False


def run(only: str = "", skip: str = "\0") -> dict:
    """Runs every CPU test_all_to_all* method whose name contains `only` and not `skip`; returns
    {name: "ok" | "skip: why" | the error}."""
    import torch.distributed as dist

    import piper_comm.torch  # registers the "piper" backend

    piper_comm.torch.fill_from_mpi()
    dist.init_process_group("piper")
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    from torch.testing._internal.common_utils import TestCase
    from torch.testing._internal.distributed.distributed_test import DistributedTest

    class Suite(DistributedTest._DistTestBase, TestCase):  # TestCase: tensor-aware asserts
        def _barrier(self, *args, **kwargs):
            dist.barrier()

    names = sorted(n for n in dir(Suite)
                   if n.startswith("test_all_to_all") and "cuda" not in n and only in n
                   and skip not in n)
    results = {}
    for name in names:
        try:
            getattr(Suite(methodName=name), name)()
            results[name] = "ok"
        except unittest.SkipTest as e:
            results[name] = f"skip: {e}"
        except Exception as e:  # reported per test, the run goes on
            results[name] = f"{type(e).__name__}: {e}"
        dist.barrier()
    dist.destroy_process_group()
    return results
