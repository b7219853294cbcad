"""Alpha-beta cost model that picks HALO or flat for `algorithm="auto"`.

Every rank evaluates it on the same gathered count matrix, so every rank picks the same
algorithm without talking. Times are in seconds, bandwidths in bytes per second.

flat : rank r sends each non-empty block as its own message;
       T = sum over messages of (alpha_level + bytes / beta_level), level = intra or inter node.
HALO : two node barriers, the pack copy, the proxied inter-node messages (one per node pair)
       and the copy-out of blocks from the same node;
       T = 2 alpha_barrier + pack / beta_copy + sum (alpha_inter + bytes / beta_inter)
           + local / beta_copy.
The step takes as long as its slowest rank, so each algorithm is scored by its maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
class _Topology:
    """What predict needs of node_of alone, computed once per communicator."""

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


def predict(send_bytes: np.ndarray, node_of: np.ndarray, links: Links) -> dict[str, float]:
    """Predicted time of each algorithm for a P x P matrix of bytes (row = source rank)."""
    t = _topology(node_of)
    nz = send_bytes > 0
    intra_b, inter_b = send_bytes * t.intra, send_bytes * t.inter
    flat = ((nz & t.intra).sum(1) * links.alpha_intra + intra_b.sum(1) / links.beta_intra
            + (nz & t.inter).sum(1) * links.alpha_inter + inter_b.sum(1) / links.beta_inter)
    # HALO: per node pair, the aggregated message goes from a proxy of the source node.
    node_to_rank = t.onehot.T @ send_bytes                         # N x P
    # Each source node spreads its outgoing aggregated messages over its ranks as proxies.
    remote = node_to_rank * (1 - t.onehot.T)                       # drop same-node destinations
    msgs_per_node = (remote > 0).sum(1) / t.local_sz
    bytes_per_node = remote.sum(1) / t.local_sz
    pack = send_bytes.sum(1)
    local_in = (send_bytes * t.same).sum(0)
    halo = (2 * links.alpha_barrier * t.multi + pack / links.beta_copy
            + msgs_per_node[node_of] * links.alpha_inter
            + bytes_per_node[node_of] / links.beta_inter + local_in / links.beta_copy)
    return {"flat": float(flat.max()), "halo": float(halo.max())}


def choose(send_bytes: np.ndarray, node_of: np.ndarray, links: Links) -> str:
    """'halo' or 'flat', identical on every rank for the same inputs."""
    t = predict(send_bytes, node_of, links)
    return "halo" if t["halo"] < t["flat"] else "flat"
