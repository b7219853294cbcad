"""What a failing multi-rank test shows: which rank did what, also when a rank was killed or
hung (tests/launch.py's report)."""

import pytest

from tests.launch import describe_status, exit_statuses, run_mpi

pytestmark = pytest.mark.mpi


def test_exit_statuses_parsed():
    assert exit_statuses("x\n[mpiexec@vm] Exit codes: [vm] 0,9,256\nYOUR APP") == [0, 9, 256]
    assert exit_statuses("no such line") == []
    assert describe_status(9) == "killed by SIGKILL"
    assert describe_status(256) == "exited with status 1"


def test_killed_rank_is_named_with_its_signal():
    run = run_mpi(3, "harness.cases:rank_killed", {"rank": 1}, timeout=60, expect_ok=False)
    report = run.report()
    assert run.ranks[1] is None, report
    assert "rank 1: no result; exit: killed by SIGKILL" in report, report


def test_hung_rank_shows_its_stack():
    run = run_mpi(2, "harness.cases:rank_hangs", {"rank": 1}, timeout=8, expect_ok=False)
    report = run.report()
    assert run.ranks[1] is None and run.ranks[0] is not None, report
    assert "killed after the 8 s test timeout" in report, report
    assert "hang_here_forever" in report, report  # rank 1's stack, dumped before the kill
