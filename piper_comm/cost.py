"""Alpha-beta cost model of the all-to-all algorithms the executor runs (csrc/runtime).

One model, two uses: `algorithm="auto"` scores it per call on the gathered byte matrix
(`predict`, `choose`; every rank evaluates it on the same matrix, so every rank picks the same
algorithm without talking), and the resource model (piper_moe.resource_model.comm) scores its
uniform case in closed form (`predict_uniform`). Times are in seconds, bandwidths in bytes per
second, the parameters of each level in `Links`. What one rank does is a `Traffic`; its time is
`Traffic.seconds`, and a call takes as long as its slowest rank.

flat : every non-empty block for another rank is its own message;
       T = sum over messages of (alpha_level + bytes / beta_level), level = intra or inter node.
HALO : the rank packs all its blocks (every destination, own node included) into the node's
       shared segment; two node barriers; as the proxy of the remote destinations with its
       local index (modulo the node size) it sends each one aggregated message, the blocks of
       all its node's ranks for it; it copies the blocks its node's ranks sent it out of the
       segment;
       T = 2 alpha_barrier + pack / beta_copy + sum over its messages (alpha_inter
           + bytes / beta_inter) + local / beta_copy.
       The model spreads a node's messages and their bytes evenly over its ranks (exact for
       uniform traffic on nodes of equal size). On a topology of one-rank nodes the executor
       runs the flat schedule, so HALO costs what flat costs there.
Not charged: the block to self of flat (a local copy), and the scatter of HALO messages staged
because the source node's ranks are not contiguous.

Uniform case: n ranks, g on each of N = n / g nodes, every rank sends m bytes, b = m / n to
every rank (itself included). Every rank does the same, so (m > 0, g > 1; with g = 1 HALO
is flat)

    flat = (g-1) (alpha_intra + b / beta_intra) + (n-g) (alpha_inter + b / beta_inter)
    halo = 2 alpha_barrier + m / beta_copy + (N-1) (alpha_inter + g b / beta_inter)
           + g b / beta_copy

HALO sends the same (n-g) b bytes across nodes as flat in N-1 messages instead of n-g, and
moves no bytes over the intra-node link, at the price of two copies and two barriers.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from . import _C
from .errors import PiperUsageError

Amount = float | np.ndarray  # one rank's, or one per rank


@dataclass(frozen=True)
class Links:
    """Link parameters per level (alpha: seconds per message or barrier; beta: bytes per
    second). The defaults are rough guesses for one CPU host, not measurements: a communicator
    takes a platform file's instead with PIPER_PLATFORM (`load_links`), e.g. one that
    piper_moe.cli.calibrate measured on the machine. `source` says where they came from."""

    alpha_intra: float = 4e-6     # per message between ranks of one node (MPI over shm)
    beta_intra: float = 4e9
    alpha_inter: float = 4e-6     # per message between nodes (emulated nodes: same as intra)
    beta_inter: float = 4e9
    alpha_barrier: float = 6e-6   # one shared-memory barrier of a node
    beta_copy: float = 6e9        # memcpy into / out of the node segment
    source: str = field(default="defaults (one CPU host, guessed)", compare=False, repr=False)

    @functools.cached_property
    def coefficients(self) -> np.ndarray:
        """Seconds per unit of each Traffic term, in Traffic's field order (computed once:
        `choose` prices every call with it)."""
        return np.array([self.alpha_intra, 1 / self.beta_intra, self.alpha_inter,
                         1 / self.beta_inter, self.alpha_barrier, 1 / self.beta_copy])


@dataclass(frozen=True)
class Traffic:
    """What one rank does in one all-to-all, term by term: messages and bytes it sends inside
    its node and to other nodes, node barriers it waits in, bytes it copies locally. Each field
    is a number, or an array with one entry per rank."""

    msgs_intra: Amount = 0.0
    bytes_intra: Amount = 0.0
    msgs_inter: Amount = 0.0
    bytes_inter: Amount = 0.0
    barriers: Amount = 0.0
    copy_bytes: Amount = 0.0

    def seconds(self, links: Links) -> Amount:
        """Time of this traffic under `links` (same shape as the fields)."""
        terms = (self.msgs_intra, self.bytes_intra, self.msgs_inter, self.bytes_inter,
                 self.barriers, self.copy_bytes)
        return sum(t * c for t, c in zip(terms, links.coefficients))


_TOPOLOGIES: dict[bytes, _C.Topology] = {}


def _topology(node_of: np.ndarray) -> _C.Topology:
    key = np.asarray(node_of, dtype=np.int64).tobytes()
    topo = _TOPOLOGIES.get(key)
    if topo is None:
        topo = _TOPOLOGIES[key] = _C.Topology(np.asarray(node_of, dtype=np.int64))
    return topo


def _terms(send_bytes: np.ndarray, node_of: np.ndarray) -> np.ndarray:
    """[2 (flat, halo), 6 (Traffic's fields), P] per-rank terms (csrc/plan/traffic.hpp)."""
    return _C.a2a_traffic(_topology(node_of), np.asarray(send_bytes).reshape(-1))


def traffic(send_bytes: np.ndarray, node_of: np.ndarray) -> dict[str, Traffic]:
    """Per-rank traffic of "flat" and "halo" for a P x P matrix of bytes (row = source rank)
    on ranks placed on nodes by node_of (P node ids)."""
    t = _terms(send_bytes, node_of)
    return {"flat": Traffic(*t[0]), "halo": Traffic(*t[1])}


def predict(send_bytes: np.ndarray, node_of: np.ndarray, links: Links) -> dict[str, float]:
    """Predicted time of each algorithm ("flat", "halo") for a P x P matrix of bytes (row =
    source rank): the time of its slowest rank."""
    flat, halo = (links.coefficients @ _terms(send_bytes, node_of)).max(axis=1)
    return {"flat": float(flat), "halo": float(halo)}


def traffic_uniform(m: float, n: int, g: int) -> dict[str, Traffic]:
    """Traffic of every rank of "flat" and "halo" when each of n ranks, g on each of n / g
    nodes, sends m bytes, m / n to every rank (itself included). Equals `traffic` of the
    matrix full of m / n on that placement when g divides n (1 <= g <= n); otherwise the same
    expressions with n / g nodes, a fraction."""
    if not 1 <= g <= n:
        raise ValueError(f"ranks per node ({g}) must be in [1, n={n}]")
    if n == 1:
        return {"flat": Traffic(), "halo": Traffic()}
    b = m / n
    sends = m > 0
    flat = Traffic(msgs_intra=(g - 1) * sends, bytes_intra=(g - 1) * b,
                   msgs_inter=(n - g) * sends, bytes_inter=(n - g) * b)
    if g == 1:  # one-rank nodes: the executor runs the flat schedule
        return {"flat": flat, "halo": flat}
    halo = Traffic(msgs_inter=(n / g - 1) * sends, bytes_inter=(n - g) * b, barriers=2,
                   copy_bytes=m + g * b)
    return {"flat": flat, "halo": halo}


def predict_uniform(m: float, n: int, g: int, links: Links) -> dict[str, float]:
    """Predicted time of each algorithm ("flat", "halo") in the uniform case of
    `traffic_uniform`: `predict` of the matrix full of m / n, in closed form."""
    return {algo: float(tr.seconds(links)) for algo, tr in traffic_uniform(m, n, g).items()}


def choose(send_bytes: np.ndarray, node_of: np.ndarray, links: Links) -> str:
    """'halo' or 'flat', identical on every rank for the same inputs."""
    t = predict(send_bytes, node_of, links)
    return "halo" if t["halo"] < t["flat"] else "flat"


def platform_dir() -> Path | None:
    """Where the platform files shipped with Piper lie (piper_moe/configs/platforms), found
    without importing piper_moe; None when it is not installed."""
    spec = importlib.util.find_spec("piper_moe")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "configs" / "platforms"


def load_links(source: str | Path) -> Links:
    """The links of a platform file, for `algorithm="auto"` (PIPER_PLATFORM).

    `source`: a path to a YAML platform file (e.g. one `python -m piper_moe.cli.calibrate`
    wrote) or the name of a platform shipped with Piper ("cpu-host", "dgx-h100", "frontier").
    Read from it: `intra` and `inter` ({latency: s, bandwidth: B/s}), `copy_bandwidth` (B/s)
    and `barrier_latency` (s; absent: intra's latency): the keys the resource model reads for
    the same levels (piper_moe.resource_model.comm.cost_links gives the same Links). Raises
    PiperUsageError naming the file and the key. Reads one small file: call it once."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        shipped = platform_dir()
        known = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped else []
        if str(source) not in known:
            raise PiperUsageError(f"platform {str(source)!r}: not a .yaml file and not a platform "
                                  f"shipped with Piper (known: {', '.join(known) or 'none'})")
        path = shipped / f"{source}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PiperUsageError(f"platform {str(path)!r}: cannot read it: {e}") from None
    if not isinstance(data, dict):
        raise PiperUsageError(f"platform {str(path)!r}: expected a mapping at top level")

    def number(value, key: str, positive: bool) -> float:
        try:  # YAML 1.1 reads "1e-6" as a string, as the resource model's loader accepts too
            x = float(value) if isinstance(value, (int, float, str)) and \
                not isinstance(value, bool) else None
        except ValueError:
            x = None
        if x is None or not (x > 0 if positive else x >= 0):
            raise PiperUsageError(f"platform {str(path)!r}: {key} must be a number "
                                  f"{'> 0' if positive else '>= 0'} (got {value!r})")
        return x

    def level(name: str) -> tuple[float, float]:
        link = data.get(name)
        if not isinstance(link, dict):
            raise PiperUsageError(f"platform {str(path)!r}: {name} must be a mapping with "
                                  f"latency (s) and bandwidth (B/s) (got {link!r})")
        return (number(link.get("latency"), f"{name}.latency", False),
                number(link.get("bandwidth"), f"{name}.bandwidth", True))

    (a_intra, b_intra), (a_inter, b_inter) = level("intra"), level("inter")
    barrier = data.get("barrier_latency")
    return Links(alpha_intra=a_intra, beta_intra=b_intra, alpha_inter=a_inter, beta_inter=b_inter,
                 alpha_barrier=a_intra if barrier is None else
                 number(barrier, "barrier_latency", False),
                 beta_copy=number(data.get("copy_bandwidth"), "copy_bandwidth", True),
                 source=f"platform {data.get('name', path.stem)} ({path})")
