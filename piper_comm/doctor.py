"""`python -m piper_comm.doctor`: what Piper sees on this job and whether it is sane.

    python -m piper_comm.doctor                          # one process
    mpirun -n 8 python -m piper_comm.doctor [--json]     # or torchrun --nproc-per-node 4 ...
    bench/cluster/cluster.sh run -- python -m piper_comm.doctor

Three steps, each its own function:

  collect(comm, group, args) -> facts   (collective) every rank's host, machine (boot id),
        network namespace, CPUs, /dev/shm and left-over Piper segments, NICs (sysfs speed,
        tc tbf rate); the topology and how it was found; MPI library and thread level; the
        transport, the algorithm `auto` picks per size; the build; ping-pong latency and
        bandwidth between two ranks of one node and two ranks of different nodes; the
        reference values of a platform file (`--platform`, a shipped name or a calibrated YAML).
  diagnose(facts) -> [Diagnosis]        pure: every check is a function of the facts dict
        alone (CHECKS), so each can be tested on a made-up dict.
  render(facts, diagnoses) -> str       the report rank 0 prints (`--json`: both as JSON).

Exit code 0, or 1 with `--strict` when a diagnosis is a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHM_DIR = Path("/dev/shm")
SEGMENT_GLOB = "piper-*"           # node segments: /dev/shm/piper-<job token>-<pid>-n<node>...
LAT_BYTES, LAT_ITERS = 8, 200      # latency: half the median round trip of 8 B
BW_BYTES, BW_ITERS = 1 << 20, 4    # bandwidth: 1 MiB each way, the median of 4 round trips
ALGO_SIZES = (1 << 10, 64 << 10, 1 << 20, 16 << 20)  # bytes per rank shown for `auto`
NIC_SLACK = 1.1                    # a measured "network" this much above the fastest NIC: bypass
THREAD_NAMES = ("MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED",
                "MPI_THREAD_MULTIPLE")


# -- the group the doctor itself talks over (not Piper's executor: it measures the links)
class _Group:
    """allgather of Python objects and a bounded ping-pong, over MPI, torch.distributed or
    nothing (one process)."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "mpi":
            from mpi4py import MPI

            self.MPI, self.comm = MPI, MPI.COMM_WORLD
            self.rank, self.size = self.comm.rank, self.comm.size
        elif backend == "torch":
            import torch.distributed as dist

            self.dist = dist
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.size = 0, 1

    def quiet_barrier(self, deadline: float) -> None:
        """A barrier that sleeps while it waits, so ranks idle during a measurement leave the
        cores to the two that measure (MPI's own barrier busy-polls)."""
        if self.backend == "single":
            return
        req = self.comm.Ibarrier() if self.backend == "mpi" else \
            self.dist.barrier(async_op=True)
        self._wait(req, deadline, "a barrier", sleep=0.001)

    def allgather(self, obj: Any, deadline: float) -> list[Any]:
        """Every rank's obj, after a bounded barrier (MPI's and torch's object all-gathers
        have no deadline of their own: once every rank has passed the barrier, they finish)."""
        self.quiet_barrier(deadline)
        if self.backend == "mpi":
            return self.comm.allgather(obj)
        if self.backend == "torch":
            out: list[Any] = [None] * self.size
            self.dist.all_gather_object(out, obj)
            return out
        return [obj]

    def _post(self, buf: np.ndarray, peer: int, send: bool):
        if self.backend == "mpi":
            f = self.comm.Isend if send else self.comm.Irecv
            return f([buf, self.MPI.BYTE], peer, tag=7301)
        import torch

        t = torch.from_numpy(buf)
        return (self.dist.isend if send else self.dist.irecv)(t, peer)

    def _wait(self, req, deadline: float, what: str, sleep: float = 0.0) -> None:
        """Completes req by the deadline: MPI polled (sleeping `sleep` s between tests), gloo
        waited on with the time left (its work reports completion only from wait())."""
        if self.backend == "torch":
            from datetime import timedelta

            try:
                req.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
                return
            except RuntimeError as e:
                raise TimeoutError(f"piper doctor: rank {self.rank}: {what} did not complete "
                                   f"before the deadline (--timeout): {e}") from e
        while not req.Test():
            if time.monotonic() > deadline:
                raise TimeoutError(f"piper doctor: rank {self.rank}: {what} did not complete "
                                   f"before the deadline (--timeout)")
            if sleep:
                time.sleep(sleep)

    def pingpong(self, peer: int, nbytes: int, iters: int, first: bool,
                 deadline: float) -> list[float]:
        """Round-trip seconds of `iters` exchanges of nbytes with peer (after one warm-up);
        `first` sends first."""
        buf = np.zeros(max(1, nbytes), dtype=np.uint8)
        times = []
        for i in range(iters + 1):
            t0 = time.perf_counter()
            for send in ((True, False) if first else (False, True)):
                self._wait(self._post(buf, peer, send), deadline, f"ping-pong with rank {peer}")
            if i:
                times.append(time.perf_counter() - t0)
        return times


# -- facts of this rank (no communication)
def nic_rates() -> dict[str, float]:
    """Bits/s of each non-loopback interface of this network namespace: the lower of its
    sysfs speed (when the driver reports one) and a tc tbf rate on it (an emulated cap)."""
    rates: dict[str, float] = {}
    for dev in sorted(Path("/sys/class/net").glob("*")):
        if dev.name == "lo":
            continue
        try:
            mbit = int((dev / "speed").read_text().strip())
            if mbit > 0:
                rates[dev.name] = mbit * 1e6
        except (OSError, ValueError):
            pass
        tbf = _tbf_rate(dev.name)
        if tbf:
            rates[dev.name] = min(rates.get(dev.name, tbf), tbf)
    return rates


def _tbf_rate(dev: str) -> float | None:
    tc = shutil.which("tc")
    if tc is None:
        return None
    try:
        out = subprocess.run([tc, "-j", "qdisc", "show", "dev", dev], capture_output=True,
                             text=True, timeout=5).stdout
        for q in json.loads(out or "[]"):
            if q.get("kind") == "tbf" and "rate" in q.get("options", {}):
                return 8.0 * float(q["options"]["rate"])  # tc -j gives bytes per second
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return None


def segment_pid(name: str) -> int | None:
    """Creator pid of a Piper node segment name (piper-<token>-<pid>-n<node>...), or None."""
    parts = name.split("-")
    try:
        return int(parts[2]) if parts[0] == "piper" else None
    except (IndexError, ValueError):
        return None


def stale_segments(shm: Path = SHM_DIR) -> list[str]:
    """Piper segments in shm whose creating process is gone (a killed job's): listed, never
    removed here."""
    out = []
    for path in sorted(shm.glob(SEGMENT_GLOB)):
        pid = segment_pid(path.name)
        if pid is not None and not Path(f"/proc/{pid}").exists():
            out.append(path.name)
    return out


def local_facts(shm: Path = SHM_DIR) -> dict[str, Any]:
    """What one rank sees of its machine."""
    def read(p: str) -> str | None:
        try:
            return Path(p).read_text().strip()
        except OSError:
            return None
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = None
    try:
        st = os.statvfs(shm)
        shm_free, shm_total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        shm_free = shm_total = None
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "machine": read("/proc/sys/kernel/random/boot_id") or socket.gethostname(),
            "netns": netns, "cpus": os.cpu_count() or 1,
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
            "shm_free": shm_free, "shm_total": shm_total, "stale_segments": stale_segments(shm),
            "nics": nic_rates()}


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import mpi4py

        out["mpi4py"] = mpi4py.__version__
    except ImportError:
        out["mpi4py"] = None
    if "torch" in sys.modules or _importable("torch"):
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
    else:
        out["torch"] = out["torch_cuda"] = None
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _reference(platform: str) -> dict[str, Any]:
    try:
        from piper_moe.resource_model.spec import load_platform

        p = load_platform(platform)
    except Exception as e:  # a missing file, a bad YAML: say so in the report
        return {"source": platform, "error": f"{type(e).__name__}: {e}"}
    return {"source": f"platform {p.name} ({p.source})",
            "intra": {"latency": p.intra.latency, "bandwidth": p.intra.bandwidth},
            "inter": {"latency": p.inter.latency, "bandwidth": p.inter.bandwidth}}


# -- collective: every rank's facts, the measurements
def _measure(group: _Group, a: int, b: int, deadline: float) -> dict[str, Any] | None:
    """Latency and bandwidth between ranks a and b; every rank calls it (the others wait at
    the gather that follows); returns the figures on a and b."""
    me = group.rank
    if me not in (a, b):
        return None
    first, peer = me == a, (b if me == a else a)
    lat = float(np.median(group.pingpong(peer, LAT_BYTES, LAT_ITERS, first, deadline))) / 2
    rtt = float(np.median(group.pingpong(peer, BW_BYTES, BW_ITERS, first, deadline)))
    return {"ranks": [a, b], "latency": lat, "bandwidth": BW_BYTES / (rtt / 2)}


def collect(comm, group: _Group, args: argparse.Namespace) -> dict[str, Any]:
    """Every rank's facts and the measurements, assembled identically on every rank."""
    from . import build_info, envs
    from .cost import choose

    deadline = time.monotonic() + args.timeout
    mine = local_facts()
    mine.update(node=comm.node, local_rank=comm.local_rank)
    ranks = group.allgather(mine, deadline)
    P = len(ranks)
    node_of = [r["node"] for r in ranks]
    facts: dict[str, Any] = {
        "ranks": P, "backend": group.backend, "transport": comm.transport,
        "ranks_info": ranks, "node_of": node_of, "num_nodes": comm.num_nodes,
        "local_size_env": os.environ.get("PIPER_LOCAL_SIZE") or None,
        "forced_algorithm": envs.algorithm(), "build": build_info(), "versions": _versions(),
        "max_bytes": args.max_bytes, "platform": _reference(args.platform)}
    if group.backend == "mpi":
        MPI = group.MPI
        level = MPI.Query_thread()
        facts["mpi_thread_level"] = THREAD_NAMES[level] if 0 <= level < 4 else str(level)
    sizes = {}
    for m in ALGO_SIZES:
        block = max(1, m // P)
        sizes[str(m)] = "flat" if P == 1 else choose(np.full((P, P), block, dtype=np.int64),
                                                     np.asarray(node_of), comm.links)
    facts["auto_algorithm"] = sizes
    facts["auto_links"] = comm.links.source
    links: dict[str, Any] = {}
    pairs = {}
    same = [r for r in range(P) if node_of[r] == node_of[0] and r != 0]
    other = [r for r in range(P) if node_of[r] != node_of[0]]
    if same:
        pairs["intra"] = (0, same[0])
    if other:
        pairs["inter"] = (0, other[0])
    for level, (a, b) in pairs.items():
        group.quiet_barrier(deadline)
        result = _measure(group, a, b, deadline)
        got = [x for x in group.allgather(result, deadline) if x]
        links[level] = got[0] if got else None
    facts["links"] = links
    return facts


# -- diagnoses: pure functions of the facts
@dataclass(frozen=True)
class Diagnosis:
    check: str
    severity: str     # "warn": something is wrong or misleading; "note": worth knowing
    message: str
    fix: str


def _machines(facts) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r, info in enumerate(facts["ranks_info"]):
        out.setdefault(info["machine"], []).append(r)
    return out


def check_oversubscribed(facts) -> Diagnosis | None:
    """More ranks on one machine (boot id: namespaces share it) than it has CPUs."""
    worst = None
    for ranks in _machines(facts).values():
        cpus = facts["ranks_info"][ranks[0]]["cpus"]
        if len(ranks) > cpus and (worst is None or len(ranks) / cpus > worst[0] / worst[1]):
            worst = (len(ranks), cpus)
    if worst is None:
        return None
    n, cpus = worst
    return Diagnosis("oversubscribed", "warn",
                     f"{n} ranks share a machine with {cpus} CPUs: busy-polling ranks wait for "
                     f"a core, so small-message times are inflated by scheduling, not the "
                     f"network",
                     f"run at most {cpus} ranks per machine (e.g. mpirun -ppn {cpus}), or read "
                     f"the timings as an oversubscribed host's")


def check_network_bypass(facts) -> Diagnosis | None:
    """An inter-node link faster than the fastest NIC of the ranks measured: shared memory
    (or loopback) carries what should cross a network."""
    inter = (facts.get("links") or {}).get("inter")
    if not inter:
        return None
    a, b = inter["ranks"]
    ra, rb = facts["ranks_info"][a], facts["ranks_info"][b]
    nic = max([*ra["nics"].values(), *rb["nics"].values()], default=None)
    bits = 8 * inter["bandwidth"]
    if nic is not None and bits > NIC_SLACK * nic:
        return Diagnosis("network_bypass", "warn",
                         f"ranks {a} and {b} are on different nodes but exchange "
                         f"{bits / 1e9:.2f} Gbit/s, more than their fastest NIC "
                         f"({nic / 1e9:.2f} Gbit/s): the bytes do not cross a network (shared "
                         f"memory between namespaces, or one host split by PIPER_LOCAL_SIZE)",
                         "make MPI use the network between nodes (MPICH: "
                         "MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp; Open MPI: --mca btl "
                         "self,tcp), or read inter-node figures as shared-memory figures")
    if ra["machine"] == rb["machine"] and ra["netns"] == rb["netns"]:
        return Diagnosis("network_bypass", "note",
                         f"the nodes of ranks {a} and {b} are one machine and one network "
                         f"namespace (emulated nodes): {bits / 1e9:.2f} Gbit/s between them is "
                         f"shared memory or loopback, not a network",
                         "for a link with a real network stack and a capped rate, run under "
                         "bench/cluster/cluster.sh")
    return None


def check_node_split(facts) -> Diagnosis | None:
    """PIPER_LOCAL_SIZE splits the ranks differently from their host names."""
    from .bootstrap import node_ids_from

    hosts = [r["host"] for r in facts["ranks_info"]]
    by_host = node_ids_from(hosts, None)
    if facts["node_of"] == by_host:
        return None
    env = facts.get("local_size_env")
    how = f"PIPER_LOCAL_SIZE={env}" if env else "the node split given to init"
    if len(set(hosts)) == 1:
        return Diagnosis("node_split", "note",
                         f"{how} splits one host into {facts['num_nodes']} emulated nodes: "
                         f"inter-node traffic is shared memory here",
                         "expected for tests; for a real network run on several hosts or under "
                         "bench/cluster/cluster.sh")
    return Diagnosis("node_split", "warn",
                     f"{how} gives nodes {facts['node_of']}, but the host names give "
                     f"{by_host} ({len(set(hosts))} hosts): HALO's node segment and proxies "
                     f"then follow a topology that is not the machine's",
                     "unset PIPER_LOCAL_SIZE (host names are then used) or set it to the ranks "
                     "per host")


def check_thread_level(facts) -> Diagnosis | None:
    """MPI initialised below MPI_THREAD_MULTIPLE: async_op=True is refused."""
    level = facts.get("mpi_thread_level")
    if facts.get("backend") != "mpi" or level in (None, "MPI_THREAD_MULTIPLE"):
        return None
    return Diagnosis("thread_level", "warn",
                     f"MPI runs at {level}: Piper refuses async_op=True (it calls MPI from a "
                     f"background thread beside yours)",
                     "let mpi4py initialise MPI at its default (unset MPI4PY_RC_THREAD_LEVEL, "
                     "no mpi4py.rc.thread_level below 'multiple')")


def check_auto_links(facts) -> Diagnosis | None:
    """algorithm="auto" choosing between HALO and flat on several nodes with the default links,
    guesses for one CPU host that know nothing of this network (PIPER_PLATFORM unset)."""
    if facts.get("num_nodes", 1) < 2 or facts.get("forced_algorithm") or \
            not (facts.get("auto_links") or "").startswith("defaults"):
        return None
    return Diagnosis("auto_links", "note",
                     "algorithm=\"auto\" picks HALO or flat per call with Piper's default links "
                     "(guesses for one CPU host), not this machine's (on 8 ranks as 2 x 4 on a "
                     "2-core host they chose HALO up to 64 KiB, 1.2-1.9x slower than flat: "
                     "docs/performance.md)",
                     f"mpirun -n {facts.get('ranks', 'N')} python -m piper_moe.cli.calibrate "
                     f"--out my-cluster.yaml, then PIPER_PLATFORM=my-cluster.yaml (or a shipped "
                     f"platform: PIPER_PLATFORM=dgx-h100)")


def check_shm(facts) -> Diagnosis | None:
    """/dev/shm smaller than the node segment of the largest call (local ranks x bytes per
    rank: HALO packs every block of the node into it)."""
    worst = None
    for r, info in enumerate(facts["ranks_info"]):
        if info["shm_free"] is None:
            continue
        local = facts["node_of"].count(facts["node_of"][r])
        need = local * facts["max_bytes"] if local > 1 else 0
        if need > info["shm_free"] and (worst is None or need - info["shm_free"] > worst[0]):
            worst = (need - info["shm_free"], info["host"], local, need, info["shm_free"])
    if worst is None:
        return None
    _, host, local, need, free = worst
    return Diagnosis("shm_small", "warn",
                     f"/dev/shm on {host} has {_human(free)} free, but the node segment of "
                     f"{local} ranks sending {_human(facts['max_bytes'])} each needs "
                     f"{_human(need)}: such calls fail with a system error",
                     "enlarge it (mount -o remount,size=<N>G /dev/shm; in docker --shm-size), "
                     "or send less per call")


def check_stale_segments(facts) -> Diagnosis | None:
    """Piper segments of a process that is gone (a killed job) still fill /dev/shm."""
    names = sorted({n for r in facts["ranks_info"] for n in r["stale_segments"]})
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Diagnosis("stale_segments", "warn",
                     f"{len(names)} Piper segment(s) of a dead process in /dev/shm: {shown}",
                     "rm /dev/shm/piper-* of dead jobs (the next pc.init() on that node also "
                     "removes this user's)")


def check_build_match(facts) -> Diagnosis | None:
    """mpi4py loads another MPI than the extension was linked against (MPI then goes through
    mpi4py), or torch's CUDA is another major version than the extension's."""
    build, vers = facts["build"], facts["versions"]
    problems, fixes = [], []
    loaded, linked = build.get("mpi"), build.get("mpi_linked")
    if facts.get("backend") == "mpi" and linked and loaded and loaded != linked:
        problems.append(f"mpi4py loads '{loaded}' but piper_comm._C was linked against "
                        f"'{linked}', so MPI is called through mpi4py (slower)")
        fixes.append("rebuild Piper in this environment (pip install --no-build-isolation "
                     "--no-deps -e .)")
    if facts.get("backend") == "mpi" and linked is False:
        problems.append("piper_comm._C was built without MPI (an isolated build, such as pip "
                        "install without --no-build-isolation, or PIPER_MPI=OFF), so MPI is "
                        "called through mpi4py (slower)")
        fixes.append("rebuild Piper in this environment (pip install --no-build-isolation "
                     "--no-deps -e .)")
    tc, ext = vers.get("torch_cuda"), build.get("cuda_runtime_version")
    if build.get("cuda") and tc and ext and int(str(tc).split(".")[0]) != int(ext) // 1000:
        problems.append(f"torch uses CUDA {tc} but piper_comm._C was built with CUDA "
                        f"{_cuda_version(build)}")
        fixes.append("rebuild Piper with the CUDA toolkit of this torch")
    if not problems:
        return None
    return Diagnosis("build_mismatch", "warn", "; ".join(problems), "; ".join(fixes))


CHECKS = (check_oversubscribed, check_network_bypass, check_node_split, check_thread_level,
          check_shm, check_stale_segments, check_build_match, check_auto_links)


def diagnose(facts: dict[str, Any]) -> list[Diagnosis]:
    """Every check's finding, warnings first."""
    found = [d for d in (c(facts) for c in CHECKS) if d is not None]
    return sorted(found, key=lambda d: d.severity != "warn")


# -- report
def _human(b: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{int(b)} B"


def _cuda_version(build: dict[str, Any]) -> str:
    """CUDA's integer version (13000) as 13.0."""
    v = build.get("cuda_runtime_version")
    return f"{int(v) // 1000}.{int(v) % 1000 // 10}" if v else "?"


def render(facts: dict[str, Any], found: list[Diagnosis]) -> str:
    ranks, node_of = facts["ranks_info"], facts["node_of"]
    hosts = [r["host"] for r in ranks]
    env = facts.get("local_size_env")
    how = (f"PIPER_LOCAL_SIZE={env}" if env else
           "host names" + ("" if len(set(hosts)) > 1 else " (one host: one node)"))
    sizes = Counter(node_of)
    split = (f"{facts['num_nodes']} node(s) x {sizes[node_of[0]]} rank(s)"
             if len(set(sizes.values())) == 1
             else f"{facts['num_nodes']} nodes of {[sizes[n] for n in sorted(sizes)]} ranks")
    b, v = facts["build"], facts["versions"]
    out = [f"piper doctor: {facts['ranks']} ranks, backend {facts['backend']}, transport "
           f"{facts['transport']}",
           f"topology: {split}, found from {how}"]
    for n in sorted(set(node_of)):
        members = [r for r in range(len(node_of)) if node_of[r] == n]
        out.append(f"  node {n}: ranks {','.join(map(str, members))} on "
                   f"{', '.join(sorted({hosts[r] for r in members}))}")
    machines = _machines(facts)
    out.append(f"machines: {len(machines)} (by boot id); "
               + "; ".join(f"{len(rs)} ranks on {ranks[rs[0]]['cpus']} CPUs"
                           for rs in machines.values()))
    if facts["backend"] == "mpi":
        same = "the same" if b.get("mpi") == b.get("mpi_linked") else f"linked: {b['mpi_linked']}"
        out.append(f"MPI: {b.get('mpi')} ({same}); thread level {facts.get('mpi_thread_level')}")
    cuda = ("no" if not b.get("cuda") else
            f"yes (archs {b.get('cuda_archs')}, runtime {_cuda_version(b)}, "
            f"devices {b.get('cuda_devices')}"
            + (f": {b['cuda_error']}" if b.get("cuda_error") else "") + ")")
    out.append(f"build: piper {b.get('version')}, CUDA {cuda}, NCCL {b.get('nccl_version')}; "
               f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), mpi4py {v.get('mpi4py')}")
    forced = facts.get("forced_algorithm")
    out.append("algorithms: " + (f"PIPER_ALGO={forced} forces every call; " if forced else "")
               + "auto picks " + ", ".join(f"{_human(int(m))}/rank: {a}"
                                           for m, a in facts["auto_algorithm"].items())
               + f" (links: {facts.get('auto_links', '?')}; PIPER_PLATFORM sets them)")
    ref = facts["platform"]
    out.append(f"links: measured by ping-pong ({LAT_BYTES} B latency, {_human(BW_BYTES)} "
               f"bandwidth) vs {ref['source']}" + (f" [{ref['error']}]" if "error" in ref else ""))
    out.append(f"  {'level':<6} {'ranks':>7} {'latency':>11} {'bandwidth':>13}   "
               f"{'ref latency':>11} {'ref bandwidth':>13}")
    for level in ("intra", "inter"):
        got, want = facts["links"].get(level), ref.get(level)
        meas = (f"{str(got['ranks'][0]) + '-' + str(got['ranks'][1]):>7} "
                f"{got['latency'] * 1e6:>8.1f} us {got['bandwidth'] / 1e9:>8.3f} GB/s"
                if got else f"{'-':>7} {'(one rank here)':>25}")
        refs = (f"{want['latency'] * 1e6:>8.1f} us {want['bandwidth'] / 1e9:>8.3f} GB/s"
                if want else "")
        out.append(f"  {level:<6} {meas}   {refs}")
    out.append("  (a platform's inter bandwidth is one device's share of its node's NICs; the "
               "ping-pong measures one pair alone on the link)")
    nics = {f"{r['host']}:{k}": x for r in ranks for k, x in r["nics"].items()}
    out.append("NICs: " + (", ".join(f"{k} {x / 1e9:g} Gbit/s" for k, x in sorted(nics.items()))
                           or "no interface reports a speed or a tbf rate"))
    free = min((r["shm_free"] for r in ranks if r["shm_free"] is not None), default=None)
    out.append(f"/dev/shm: {_human(free) if free is not None else '?'} free (least over ranks)")
    out.append("diagnoses:" if found else "diagnoses: none, all checks passed")
    for d in found:
        out.append(f"  [{d.severity}] {d.check}: {d.message}")
        out.append(f"      fix: {d.fix}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m piper_comm.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="facts and diagnoses as JSON")
    p.add_argument("--platform", default="cpu-host",
                   help="reference values: a shipped platform name or a platform YAML "
                        "(e.g. one written by python -m piper_moe.cli.calibrate)")
    p.add_argument("--max-bytes", type=int, default=64 << 20,
                   help="bytes per rank of the largest call, for the /dev/shm check")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on the measurements (s)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a warning is found")
    a = p.parse_args(argv)
    import piper_comm as pc

    comm = pc.init()
    group = _Group(comm.transport.split(":")[-1])  # "mpi", "python:torch", "python:single"
    facts = collect(comm, group, a)
    found = diagnose(facts)
    if group.rank == 0:
        if a.json:
            print(json.dumps({"facts": facts, "diagnoses": [asdict(d) for d in found]},
                             indent=1, default=str))
        else:
            print(render(facts, found))
        sys.stdout.flush()
    comm.close()
    return 1 if a.strict and any(d.severity == "warn" for d in found) else 0


if __name__ == "__main__":
    sys.exit(main())
