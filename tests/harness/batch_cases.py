"""Rank-side cases of tests/harness/test_batch.py (several in one job, tests/batch.py)."""

import os


def _rank() -> int:
    return int(os.environ.get("PMI_RANK", os.environ.get("RANK", "0")))


def echo(x: int) -> int:
    print(f"echo {x} from rank {_rank()}", flush=True)
    return x


def fails_on(rank: int) -> int:
    if _rank() == rank:
        raise ValueError(f"rank {rank} fails on purpose")
    return 0
