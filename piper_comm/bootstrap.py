"""pc.init(): finds the launcher, builds the transport, the topology and the node segments.

mpirun / mpiexec / srun (PMI)  -> mpi4py on COMM_WORLD (or a given mpi4py communicator)
torchrun (or an initialised torch.distributed) -> torch.distributed (gloo on CPU)
nothing                         -> a single process
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import envs, validate
from .communicator import Communicator
from .errors import PiperSystemError, PiperUsageError
from .segment import PrivateSegment, node_segment
from .transport import MpiTransport, SingleTransport, TorchTransport, Transport

log = logging.getLogger("piper")

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
            "HYDI_CONTROL_FD", "MPICH_INTERFACE_HOSTNAME")
_SHM_DIR = Path("/dev/shm")
_INIT_TAG = 32100


def _detect() -> str:
    if "torch" in os.sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return "torch"
    if any(k in os.environ for k in _MPI_ENV):
        return "mpi"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "mpi"  # srun with PMI: MPI bootstraps through Slurm
    if "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(
            os.environ):
        return "torch"
    return "single"


def _transport(backend: str, timeout: float, group: Any = None) -> Transport:
    if backend == "mpi":
        from mpi4py import MPI

        return MpiTransport(MPI.COMM_WORLD if group is None else group, timeout)
    if backend == "torch":
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=envs.timeout()))
        return TorchTransport(group)
    if group is not None:
        raise PiperUsageError("piper: init: group needs backend \"mpi\" or \"torch\"")
    return SingleTransport()


def node_ids_from(hosts: list[str], local_size: int | None) -> list[int]:
    """Node index of every rank: consecutive groups of local_size ranks when given (the last
    node may be smaller), else one node per distinct host name in order of first appearance."""
    if local_size is not None:
        return [r // local_size for r in range(len(hosts))]
    first: dict[str, int] = {}
    return [first.setdefault(h, len(first)) for h in hosts]


def _job_id() -> str:
    for key in ("SLURM_JOB_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_ID",
                "TORCHELASTIC_RUN_ID"):
        if os.environ.get(key):
            return re.sub(r"[^A-Za-z0-9]", "", os.environ[key])[:24] or "job"
    return "job"


def sweep_stale_segments() -> list[str]:
    """Unlinks this user's Piper segments whose creating process is gone (a job killed in
    the instant between creating and unlinking a segment). Live jobs' segments are kept."""
    removed = []
    uid = os.getuid()
    for path in _SHM_DIR.glob("piper-*"):
        parts = path.name.split("-")
        try:
            pid = int(parts[2])
            if path.stat().st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        except (ValueError, IndexError, OSError):
            continue
    return removed


def init(backend: str | None = None, *, group: Any = None, local_size: int | None = None,
         node_ids: list[int] | None = None, timeout: float | None = None) -> Communicator:
    """Creates a communicator: over the whole job by default, or over `group`.

    Arguments:
        backend: "mpi" | "torch" | "single"; default: detected from the launcher
            (PIPER_BACKEND overrides detection).
        group: the ranks to span, as the backend names them: an mpi4py Intracomm for "mpi"
            (default COMM_WORLD; Piper works on its own duplicate, so the caller may free
            it afterwards), a torch ProcessGroup for "torch" (default: the default group).
            Ranks of the result are the group's ranks.
        local_size: ranks per (emulated) node; default PIPER_LOCAL_SIZE, else host names.
        node_ids: explicit node index of every rank of the group (sub-groups that keep the
            job's node split, tests, unusual layouts); overrides both.
        timeout: seconds for every blocking wait; default PIPER_TIMEOUT (300).
    Collective: every rank of the group calls init() (a few small all-gathers over the
    backend, then the node segments are mapped).
    """
    backend = backend or envs.backend() or _detect()
    if backend not in ("mpi", "torch", "single"):
        raise PiperUsageError(f"piper: init: unknown backend {backend!r}")
    timeout = timeout if timeout is not None else envs.timeout()
    return connect(_transport(backend, timeout, group), local_size=local_size,
                   node_ids=node_ids, timeout=timeout)


def _digest(text: str) -> int:
    """56 bits of blake2b of ``text``, as a non-negative int64."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _check_environment(table: np.ndarray, me: int, errors: list[str | None],
                       values: list[object]) -> None:
    """PiperUsageError on every rank when some rank's environment (envs.AT_INIT) is invalid or
    differs from another's. table: P x (1 + len(AT_INIT)) int64, row r = rank r's
    bitmask of invalid variables, then the digest of each variable's value."""
    problems = []
    for i, (name, _) in enumerate(envs.AT_INIT):
        bad = [r for r in range(len(table)) if table[r, 0] >> i & 1]
        if bad:
            problems.append(f"{name} is invalid on ranks {bad}"
                            + (f" (here: {errors[i]})" if errors[i] else ""))
        elif len(set(table[:, 1 + i].tolist())) > 1:
            sides = {}
            for r, d in enumerate(table[:, 1 + i].tolist()):
                sides.setdefault(d, []).append(r)
            problems.append(f"{name} differs between the ranks (groups {list(sides.values())}; "
                            f"here {values[i]!r}) and must be set alike on every rank")
    if problems:
        raise PiperUsageError(f"piper: init: rank {me}: " + "; ".join(problems))


def connect(transport: Transport, *, local_size: int | None = None,
            node_ids: list[int] | None = None, timeout: float | None = None) -> Communicator:
    """Builds a communicator over an existing transport (init() and the torch backend use it):
    finds who shares a host, maps the node segments. Collective over the transport's ranks."""
    timeout = timeout if timeout is not None else envs.timeout()
    P, me = transport.size, transport.rank

    deadline = time.monotonic() + timeout

    def gather(step: int, mine: np.ndarray) -> np.ndarray:
        """All-gather of one int64 row per rank, bounded by the init deadline."""
        return validate.exchange(transport, mine, _INIT_TAG + step, f"init (step {step})",
                                 deadline, timeout)

    # Who is where: host (as a digest), pid and a random job token, from every rank; with the
    # environment it read (each variable's validity and value digest), checked on every rank.
    host = socket.gethostname()
    errors, values = envs.at_init()
    if node_ids is not None or local_size is not None:  # PIPER_LOCAL_SIZE not read
        errors[0] = values[0] = None
    invalid = sum(1 << i for i, e in enumerate(errors) if e)
    info = gather(0, np.array([_digest(host), os.getpid(), secrets.randbits(62), invalid,
                               *(_digest(repr(v)) for v in values)], dtype=np.int64))
    _check_environment(info[:, 3:], me, errors, values)
    hosts = [f"host-{int(d):x}" for d in info[:, 0]]
    pids = [int(p) for p in info[:, 1]]
    token = f"{_job_id()}.{int(info[0, 2]):x}"
    transport.set_peers(pids, hosts)
    if node_ids is None:
        node_ids = node_ids_from(hosts, local_size if local_size is not None
                                 else envs.local_size())
    if len(node_ids) != P:
        raise PiperUsageError(f"piper: init: node_ids has {len(node_ids)} entries for {P} ranks")
    node_of = np.asarray(node_ids, dtype=np.int64)
    locals_ = [int(r) for r in np.nonzero(node_of == node_of[me])[0]]
    if len({hosts[r] for r in locals_}) > 1:
        raise PiperUsageError(
            f"piper: init: rank {me}: emulated node {int(node_of[me])} (ranks {locals_}) spans "
            f"several hosts; PIPER_LOCAL_SIZE must divide the ranks per host")

    # Node segments: local rank 0 creates, the others map, then the name is removed.
    local_rank = locals_.index(me)
    leader_pid = pids[locals_[0]]
    prefix = f"/piper-{token}-{leader_pid}-n{int(node_of[me])}"
    def sync(step: int) -> None:
        gather(step, np.array([step], dtype=np.int64))

    segment = None
    try:
        if len(locals_) == 1:
            segment = PrivateSegment(P)
            sync(1)
            sync(2)
        else:
            if local_rank == 0:
                sweep_stale_segments()
                segment = node_segment(prefix, 0, locals_, P, True)
            sync(1)
            if local_rank != 0:
                segment = node_segment(prefix, local_rank, locals_, P, False)
            sync(2)
            segment.unlink()
    except PiperSystemError:
        if segment is not None:
            segment.close()
        raise
    links = dict(zip((name for name, _ in envs.AT_INIT), values))["PIPER_PLATFORM"]
    comm = Communicator(transport, node_ids, segment, links=links, timeout=timeout)
    log.debug("piper: init %r", comm)
    return comm
