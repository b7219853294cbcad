"""Alpha-beta cost model of the all-to-all algorithms the executor runs (csrc/runtime).

One model, two uses: `algorithm="auto"` scores it per call on the gathered byte matrix
(`predict`, `choose`; every rank evaluates it on the same matrix, so every rank picks the same
algorithm without talking), and the resource model (piper_moe.model.comm) scores its uniform
case in closed form (`predict_uniform`). Times are in seconds, bandwidths in bytes per second,
the parameters of each level in `Links`. What one rank does is a `Traffic`; its time is
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

from dataclasses import dataclass

import numpy as np

Amount = float | np.ndarray  # one rank's, or one per rank


@dataclass(frozen=True)
class Links:
    """Link parameters per level. The defaults are rough guesses for one CPU host, not
    measurements: calibrate them (piper_moe.calibrate) for a real machine."""

    alpha_intra: float = 4e-6     # per message between ranks of one node (MPI over shm)
    beta_intra: float = 4e9
    alpha_inter: float = 4e-6     # per message between nodes (emulated nodes: same as intra)
    beta_inter: float = 4e9
    alpha_barrier: float = 6e-6   # one shared-memory barrier of a node
    beta_copy: float = 6e9        # memcpy into / out of the node segment


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
        return (self.msgs_intra * links.alpha_intra + self.bytes_intra / links.beta_intra
                + self.msgs_inter * links.alpha_inter + self.bytes_inter / links.beta_inter
                + self.barriers * links.alpha_barrier + self.copy_bytes / links.beta_copy)


@dataclass(frozen=True)
class _Topology:
    """What `traffic` needs of node_of alone, computed once per communicator."""

    same: np.ndarray      # P x P bool: ranks on one node
    intra: np.ndarray     # P x P bool: same node, off the diagonal
    inter: np.ndarray     # P x P bool: different nodes
    onehot: np.ndarray    # P x N int64
    local_sz: np.ndarray  # N: ranks per node
    multi: np.ndarray     # P bool: the rank's node has several ranks


_TOPOLOGIES: dict[bytes, _Topology] = {}


def _topology(node_of: np.ndarray) -> _Topology:
    key = np.asarray(node_of, dtype=np.int64).tobytes()
    topo = _TOPOLOGIES.get(key)
    if topo is None:
        P = node_of.shape[0]
        same = node_of[:, None] == node_of[None, :]
        offdiag = ~np.eye(P, dtype=bool)
        onehot = np.eye(int(node_of.max()) + 1, dtype=np.int64)[node_of]
        local_sz = onehot.sum(0)
        topo = _TOPOLOGIES[key] = _Topology(same, same & offdiag, ~same, onehot, local_sz,
                                            local_sz[node_of] > 1)
    return topo


def traffic(send_bytes: np.ndarray, node_of: np.ndarray) -> dict[str, Traffic]:
    """Per-rank traffic of "flat" and "halo" for a P x P matrix of bytes (row = source rank)
    on ranks placed on nodes by node_of (P node ids)."""
    t = _topology(node_of)
    nz = send_bytes > 0
    flat = Traffic(msgs_intra=(nz & t.intra).sum(1), bytes_intra=(send_bytes * t.intra).sum(1),
                   msgs_inter=(nz & t.inter).sum(1), bytes_inter=(send_bytes * t.inter).sum(1))
    if not t.multi.any():  # one-rank nodes: the executor runs the flat schedule
        return {"flat": flat, "halo": flat}
    # Per node pair, the aggregated message goes from a proxy of the source node; each source
    # node spreads its outgoing aggregated messages over its ranks.
    node_to_rank = t.onehot.T @ send_bytes                         # N x P
    remote = node_to_rank * (1 - t.onehot.T)                       # drop same-node destinations
    msgs_per_node = (remote > 0).sum(1) / t.local_sz
    bytes_per_node = remote.sum(1) / t.local_sz
    halo = Traffic(msgs_inter=msgs_per_node[node_of], bytes_inter=bytes_per_node[node_of],
                   barriers=2 * t.multi,
                   copy_bytes=send_bytes.sum(1) + (send_bytes * t.same).sum(0))
    return {"flat": flat, "halo": halo}


def predict(send_bytes: np.ndarray, node_of: np.ndarray, links: Links) -> dict[str, float]:
    """Predicted time of each algorithm ("flat", "halo") for a P x P matrix of bytes (row =
    source rank): the time of its slowest rank."""
    return {algo: float(np.max(tr.seconds(links)))
            for algo, tr in traffic(send_bytes, node_of).items()}


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
