"""Alpha-beta communication costs (seconds) per link level.

Each level (``platform.intra``, ``platform.inter``) has a per-message latency alpha (s) and a
per-rank bandwidth beta (bytes/s, per direction, when every rank of the node is busy). A group of
``n`` ranks placed with ``per_node`` members on each node spans ``N = n / per_node`` nodes.

All-to-all: the uniform case of piper_comm.cost, the model ``algorithm="auto"`` scores per call,
with the platform's levels, node barrier latency and copy bandwidth as its ``Links``
(``cost_links``). Each rank sends ``m`` bytes in total, b = m/n to each rank (itself included),
g = per_node, N = n/g nodes:

- flat: every rank sends n - 1 messages directly, g - 1 inside its node and n - g across:
  ``(g-1)*(a_i + b/b_i) + (n-g)*(a_e + b/b_e)``
- HALO, as the executor runs it: every rank packs its m bytes into the node-shared segment, two
  node barriers, each rank proxies N - 1 aggregated messages of g*b bytes (one per remote node:
  the blocks of its node's ranks for the remote destinations with its local index), and copies
  the g*b bytes its node's ranks sent it out of the segment:
  ``2*a_barrier + m/copy + (N-1)*(a_e + g*b/b_e) + g*b/copy``. With g = 1 the executor runs flat.

Both send the same (n - g)*b bytes across nodes; HALO trades (n - g) - (N - 1) network latencies
and the (g - 1)*b intra-node bytes for two barriers and (m + g*b) bytes of local copies.

Ring collectives of S bytes are hierarchical: reduce-scatter inside the node, the inter-node ring
on S/g among same-local-rank peers, all-gather inside the node.
"""

from __future__ import annotations

import math

from piper_comm.cost import Links, predict_uniform

from .spec import PlatformSpec
from .strategy import A2A


def per_node(n: int, stride: int, devices_per_node: int) -> int:
    """Members of a group of ``n`` ranks spaced ``stride`` apart that share a node."""
    if n < 1 or stride < 1:
        raise ValueError(f"group size ({n}) and stride ({stride}) must be >= 1")
    return max(1, min(n, devices_per_node // stride))


def cost_links(platform: PlatformSpec) -> Links:
    """The all-to-all cost-model parameters of ``platform``; its barrier latency defaults to one
    intra-node latency."""
    barrier = platform.barrier_latency
    return Links(alpha_intra=platform.intra.latency, beta_intra=platform.intra.bandwidth,
                 alpha_inter=platform.inter.latency, beta_inter=platform.inter.bandwidth,
                 alpha_barrier=platform.intra.latency if barrier is None else barrier,
                 beta_copy=platform.copy_bandwidth)


def all_to_all(m: float, n: int, g: int, platform: PlatformSpec, algorithm: str) -> float:
    """All-to-all time (s) with ``algorithm`` "flat" or "halo": ``m`` bytes sent per rank over
    ``n`` ranks, ``g`` per node (capped at ``n``); 0 for ``n`` <= 1."""
    if algorithm not in A2A:
        raise ValueError(f"all-to-all algorithm must be 'flat' or 'halo' (got {algorithm!r})")
    if n <= 1:
        return 0.0
    return predict_uniform(m, n, min(g, n), cost_links(platform))[algorithm]


def a2a_flat(m: float, n: int, g: int, platform: PlatformSpec) -> float:
    """Flat all-to-all time (s): ``m`` bytes sent per rank over ``n`` ranks, ``g`` per node."""
    return all_to_all(m, n, g, platform, "flat")


def a2a_halo(m: float, n: int, g: int, platform: PlatformSpec) -> float:
    """HALO all-to-all time (s), same arguments as ``a2a_flat``."""
    return all_to_all(m, n, g, platform, "halo")


def _ring(size: float, n: int, latency: float, bandwidth: float) -> float:
    """One ring pass (reduce-scatter or all-gather) of ``size`` bytes over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return (n - 1) * (latency + size / n / bandwidth)


def reduce_scatter(size: float, n: int, g: int, platform: PlatformSpec) -> float:
    """Hierarchical reduce-scatter of ``size`` bytes (the full buffer) over ``n`` ranks (s).
    All-gather costs the same."""
    if n <= 1:
        return 0.0
    g = min(g, n)
    nodes = math.ceil(n / g)
    intra = _ring(size, g, platform.intra.latency, platform.intra.bandwidth)
    inter = _ring(size / g, nodes, platform.inter.latency, platform.inter.bandwidth)
    return intra + inter


def all_gather(size: float, n: int, g: int, platform: PlatformSpec) -> float:
    """Hierarchical all-gather to ``size`` bytes in total over ``n`` ranks (s)."""
    return reduce_scatter(size, n, g, platform)


def all_reduce(size: float, n: int, g: int, platform: PlatformSpec) -> float:
    """Hierarchical ring all-reduce of ``size`` bytes over ``n`` ranks (s): reduce-scatter then
    all-gather, 2*(n-1)/n of the buffer on the bottleneck link."""
    return 2 * reduce_scatter(size, n, g, platform)


def p2p(size: float, platform: PlatformSpec, inter_node: bool) -> float:
    """One point-to-point message of ``size`` bytes (s)."""
    link = platform.inter if inter_node else platform.intra
    return link.latency + size / link.bandwidth
