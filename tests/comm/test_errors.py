"""Bad input raises PiperUsageError on every rank; stuck or dead peers raise in bounded time."""

from pathlib import Path

import pytest

from tests.launch import run_mpi

pytestmark = pytest.mark.mpi


def _piper_segments() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("piper-*"))


def _mpich_segments() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob("mpich_shm_*"))


@pytest.mark.parametrize(("nprocs", "local_size"), [(1, None), (4, 2), (6, 4)])
def test_bad_input_raises_on_every_rank(nprocs, local_size):
    run = run_mpi(nprocs, "comm.cases:bad_input", {"local_size": local_size})
    cases = {r["result"]["cases"] for r in run.ranks}
    assert cases == {9 if nprocs == 1 else 13}


@pytest.mark.own_job  # each rank changes its own environment: nothing for a later case to reuse
@pytest.mark.parametrize(("env", "words"), [
    ([{}, {"PIPER_INTER": "bogus"}, {}],
     ["PIPER_INTER is invalid on ranks [1]"]),
    ([{"PIPER_ALGO": "halo"}, {}, {"PIPER_ALGO": "flat", "PIPER_CHECK": "x"}],
     ["PIPER_ALGO differs between the ranks (groups [[0], [1], [2]]",
      "PIPER_CHECK is invalid on ranks [2]"]),
    ([{"PIPER_LOCAL_SIZE": "1"}, {"PIPER_LOCAL_SIZE": "1"}, {"PIPER_LOCAL_SIZE": "3"}],
     ["PIPER_LOCAL_SIZE differs between the ranks (groups [[0, 1], [2]]"]),
    ([{}, {"PIPER_MPI_CALLS": "mpi4py"}, {}],
     ["PIPER_MPI_CALLS differs between the ranks (groups [[0, 2], [1]]"]),
    ([{"PIPER_PLATFORM": "frontier"}, {}, {"PIPER_PLATFORM": "frontier"}],
     ["PIPER_PLATFORM differs between the ranks (groups [[0, 2], [1]]"]),
    ([{"PIPER_ALGO": "auto"}, {}, {"PIPER_CHECK": "1", "PIPER_INTER": "auto"}], []),
], ids=["one rank invalid", "differs and invalid", "topology differs", "who calls MPI differs",
        "auto's links differ", "equivalent"])
def test_an_environment_invalid_or_differing_on_some_ranks_fails_on_every_rank(env, words):
    """A PIPER_* variable read at init that one rank got wrong (or that the ranks must set
    alike and do not) raises one PiperUsageError on every rank at init, naming the ranks,
    instead of an error on one rank and a timeout or a mismatch on the others (PIPER_MPI_CALLS
    differing made the first call time out). Unset and the default value are alike."""
    run = run_mpi(3, "comm.cases:environment_per_rank", {"env": env},
                  env={"PIPER_TIMEOUT": "20"}, timeout=120)
    for r in run.ranks:
        if not words:
            assert r["result"] == "ok", r["result"]
            continue
        assert r["result"].startswith("PiperUsageError: piper: init: rank "), r["result"]
        assert all(w in r["result"] for w in words), (words, r["result"])
    if words and "invalid on ranks [1]" in words[0]:
        assert "expected auto, nccl or mpi" in run.ranks[1]["result"]
    assert run.elapsed < 60, "a rank waited for the init timeout"


@pytest.mark.parametrize(("nprocs", "local_size", "algo", "check"),
                         [(3, None, "flat", "1"), (4, 2, "pairwise", "1"), (4, 2, "auto", "1"),
                          (4, 2, "halo", "1"), (3, None, "flat", "2")])
def test_equal_split_checks_raise_the_same_error_on_every_rank(nprocs, local_size, algo, check):
    """In-band (PIPER_CHECK=1 under flat/pairwise: no header round, asserted rank-side) or by a
    header round (halo; PIPER_CHECK=2): every rank raises, with the same words."""
    run = run_mpi(nprocs, "comm.cases:in_band_checks", {"local_size": local_size, "algo": algo},
                  env={"PIPER_CHECK": check})
    def words(msg: str) -> str:  # "piper: all_to_all #7: <words>": each rank names its own call
        return msg.split(": ", 2)[2]

    for name, msg in run.ranks[0]["result"]["messages"].items():
        assert all(words(r["result"]["messages"][name]) == words(msg) for r in run.ranks), \
            (name, [r["result"]["messages"][name] for r in run.ranks])


@pytest.mark.parametrize(("local_size", "algo"), [(2, "halo"), (2, "flat"), (1, "pairwise")])
def test_skipped_collective_times_out_on_the_others(local_size, algo):
    timeout = 3.0
    run = run_mpi(4, "comm.cases:skip_collective", {"local_size": local_size,
                                                     "timeout": timeout},
                  env={"CASE_ALGO": algo}, timeout=120, expect_ok=False)
    # Ranks 0..2 raised PiperTimeoutError within timeout + 5 s (asserted rank-side too);
    # rank 3, which skipped, may be ended by the launcher once the others have left.
    for r in range(3):
        res = run.ranks[r]
        assert res is not None and res["status"] == "ok", run.report()
        assert res["result"]["took"] <= timeout + 5, run.report()


@pytest.mark.parametrize("mpi_args", [(), ("-disable-auto-cleanup",)],
                         ids=["launcher-cleanup", "no-launcher-cleanup"])
def test_killed_rank_ends_the_job_and_shm_is_clean(mpi_args):
    """Rank 1 is SIGKILLed mid-collective. Every other rank must end with an error within
    timeout + 5 s: either Piper raised (PiperPeerError / PiperTimeoutError, reported by the
    rank) or the launcher ended it because of the failure. No Piper segment may remain.
    (Piper's own detection is tested deterministically in tests/unit/test_host.py; MPICH's
    launcher often ends the survivors first, even with -disable-auto-cleanup.)"""
    before, mpich_before = _piper_segments(), _mpich_segments()
    timeout = 5.0
    run = run_mpi(8, "comm.cases:kill_midway", {"local_size": 4, "timeout": timeout},
                  mpi_args=mpi_args, timeout=120, expect_ok=False)
    assert run.ranks[1] is None, "rank 1 was to be killed"
    assert run.returncode != 0, run.report()
    assert run.elapsed < timeout + 5 + 10, run.report()  # + launch and teardown
    for i, res in enumerate(run.ranks):
        if i != 1 and res is not None:
            assert res["status"] == "ok", run.report()
            assert res["result"]["error"] in ("PiperPeerError", "PiperTimeoutError")
            assert res["result"]["took"] <= timeout + 5, run.report()
    leaked = sorted(set(_piper_segments()) - set(before))
    assert not leaked, f"Piper segments left in /dev/shm: {leaked}"
    # MPICH's own segments of the job stay after a rank's death; tests/launch.py removes them
    leaked = sorted(set(_mpich_segments()) - set(mpich_before))
    assert not leaked, f"MPICH segments left in /dev/shm: {leaked}\n{run.report()}"


@pytest.mark.own_job  # /dev/shm before and after this very job
def test_no_segment_outlives_a_job():
    before = _piper_segments()
    run_mpi(4, "comm.cases:exactness", {"local_size": 4, "kinds": ["numpy"], "full": False})
    assert sorted(set(_piper_segments()) - set(before)) == []


def test_unchecked_count_mismatch_is_a_truncation_error_not_corruption():
    run = run_mpi(3, "comm.cases:truncated_message", {"local_size": 1},
                  env={"PIPER_CHECK": "0"}, timeout=120, expect_ok=False)
    assert run.ranks[0] is not None and run.ranks[0]["result"]["raised"] is True, run.report()


@pytest.mark.parametrize(("nprocs", "local_size"), [(1, None), (3, None), (4, 2), (5, 3)])
def test_device_plane_plumbing_on_emulated_device_memory(nprocs, local_size):
    """The device plane's plumbing without a device (tests/comm/cases.py:emulated_device):
    every algorithm equals the host result, and a rank passing host memory while the others
    pass CUDA memory gets the same error on every rank."""
    run = run_mpi(nprocs, "comm.cases:emulated_device", {"local_size": local_size})
    res = [r["result"] for r in run.ranks]
    assert all(r["checked"] == 8 for r in res), run.report()
    assert len({r["error"] for r in res}) == 1, res
