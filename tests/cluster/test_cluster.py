"""bench/cluster: the link check's arithmetic, the refusals (no root, no ip/tc, names or a
subnet in use), teardown idempotence, a second run after a killed one, and (root, iproute2 and
MPICH: about 3 s) a whole run whose link check passes, then one with a shared-memory bypass
(MPICH's ucx netmod) that the check must catch."""

import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "cluster" / "cluster.sh"
_spec = importlib.util.spec_from_file_location("linkcheck", ROOT / "bench/cluster/linkcheck.py")
lc = importlib.util.module_from_spec(_spec)
sys.modules["linkcheck"] = lc  # dataclasses look their module up there
_spec.loader.exec_module(lc)

MIB = 1 << 20
IS_ROOT = os.geteuid() == 0
HAVE_TOOLS = all(shutil.which(t) for t in ("ip", "tc", "unshare", "flock", "timeout"))
needs_root_tools = pytest.mark.skipif(not (IS_ROOT and HAVE_TOOLS),
                                      reason="needs root and ip/tc/unshare/flock/timeout")


# -- arithmetic
def test_inter_node_bytes():
    assert lc.inter_node_bytes(2, 2, MIB) == MIB          # 2 ranks x 2 peers off-node x 256 KiB
    assert lc.inter_node_bytes(2, 4, MIB) == 2 * MIB      # 4 ranks x 4 peers x 128 KiB
    assert lc.inter_node_bytes(4, 2, 8 * MIB) == 2 * 6 * MIB
    assert lc.inter_node_bytes(1, 4, MIB) == 0
    with pytest.raises(ValueError, match="ppn"):
        lc.inter_node_bytes(2, 0, MIB)


def test_parse_rate_and_line_time():
    assert lc.parse_rate("200mbit") == 200e6
    assert lc.parse_rate("1gbit") == 1e9
    assert lc.parse_rate("125mbps") == 1e9      # tc: bps = bytes per second
    with pytest.raises(ValueError, match="200mb"):
        lc.parse_rate("200mb")
    assert lc.line_seconds(MIB, 200e6) == pytest.approx(0.041943, rel=1e-4)


def test_verdict_healthy_run():
    # Measured on this machine (2 x 2 ranks, 200mbit, OFI tcp): 45.07 ms, 5580881 B on the veth.
    v = lc.verdict(nodes=2, ppn=2, bytes_per_rank=MIB, rounds=5, rate_bps=200e6,
                   seconds=0.04507, tx_bytes=[5580881, 5581002])
    assert v.ok and v.reasons == ()
    assert v.expected_node_bytes == 5 * MIB
    assert v.counter_ratio == pytest.approx(1.0645, rel=1e-3)
    assert v.time_ratio == pytest.approx(1.0746, rel=1e-3)
    assert "OK" in lc.describe(v)


def test_verdict_bypass_by_counters_and_time():
    # Measured with MPICH's ucx netmod (shared memory across the namespaces): 0.59 ms, 11641 B.
    v = lc.verdict(nodes=2, ppn=2, bytes_per_rank=MIB, rounds=5, rate_bps=200e6,
                   seconds=0.00059, tx_bytes=[11641, 5600000])
    assert not v.ok and len(v.reasons) == 2
    assert "node 0 transmitted 11641 B" in v.reasons[0]
    assert "not in the path" in v.reasons[1]


def test_verdict_each_condition_alone():
    # Counters fine but too fast (the cap is missing), and slow but the veth silent.
    fast = lc.verdict(nodes=2, ppn=2, bytes_per_rank=MIB, rounds=1, rate_bps=200e6,
                      seconds=0.002, tx_bytes=[MIB + 4000] * 2)
    assert not fast.ok and [r for r in fast.reasons if "cap is not" in r] == list(fast.reasons)
    quiet = lc.verdict(nodes=2, ppn=2, bytes_per_rank=MIB, rounds=1, rate_bps=200e6,
                       seconds=0.05, tx_bytes=[MIB, int(0.5 * MIB)])
    assert not quiet.ok and "node 1" in quiet.reasons[0] and len(quiet.reasons) == 1
    one = lc.verdict(nodes=1, ppn=2, bytes_per_rank=MIB, rounds=1, rate_bps=200e6,
                     seconds=0.001, tx_bytes=[0])
    assert not one.ok and "one node" in one.reasons[0]


def test_linkcheck_cli_exit_codes(tmp_path):
    base = [str(ROOT / "bench/cluster/linkcheck.py"), "--nodes", "2", "--ppn", "2", "--bytes",
            str(MIB), "--rounds", "5", "--rate", "200mbit"]
    ok = subprocess.run(["python3", *base, "--seconds", "0.045", "--tx", "5580881,5581002",
                         "--json", str(tmp_path / "v.json")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    assert '"ok": true' in (tmp_path / "v.json").read_text()
    bad = subprocess.run(["python3", *base, "--seconds", "0.0006", "--tx", "11641,11000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "BYPASS" in bad.stderr


# -- refusals
def _script(*args, env=None, user=None, timeout=60):
    cmd = ["/bin/bash", str(SCRIPT), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(not IS_ROOT or not shutil.which("setpriv"),
                    reason="runs the script as uid 65534 through setpriv, which needs root")
def test_refuses_without_root():
    r = _script("up", user=65534)
    assert r.returncode == 2 and "refusing: needs root" in r.stderr, r.stderr


def test_refuses_without_ip_or_tc(tmp_path):
    if not IS_ROOT:
        pytest.skip("the root check comes first; as non-root the tool check is not reached")
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _script("up", env={"PATH": str(empty)})
    assert r.returncode == 2 and "'ip' is not on PATH" in r.stderr, r.stderr
    if shutil.which("ip"):
        (empty / "ip").symlink_to(shutil.which("ip"))
        r = _script("up", env={"PATH": str(empty)})
        assert r.returncode == 2 and "'tc' is not on PATH" in r.stderr, r.stderr


# -- the cluster itself: a prefix and subnet of this test's own
@pytest.fixture
def prefix():
    p = "t" + uuid.uuid4().hex[:5]
    yield p
    for q in (p, p[:5] + "z"):
        _script("down", "-p", q)
        Path(f"/run/piper-cluster/{q}.lock").unlink(missing_ok=True)


def _leftovers(p):
    """Namespaces, interfaces and /etc/netns entries whose names start with p."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    found = [line for line in (ns + links).splitlines() if line.startswith(p)]
    return found + [str(x) for x in Path("/etc/netns").glob(p + "*")]


NET = f"10.79.{os.getpid() % 200 + 20}"


@needs_root_tools
def test_down_is_idempotent_and_up_down_leaves_nothing(prefix):
    assert _script("down", "-p", prefix).returncode == 0
    assert _script("down", "-p", prefix).returncode == 0
    up = _script("up", "-p", prefix, "-s", NET, "-n", "3")
    assert up.returncode == 0, up.stderr
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(f"{prefix}n{i}" in names for i in range(3))
    qdisc = subprocess.run(["tc", "-n", f"{prefix}n2", "qdisc", "show", "dev", f"{prefix}nic"],
                           capture_output=True, text=True).stdout
    assert "tbf" in qdisc and "200Mbit" in qdisc, qdisc
    assert _script("down", "-p", prefix).returncode == 0
    assert _script("down", "-p", prefix).returncode == 0
    assert _leftovers(prefix) == []


@needs_root_tools
def test_refuses_names_and_subnet_it_did_not_create(prefix):
    foreign = f"{prefix}n1"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        r = _script("up", "-p", prefix, "-s", NET)
        assert r.returncode == 2 and f"namespace {foreign} exists" in r.stderr, r.stderr
        assert _script("down", "-p", prefix).returncode == 0
        assert Path(f"/run/netns/{foreign}").exists()   # not ours: left alone
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)
    assert _script("up", "-p", prefix, "-s", NET).returncode == 0
    other = prefix[:5] + "z"
    try:
        r = _script("up", "-p", other, "-s", NET)
        assert r.returncode == 2 and f"{NET}.0/24 is already routed" in r.stderr, r.stderr
    finally:
        _script("down", "-p", other)
    assert _leftovers(other) == []


@needs_root_tools
def test_refuses_a_subnet_inside_a_wider_route(prefix):
    wide = f"10.{200 + os.getpid() % 50}.0.0/16"       # a test-owned blackhole route
    net = wide.replace(".0.0/16", ".7")
    subprocess.run(["ip", "route", "add", "blackhole", wide], check=True)
    try:
        r = _script("up", "-p", prefix, "-s", net)
        assert r.returncode == 2 and "already routed" in r.stderr and wide in r.stderr, r.stderr
    finally:
        subprocess.run(["ip", "route", "del", "blackhole", wide], check=True)
    assert _leftovers(prefix) == []


@needs_root_tools
def test_failed_up_removes_what_it_made(prefix):
    r = _script("up", "-p", prefix, "-s", NET, "-r", "0bit")   # tc rejects a rate of 0
    assert r.returncode != 0 and "up failed" in r.stderr, r.stderr
    assert _leftovers(prefix) == [] and not Path(f"/run/piper-cluster/{prefix}.state").exists()


@needs_root_tools
def test_second_run_after_a_killed_one(prefix):
    # A run killed with SIGKILL leaves its cluster up (no trap runs): `up` alone does the same.
    assert _script("up", "-p", prefix, "-s", NET).returncode == 0
    r = _script("run", "-p", prefix, "-s", NET, "--no-check", "--", "true", timeout=120)
    assert r.returncode == 0, r.stderr
    assert _leftovers(prefix) == []


MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"


@needs_root_tools
@pytest.mark.mpi  # the script runs mpiexec in the namespaces
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no .venv/bin/mpiexec (make venv)")
def test_run_checks_the_link_and_catches_a_bypass(prefix, tmp_path):
    counters = tmp_path / "c.json"
    r = _script("run", "-p", prefix, "-s", NET, "-c", str(counters), "--", "hostname",
                timeout=300)
    assert r.returncode == 0, r.stderr
    assert "OK, the capped link is in the path" in r.stdout + r.stderr
    assert sorted(r.stdout.split()) == [f"{prefix}n0"] * 2 + [f"{prefix}n1"] * 2
    assert '"tx_bytes"' in counters.read_text()
    bad = _script("run", "-p", prefix, "-s", NET, "--", "true", timeout=300,
                  env={"PIPER_CLUSTER_NETMOD": "ucx"})
    assert bad.returncode == 1 and "BYPASS" in bad.stderr, bad.stderr
    assert _leftovers(prefix) == []


RESULTS = ROOT / "bench" / "results" / "cluster"


@pytest.mark.skipif(not (RESULTS / "a2a_2x2_200mbit.json").exists(),
                    reason="no recorded runs in bench/results/cluster")
def test_report_and_predict_run_on_the_recorded_results(tmp_path):
    for f in RESULTS.glob("*.json"):
        shutil.copy(f, tmp_path)
    shutil.copy(RESULTS / "platform_2x2_200mbit.yaml", tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "bench/cluster/report.py"), "--dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a2a = (tmp_path / "a2a_summary.txt").read_text()
    assert "# 2x4 200mbit" in a2a and (tmp_path / "a2a_summary.png").stat().st_size > 0
    assert "exposed link time" in (tmp_path / "moe_summary.txt").read_text()
    assert "dedup_on" in (tmp_path / "train_summary.txt").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "bench/cluster/predict.py"), "--dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "emulated-2x2-200mbit" in (tmp_path / "predict_summary.txt").read_text()
