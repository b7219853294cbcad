"""Every PIPER_* environment variable, read in one place (a communicator reads them once, when
it is created; those of AT_INIT are checked alike on every rank by bootstrap.connect).

PIPER_LOCAL_SIZE  int    consecutive groups of k ranks form one (emulated) node; default: host names
PIPER_TIMEOUT     float  seconds any blocking wait may last before PiperTimeoutError (default 300)
PIPER_ALGO        str    forces the algorithm of every all-to-all: halo | flat | pairwise
PIPER_CHECK       0|1|2  cross-rank checks of every call: 1 (default) checks every call at no
                         extra message where the call's signature can travel with the data
                         (the equal split under flat/pairwise over MPI), else with a header
                         round; 2 a header round before every call; 0 trusts the caller when
                         the receive counts are known (csrc/runtime/call.hpp, CheckMode)
PIPER_DEBUG       0|1    logs every collective (op, algorithm, bytes, time) at INFO on "piper"
PIPER_BACKEND     str    mpi | torch | single: overrides launcher detection in pc.init()
PIPER_MPI_CALLS   str    cpp | mpi4py: who calls MPI under the C++ executor (default cpp when
                         the extension was built against mpi4py's MPI; mpi4py: through the
                         Python transport, for comparison)
PIPER_INTER       str    nccl | mpi: the transport of CUDA calls' messages (default: NCCL when
                         it loads, else mpi: staged through pinned host memory over the host
                         transport; csrc/cuda/device_plane.hpp)
PIPER_TORCH_CUDA_DELEGATE str  nccl | gloo: what the "piper" torch backend's delegated collectives
                         (all but all-to-all) use for CUDA tensors: torch's NCCL, or gloo through
                         host copies (default: gloo when PIPER_INTER=mpi, else nccl); the
                         same on every rank (the group's creation raises on every rank if not)
PIPER_PLATFORM    str    the links algorithm="auto" prices each call with: a platform YAML
                         (e.g. calibrated) or a shipped platform's name (cost.load_links);
                         default: cost.Links' guesses for one CPU host
PIPER_NCCL_LIBRARY path  libnccl.so.2 to load (default: the one the process loaded already, as
                         torch's, else the nvidia-nccl wheel's, else the loader's search path)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import PiperUsageError

ALGORITHMS = ("auto", "halo", "flat", "pairwise")
CUDA_DELEGATES = ("nccl", "gloo")  # PIPER_TORCH_CUDA_DELEGATE


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def is_set(name: str) -> bool:
    return _get(name) is not None


def _number(name: str, kind, noun: str, default, valid, rule: str):
    """The variable parsed by kind (int, float), default when unset; PiperUsageError naming
    the variable when it does not parse (noun: what it must be) or fails valid (rule)."""
    value = _get(name)
    if value is None:
        return default
    try:
        x = kind(value)
    except ValueError:
        raise PiperUsageError(f"{name}={value!r} is not {noun}") from None
    if not valid(x):
        raise PiperUsageError(f"{name}={value!r} must be {rule}")
    return x


def local_size() -> int | None:
    return _number("PIPER_LOCAL_SIZE", int, "an integer", None, lambda k: k >= 1, ">= 1")


def timeout() -> float:
    return _number("PIPER_TIMEOUT", float, "a number of seconds", 300.0, lambda t: t > 0,
                   "> 0 seconds")


def algorithm() -> str | None:
    value = _get("PIPER_ALGO")
    if value is not None and value not in ALGORITHMS:
        raise PiperUsageError(f"PIPER_ALGO={value!r}: expected one of {', '.join(ALGORITHMS)}")
    return value


def check() -> int:
    value = _get("PIPER_CHECK")
    if value is None:
        return 1
    if value in ("0", "1", "2"):
        return int(value)
    if value in ("false", "no"):
        return 0
    raise PiperUsageError(f"PIPER_CHECK={value!r}: expected 0 (trust), 1 (default) or 2 (a "
                          f"header round before every call)")


def debug() -> bool:
    return _get("PIPER_DEBUG") in ("1", "true", "yes")


def backend() -> str | None:
    value = _get("PIPER_BACKEND")
    if value is not None and value not in ("mpi", "torch", "single"):
        raise PiperUsageError(f"PIPER_BACKEND={value!r}: expected mpi, torch or single")
    return value


def mpi_calls() -> str:
    value = _get("PIPER_MPI_CALLS") or "cpp"
    if value not in ("cpp", "mpi4py"):
        raise PiperUsageError(f"PIPER_MPI_CALLS={value!r}: expected cpp or mpi4py")
    return value


def inter() -> str:
    value = _get("PIPER_INTER") or "auto"
    if value not in ("auto", "nccl", "mpi"):
        raise PiperUsageError(f"PIPER_INTER={value!r}: expected auto, nccl or mpi")
    return value


def torch_cuda_delegate() -> str:
    """nccl | gloo: PIPER_TORCH_CUDA_DELEGATE, else gloo when PIPER_INTER=mpi (a machine whose
    NCCL cannot serve these ranks serves neither Piper nor torch), else nccl."""
    value = _get("PIPER_TORCH_CUDA_DELEGATE")
    if value is None:
        return "gloo" if inter() == "mpi" else "nccl"
    if value not in CUDA_DELEGATES:
        raise PiperUsageError(f"PIPER_TORCH_CUDA_DELEGATE={value!r}: expected nccl or gloo")
    return value


def platform():
    """PIPER_PLATFORM's links (a piper_comm.cost.Links), None when unset."""
    value = _get("PIPER_PLATFORM")
    if value is None:
        return None
    from .cost import load_links
    try:
        return load_links(value)
    except PiperUsageError as e:
        raise PiperUsageError(f"PIPER_PLATFORM={value!r}: {e}") from None


def nccl_library() -> str:
    """The libnccl.so.2 a CUDA communicator loads when the process has none loaded yet: the
    nvidia-nccl wheel's beside this Python (where torch finds it), else "" (the loader's search
    path); PIPER_NCCL_LIBRARY overrides. Looked up without importing anything."""
    value = _get("PIPER_NCCL_LIBRARY")
    if value is not None:
        return value
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib" / "libnccl.so.2"
        if lib.exists():
            return str(lib)
    return ""


# The variables a communicator reads once its ranks can talk (bootstrap.connect), each with its
# reader: every rank must read the same value (they choose the topology, the algorithm, the
# checks' message rounds, who calls MPI (whose calls check in band), the CUDA transport and the
# links auto chooses with).
# PIPER_TIMEOUT and PIPER_BACKEND are read before the transport exists, so a bad one raises on
# its rank alone (the others then time out at init, naming it).
AT_INIT = (("PIPER_LOCAL_SIZE", local_size), ("PIPER_ALGO", lambda: algorithm() or "auto"),
           ("PIPER_CHECK", check), ("PIPER_INTER", inter), ("PIPER_MPI_CALLS", mpi_calls),
           ("PIPER_PLATFORM", platform))


def at_init() -> tuple[list[str | None], list[object]]:
    """For each variable of AT_INIT: its error message or None, and its parsed value (None
    where it is invalid). Who calls: bootstrap.connect, which exchanges them."""
    errors: list[str | None] = []
    values: list[object] = []
    for _, read in AT_INIT:
        try:
            values.append(read())
            errors.append(None)
        except PiperUsageError as e:
            values.append(None)
            errors.append(str(e))
    return errors, values
