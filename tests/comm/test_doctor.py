"""python -m piper_comm.doctor: every diagnosis on a made-up facts dict (the checks are pure
functions of it), then the conditions made to happen where that is cheap: a dead job's segment
in a shm folder, /dev/shm smaller than a call, MPI below MPI_THREAD_MULTIPLE, more ranks than
CPUs, PIPER_LOCAL_SIZE splitting one host, and (root) on the emulated cluster a node split that
disagrees with the host names and a shared-memory bypass of the link. The build mismatches
(another MPI under mpi4py, another CUDA under torch) need a second environment: faked only."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from piper_comm import doctor as D
from tests.launch import MPIRUN, ROOT, TORCHRUN

GIB = 2**30


def _rank(host, machine, node, **kw):
    info = {"host": host, "pid": 100, "machine": machine, "netns": 1, "cpus": 4,
            "cpus_allowed": 4, "shm_free": 8 * GIB, "shm_total": 8 * GIB, "stale_segments": [],
            "nics": {"eth0": 10e9}, "node": node, "local_rank": 0}
    info.update(kw)
    return info


def healthy():
    """2 machines x 2 ranks, a 10 Gbit/s NIC, 1 GB/s measured between nodes: nothing to say."""
    ranks = [_rank("a", "m1", 0), _rank("a", "m1", 0), _rank("b", "m2", 1, netns=2),
             _rank("b", "m2", 1, netns=2)]
    return {"ranks": 4, "backend": "mpi", "transport": "mpi", "ranks_info": ranks,
            "node_of": [0, 0, 1, 1], "num_nodes": 2, "local_size_env": None,
            "forced_algorithm": None, "max_bytes": 64 << 20,
            "build": {"version": "0.1.0", "cuda": False, "mpi": "MPICH 5", "mpi_linked": "MPICH 5",
                      "nccl_version": None, "cuda_runtime_version": None},
            "versions": {"torch": "2.13", "torch_cuda": None, "mpi4py": "4.1"},
            "mpi_thread_level": "MPI_THREAD_MULTIPLE", "auto_algorithm": {"1024": "halo"},
            "platform": {"source": "platform cpu-host", "intra": {"latency": 1e-6,
                                                                 "bandwidth": 5e9},
                         "inter": {"latency": 3e-5, "bandwidth": 1.56e8}},
            "links": {"intra": {"ranks": [0, 1], "latency": 1e-6, "bandwidth": 8e9},
                      "inter": {"ranks": [0, 2], "latency": 2e-5, "bandwidth": 1e9}}}


def only(found, check, severity="warn"):
    assert [(d.check, d.severity) for d in found] == [(check, severity)], found
    return found[0]


# -- pure checks on made-up facts
def test_healthy_facts_give_no_diagnosis_and_render():
    facts = healthy()
    assert D.diagnose(facts) == []
    text = D.render(facts, [])
    assert "2 node(s) x 2 rank(s), found from host names" in text
    assert "all checks passed" in text and "inter      0-2" in text


def test_auto_with_guessed_links_on_several_nodes():
    """A note (not a warning: --strict passes) when auto prices calls with the default links
    on several nodes; none with PIPER_PLATFORM's links, with PIPER_ALGO, or on one node."""
    facts = healthy()
    facts["auto_links"] = "defaults (one CPU host, guessed)"
    d = only(D.diagnose(facts), "auto_links", "note")
    assert "PIPER_PLATFORM=my-cluster.yaml" in d.fix and "-n 4 " in d.fix
    assert D.diagnose({**facts, "forced_algorithm": "halo"}) == []
    assert D.diagnose({**facts, "auto_links": "platform dgx-h100 (x.yaml)"}) == []
    facts.update(node_of=[0, 0, 0, 0], num_nodes=1)
    facts["ranks_info"] = [dict(r, host="a", machine="m1", node=0) for r in facts["ranks_info"]]
    assert D.diagnose(facts) == []


def test_more_ranks_than_cores():
    facts = healthy()
    for r in facts["ranks_info"]:
        r["machine"] = "m1"   # 4 ranks on one 4-CPU machine: fine
    assert D.diagnose(facts) == []
    for r in facts["ranks_info"]:
        r["cpus"] = 2
    d = only(D.diagnose(facts), "oversubscribed")
    assert "4 ranks share a machine with 2 CPUs" in d.message and "-ppn 2" in d.fix


def test_network_faster_than_any_nic():
    facts = healthy()
    facts["links"]["inter"]["bandwidth"] = 7e9   # 56 Gbit/s through a 10 Gbit/s NIC
    d = only(D.diagnose(facts), "network_bypass")
    assert "56.00 Gbit/s" in d.message and "10.00 Gbit/s" in d.message
    assert "FI_PROVIDER=tcp" in d.fix


def test_emulated_nodes_in_one_namespace_are_a_note():
    facts = healthy()
    for r in facts["ranks_info"]:
        r.update(machine="m1", nics={}, host="a", netns=1)
    facts["local_size_env"] = "2"
    found = D.diagnose(facts)
    assert [(d.check, d.severity) for d in found] == [("network_bypass", "note"),
                                                      ("node_split", "note")]
    assert "bench/cluster/cluster.sh" in found[0].fix


def test_node_split_disagrees_with_host_names():
    facts = healthy()
    facts["node_of"], facts["num_nodes"], facts["local_size_env"] = [0, 1, 2, 3], 4, "1"
    d = only(D.diagnose(facts), "node_split")
    assert "PIPER_LOCAL_SIZE=1 gives nodes [0, 1, 2, 3]" in d.message
    assert "host names give [0, 0, 1, 1]" in d.message


def test_thread_level_below_multiple():
    facts = healthy()
    facts["mpi_thread_level"] = "MPI_THREAD_SERIALIZED"
    d = only(D.diagnose(facts), "thread_level")
    assert "async_op=True" in d.message and "MPI4PY_RC_THREAD_LEVEL" in d.fix
    facts["backend"] = "torch"   # no MPI under torchrun: nothing to say
    assert D.diagnose(facts) == []


def test_shm_too_small_for_the_node_segment():
    facts = healthy()
    facts["ranks_info"][2]["shm_free"] = 64 << 20        # docker's default
    d = only(D.diagnose(facts), "shm_small")
    assert "on b has 64 MiB free" in d.message and "needs 128 MiB" in d.message
    assert "--shm-size" in d.fix
    facts["node_of"] = [0, 1, 2, 3]                       # one rank per node: no segment
    facts["ranks_info"][2]["host"] = "c"
    assert all(d.check != "shm_small" for d in D.diagnose(facts))


def test_stale_segments():
    facts = healthy()
    facts["ranks_info"][1]["stale_segments"] = ["piper-job.1-999-n0", "piper-job.1-999-n0-d"]
    d = only(D.diagnose(facts), "stale_segments")
    assert d.message.startswith("2 Piper segment(s)") and "rm /dev/shm/piper-*" in d.fix


def test_build_mismatches():
    facts = healthy()
    facts["build"]["mpi"] = "Open MPI v5.0.11"
    d = only(D.diagnose(facts), "build_mismatch")
    assert "through mpi4py" in d.message and "rebuild" in d.fix
    facts = healthy()
    facts["build"].update(cuda=True, cuda_runtime_version=13000)
    facts["versions"]["torch_cuda"] = "12.8"
    d = only(D.diagnose(facts), "build_mismatch")
    assert "torch uses CUDA 12.8 but piper_comm._C was built with CUDA 13.0" in d.message
    facts["versions"]["torch_cuda"] = "13.1"
    assert D.diagnose(facts) == []
    facts["build"]["mpi_linked"] = False  # an isolated build: no mpi4py at build time
    d = only(D.diagnose(facts), "build_mismatch")
    assert "built without MPI" in d.message and "--no-build-isolation" in d.fix


def test_mpi_route_says_why_mpi_goes_through_mpi4py():
    """The communicator's choice (piper_comm.communicator.mpi_route): C++ MPI only with the
    very library mpi4py loaded; otherwise a warning naming the cause and the fix, and none
    when PIPER_MPI_CALLS=mpi4py asked for it."""
    from piper_comm.communicator import mpi_route

    assert mpi_route("MPICH Version: 5.0.2\n", "MPICH Version: 5.0.2", "cpp") == (True, "")
    assert mpi_route("MPICH Version: 5.0.2", "MPICH Version: 5.0.2", "mpi4py") == (False, "")
    cpp, why = mpi_route(False, "MPICH Version: 5.0.2", "cpp")
    assert not cpp and "built without MPI" in why and "--no-build-isolation" in why
    cpp, why = mpi_route("MPICH Version: 5.0.2", "Open MPI v5.0.11\nmore", "cpp")
    assert not cpp and "(Open MPI v5.0.11)" in why and "(MPICH Version: 5.0.2)" in why


def test_each_check_reads_only_the_facts():
    facts = healthy()
    frozen = copy.deepcopy(facts)
    for check in D.CHECKS:
        check(facts)
    assert facts == frozen


# -- conditions made to happen
def test_dead_jobs_segment_is_found(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60)
    dead = int(proc.stdout)   # exited and reaped: no such process now
    (tmp_path / f"piper-job.ab12-{dead}-n0").write_bytes(b"x")
    (tmp_path / f"piper-job.ab12-{os.getpid()}-n1").write_bytes(b"x")   # alive: kept
    (tmp_path / "other-file").write_bytes(b"x")
    assert D.stale_segments(tmp_path) == [f"piper-job.ab12-{dead}-n0"]
    facts = healthy()
    facts["ranks_info"][0] = {**facts["ranks_info"][0], **D.local_facts(tmp_path),
                              "node": 0, "local_rank": 0, "machine": "m1", "cpus": 4, "host": "a",
                              "netns": 1, "nics": {}}
    d = only(D.diagnose(facts), "stale_segments")
    assert f"-{dead}-n0" in d.message
    assert (tmp_path / f"piper-job.ab12-{dead}-n0").exists()   # listed, never removed


def _doctor(*args, launcher=(), env=None, timeout=240):
    cmd = [*launcher, sys.executable, "-m", "piper_comm.doctor", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc


def _json(proc):
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    start = proc.stdout.index("{")
    return json.loads(proc.stdout[start:])


def test_single_process_json_and_shm_too_small():
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    out = _json(_doctor("--json", "--max-bytes", str(free + 1)))
    assert out["facts"]["backend"] == "single" and out["facts"]["ranks"] == 1
    # One rank: no node segment, so no shm diagnosis even for a huge call.
    assert all(d["check"] != "shm_small" for d in out["diagnoses"])


MPI = pytest.mark.skipif(MPIRUN is None, reason="no mpirun beside this python (make venv)")


@MPI
@pytest.mark.mpi
def test_under_mpirun_thread_level_shm_and_split():
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    proc = _doctor("--json", "--max-bytes", str(free), "--strict",
                   launcher=(MPIRUN, "-n", "2"),
                   env={"MPI4PY_RC_THREAD_LEVEL": "serialized", "PIPER_LOCAL_SIZE": "1"})
    out = _json(proc)
    assert proc.returncode == 1   # --strict: warnings found
    checks = {d["check"]: d for d in out["diagnoses"]}
    assert out["facts"]["mpi_thread_level"] == "MPI_THREAD_SERIALIZED"
    assert checks["thread_level"]["severity"] == "warn"
    # PIPER_LOCAL_SIZE=1 on one host: 2 emulated nodes (a note), no segment then
    assert checks["node_split"]["severity"] == "note"
    assert "shm_small" not in checks
    lk = out["facts"]["links"]
    assert lk["inter"]["ranks"] == [0, 1] and lk["inter"]["bandwidth"] > 0
    proc = _doctor("--json", "--max-bytes", str(free), launcher=(MPIRUN, "-n", "2"))
    checks = {d["check"]: d for d in _json(proc)["diagnoses"]}
    assert "thread_level" not in checks and checks["shm_small"]["severity"] == "warn"
    assert _json(proc)["facts"]["links"]["intra"]["latency"] > 0


@MPI
@pytest.mark.mpi
@pytest.mark.skipif((os.cpu_count() or 1) > 7, reason="needs more ranks than this host's CPUs")
def test_more_ranks_than_cpus_for_real():
    n = (os.cpu_count() or 1) + 1
    proc = _doctor(launcher=(MPIRUN, "-n", str(n)), env={"PIPER_LOCAL_SIZE": str(n)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{n} ranks share a machine with {os.cpu_count()} CPUs" in proc.stdout


@pytest.mark.skipif(TORCHRUN is None, reason="no torchrun beside this python")
@pytest.mark.mpi
def test_under_torchrun():
    proc = _doctor("--json", launcher=(TORCHRUN, "--nproc-per-node", "2", "--master-port",
                                       str(29400 + os.getpid() % 500), "--no-python"))
    facts = _json(proc)["facts"]
    assert facts["backend"] == "torch" and facts["transport"] == "python:torch"
    assert "mpi_thread_level" not in facts and facts["links"]["intra"]["bandwidth"] > 0


CLUSTER = ROOT / "bench" / "cluster" / "cluster.sh"


@MPI
@pytest.mark.mpi
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
                    reason="the emulated cluster needs root and ip/tc")
def test_on_the_emulated_cluster_split_and_bypass(tmp_path):
    prefix, net = f"d{os.getpid() % 10**5}", f"10.78.{os.getpid() % 200 + 20}"
    env = {**os.environ, "PIPER_LOCAL_SIZE": "1", "PIPER_CLUSTER_NETMOD": "ucx"}
    try:
        # ucx: MPICH's shared memory reaches across the namespaces (the link check would fail,
        # so --no-check: the doctor must see the bypass on its own).
        proc = subprocess.run(["bash", str(CLUSTER), "run", "-p", prefix, "-s", net,
                               "--no-check", "--", sys.executable, "-m", "piper_comm.doctor",
                               "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", "-p", prefix], timeout=60)
        Path(f"/run/piper-cluster/{prefix}.lock").unlink(missing_ok=True)
    out = _json(proc)
    checks = {d["check"]: d for d in out["diagnoses"]}
    assert checks["node_split"]["severity"] == "warn", checks
    assert "host names give [0, 0, 1, 1]" in checks["node_split"]["message"]
    assert checks["network_bypass"]["severity"] == "warn", checks
    nics = out["facts"]["ranks_info"][0]["nics"]
    assert nics == {f"{prefix}nic": 200e6}   # the tbf cap, read back
