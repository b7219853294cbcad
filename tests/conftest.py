"""Suite-wide hooks: the batching of multi-rank cases (tests/batch.py), the unit tier, and what
the launched jobs leave behind.

Tiers (docs/testing.md): `make test` runs everything; `make unit` runs the tests not marked
`mpi` in this one process, with PIPER_TEST_NO_LAUNCH=1 so that a test which starts a launcher
without the marker fails, naming the marker it lacks.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import batch

# hydra's proxy writes its topology here (the path is compiled in, TMPDIR is not read) and
# removes it at exit, unless it was killed (the tests that kill jobs).
HYDRA_FILES = "hydra_hwloc_xmlfile_*"
_JOBS: dict = {}  # the session's jobs' TMPDIR and the MPICH segments that were there before


def pytest_sessionstart(session):
    """The processes the tests start get a TMPDIR of their own, removed at the end of the
    session (torchrun's run folders stayed in /tmp). This process keeps its own temporary
    folder (pytest's tmp_path)."""
    from tests import launch

    tempfile.gettempdir()  # fixed for this process before TMPDIR changes
    _JOBS["tmpdir"] = tempfile.mkdtemp(prefix="piper-test-jobs-")
    _JOBS["saved"] = os.environ.get("TMPDIR")
    _JOBS["shm"] = set(Path("/dev/shm").glob(launch.MPICH_SHM))
    _JOBS["hydra"] = set(Path("/tmp").glob(HYDRA_FILES))
    os.environ["TMPDIR"] = _JOBS["tmpdir"]


def pytest_sessionfinish(session):
    """Removes the jobs' TMPDIR, and what jobs that died or left without MPI_Finalize left
    elsewhere: MPICH's segments (of the jobs not started through tests/launch.py, which removes
    its own) and hydra's topology files that no process holds open."""
    from tests import launch

    if "tmpdir" not in _JOBS:
        return
    if _JOBS["saved"] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _JOBS["saved"]
    shutil.rmtree(_JOBS.pop("tmpdir"), ignore_errors=True)
    launch.remove_leaked_mpich_shm(_JOBS["shm"])
    open_now = _open_files()
    for path in set(Path("/tmp").glob(HYDRA_FILES)) - _JOBS["hydra"]:
        if str(path) not in open_now:
            path.unlink(missing_ok=True)


def _open_files() -> set[str]:
    """The paths some live process of ours holds open."""
    paths = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):  # gone, or not ours to read
            paths.add(os.readlink(fd))
    return paths


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
