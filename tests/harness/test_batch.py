"""tests/batch.py: the plan's rules (one process), and what a shared job reports when a case
fails or hangs in it (mpirun)."""

import pytest

from tests import batch
from tests.launch import MPIRUN, Run


def _call(func="comm.cases:exactness", nprocs=4, env=None, args=None, timeout=300, **kw):
    return batch.Call.of("mpirun", nprocs, func, args, env, timeout, **kw)


def test_plan_groups_by_shape_and_keeps_fault_cases_alone():
    engine = "runtime.cases:engine_matches_reference"  # a module with `finish`
    suite = "dist.torch_suite_cases:run"  # BATCH = False
    probed = [("a", _call()), ("b", _call(env={"PIPER_LOCAL_SIZE": "2"})), ("c", _call()),
              ("d", _call(expect_ok=False)), ("e", _call(mpi_args=("-disable-auto-cleanup",))),
              ("f", _call(env={"PIPER_TIMEOUT": "3"})), ("g", _call("dist.cases:gradcheck")),
              ("h", _call("dist.cases:gradcheck")), ("i", _call(engine)), ("j", _call(engine)),
              ("k", _call(nprocs=2)), ("l", _call(args={"local_size": 2})),
              ("m", _call(suite)), ("n", _call(suite)),
              ("o", batch.Call.of("torchrun", 4, "dist.cases:gradcheck", None, None, 300)),
              ("p", batch.Call.of("torchrun", 4, "dist.cases:gradcheck", None, None, 300))]
    plan = batch.Plan.build(probed)
    # dist.cases (BATCH = "mpirun"): its own jobs under mpirun, a job per case under torchrun
    assert [[n for n, _ in job.calls] for job in plan.jobs] == [["a", "c", "l"], ["g", "h"],
                                                                 ["i", "j"]]
    assert plan.own == {"b": "only case of its shape", "d": "expects failing ranks",
                        "e": "launcher options", "f": "waits for timeouts",
                        "k": "only case of its shape",
                        "m": "its case module says BATCH = False",
                        "n": "its case module says BATCH = False",
                        "o": "its case module batches under mpirun only",
                        "p": "its case module batches under mpirun only"}
    assert set(plan.of_test) == {"a", "c", "l", "g", "h", "i", "j"}
    # a test's repeated launch (a loop) is planned once: the repeats run alone
    repeated = batch.Plan.build([("a", _call()), ("a", _call()), ("b", _call())])
    assert len(repeated.jobs[0].calls) == 2


def test_plan_splits_a_shape_into_jobs_of_near_equal_size():
    plan = batch.Plan.build([(str(i), _call(args={"seed": i})) for i in range(45)])
    assert [len(job.calls) for job in plan.jobs] == [15, 15, 15]
    assert [n for job in plan.jobs for n, _ in job.calls] == [str(i) for i in range(45)]


def test_take_serves_ok_cases_once_and_sends_the_others_alone():
    good, bad, gone = _call(args={"x": 1}), _call(args={"x": 2}), _call(args={"x": 3})
    plan = batch.Plan.build([("t1", good), ("t2", bad), ("t3", gone)])
    job = plan.jobs[0]
    ok_run = Run(0, "", [{"status": "ok", "result": 1, "elapsed": 0.1}] * 4, 0.1)
    bad_run = Run(1, "", [{"status": "ok", "result": 1, "elapsed": 0.1}] * 3 + [None], 0.1)
    job.runs = {("t1", good): ok_run, ("t2", bad): bad_run, ("t3", gone): None}
    assert plan.take("t1", good) is ok_run
    assert plan.take("t1", good) is None  # served once: a second identical launch runs
    assert plan.take("t1", bad) is None  # not this test's planned call
    assert plan.take("t2", bad) is None and plan.take("t3", gone) is None
    assert [n for n, _ in plan.reruns] == ["t2", "t3"]
    assert "rank 3: no result" in plan.reruns[0][1] and "not started" in plan.reruns[1][1]


PREFIX = [MPIRUN, "-print-all-exitcodes", "-n", "2"]


def _echo(x):
    return batch.Call.of("mpirun", 2, "harness.batch_cases:echo", {"x": x}, None, 60)


@pytest.mark.mpi
@pytest.mark.own_job
def test_a_failing_case_ends_the_job_with_every_ranks_outcome():
    fail = batch.Call.of("mpirun", 2, "harness.batch_cases:fails_on", {"rank": 1}, None, 60)
    first, failed, after = batch.run_job(PREFIX, [_echo(1), fail, _echo(2)])
    assert batch.ok(first) and [r["result"] for r in first.ranks] == [1, 1]
    assert "echo 1 from rank 0" in first.output and "echo 1 from rank 1" in first.output
    report = failed.report()
    assert not batch.ok(failed), report
    assert failed.ranks[0]["status"] == "ok" and failed.ranks[1]["status"] == "error", report
    assert "rank 1: error after" in report and "ValueError: rank 1 fails on purpose" in report
    assert "Traceback" in report and "--- launcher output ---" in report
    assert after is None  # not started: the plan runs it in a new job


@pytest.mark.mpi
@pytest.mark.own_job
def test_a_hung_case_is_killed_with_its_stack():
    hang = batch.Call.of("mpirun", 2, "harness.cases:rank_hangs", {"rank": 1}, None, 3)
    first, hung, after = batch.run_job(PREFIX, [_echo(1), hang, _echo(2)])
    assert batch.ok(first)
    report = hung.report()
    assert hung.ranks[1] is None and hung.ranks[0]["status"] == "ok", report
    assert "killed after its 3 s test timeout" in report, report
    assert "hang_here_forever" in report, report  # rank 1's stack, dumped before the kill
    assert after is None
