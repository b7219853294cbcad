"""Suite-wide hooks: the batching of multi-rank cases (tests/batch.py) and the unit tier.

Tiers (docs/testing.md): `make test` runs everything; `make unit` runs the tests not marked
`mpi` in this one process, with PIPER_TEST_NO_LAUNCH=1 so that a test which starts a launcher
without the marker fails, naming the marker it lacks.
"""

from __future__ import annotations

import inspect
import os

import pytest

from tests import batch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "own_job: a multi-rank case whose assertions are about its launcher job "
        "(exit statuses, /dev/shm before and after, elapsed time): never batched")


class _StandIn:
    """What a probed test gets for a fixture other than its parameters: any use ends the
    probe, so a test that needs a fixture's value before it launches is not batched."""

    def _refuse(self, *args, **kwargs):
        raise batch.NoProbe("fixture used before the first launch")

    __getattr__ = __str__ = __repr__ = __format__ = __fspath__ = __iter__ = _refuse
    __truediv__ = __call__ = __getitem__ = __bool__ = __len__ = __eq__ = _refuse
    __hash__ = None


def _launches(func, module, depth: int = 2) -> bool:
    """Whether func, or a function of its module that it calls (two levels), calls
    run_mpi or run_torchrun."""
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    names = set(code.co_names)
    for const in code.co_consts:  # comprehensions, lambdas
        if inspect.iscode(const):
            names |= set(const.co_names)
    if names & {"run_mpi", "run_torchrun"}:
        return True
    return depth > 0 and any(
        _launches(g, module, depth - 1) for n in names
        if inspect.isfunction(g := getattr(module, n, None)) and g.__module__ == module.__name__)


def _probe(item) -> list[batch.Call]:
    """The launches of the test, up to the first that depends on a result (tests/batch.py)."""
    from _pytest.skipping import evaluate_skip_marks

    if not isinstance(item, pytest.Function) or item.cls is not None:
        return []
    if item.get_closest_marker("own_job") or not _launches(item.obj, item.module):
        return []
    if evaluate_skip_marks(item) is not None:
        return []
    params = item.callspec.params if hasattr(item, "callspec") else {}
    kwargs = {name: params.get(name, _StandIn()) for name in item._fixtureinfo.argnames}
    with batch.probing() as calls:
        try:
            item.obj(**kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException:  # the end of the probe: a stand-in used, a skip, a process
            pass
        return list(calls)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Plans the batch jobs for the selected tests (after -k/-m selection)."""
    if os.environ.get("PIPER_TEST_BATCH", "1") == "0" or os.environ.get("PIPER_TEST_NO_LAUNCH"):
        return
    probed = [(item.nodeid, call) for item in items for call in _probe(item)]
    batch.PLAN = batch.Plan.build(probed)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Runs the test's batch job first if it has not run yet: outside the test's
    pytest-timeout (each case of the job has its own timeout, tests/batch.py)."""
    if batch.PLAN is not None:
        batch.PLAN.before_test(item.nodeid)
    yield


def pytest_terminal_summary(terminalreporter):
    if batch.PLAN is not None:
        for line in batch.PLAN.summary():
            terminalreporter.write_line(line)
