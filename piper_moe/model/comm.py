"""Alpha-beta communication costs (seconds) per link level.

Each level (``platform.intra``, ``platform.inter``) has a per-message latency alpha (s) and a
per-rank bandwidth beta (bytes/s, per direction, when every rank of the node is busy). A group of
``n`` ranks placed with ``per_node`` members on each node spans ``N = n / per_node`` nodes.

All-to-all, each rank sending ``m`` bytes in total, m/n to each rank (itself included), with
g = per_node and N nodes:

- flat: every rank sends n - 1 messages directly, g - 1 inside its node and n - g across:
  ``(g-1)*(a_i + m/n/b_i) + (n-g)*(a_e + m/n/b_e)``
- HALO (design.md): (A) intra-node aggregation: each rank hands each local peer l' the blocks
  bound for local index l' on all N nodes, ``(g-1)*(a_i + N*m/n/b_i)``; (B) one message per node
  pair between same-local-rank peers, ``(N-1)*(a_e + g*m/n/b_e)``; (C) a local reorder; packing
  for (A) and reordering for (C) copy ``2*m`` bytes at ``copy_bandwidth``. With N = 1 HALO is the
  flat exchange.

Both send the same (n - g)*m/n bytes across nodes; HALO trades (n - g) - (N - 1) network latencies
for about m extra intra-node bytes and two local copies.

Ring collectives of S bytes are hierarchical: reduce-scatter inside the node, the inter-node ring
on S/g among same-local-rank peers, all-gather inside the node.
"""

from __future__ import annotations

import math

from .spec import PlatformSpec


def per_node(n: int, stride: int, devices_per_node: int) -> int:
    """Members of a group of ``n`` ranks spaced ``stride`` apart that share a node."""
    if n < 1 or stride < 1:
        raise ValueError(f"group size ({n}) and stride ({stride}) must be >= 1")
    return max(1, min(n, devices_per_node // stride))


def a2a_flat(m: float, n: int, g: int, platform: PlatformSpec) -> float:
    """Flat all-to-all time (s): ``m`` bytes sent per rank over ``n`` ranks, ``g`` per node."""
    if n <= 1:
        return 0.0
    g = min(g, n)
    block = m / n
    intra, inter = platform.intra, platform.inter
    return (g - 1) * (intra.latency + block / intra.bandwidth) + (n - g) * (
        inter.latency + block / inter.bandwidth
    )


def a2a_halo(m: float, n: int, g: int, platform: PlatformSpec) -> float:
    """HALO all-to-all time (s), same arguments as ``a2a_flat``."""
    if n <= 1:
        return 0.0
    g = min(g, n)
    nodes = math.ceil(n / g)
    if nodes == 1:
        return a2a_flat(m, n, g, platform)
    block = m / n
    intra, inter = platform.intra, platform.inter
    phase_a = (g - 1) * (intra.latency + nodes * block / intra.bandwidth)
    phase_b = (nodes - 1) * (inter.latency + g * block / inter.bandwidth)
    copies = 2 * m / platform.copy_bandwidth
    return phase_a + phase_b + copies


def all_to_all(m: float, n: int, g: int, platform: PlatformSpec, algorithm: str) -> float:
    """All-to-all time (s) with ``algorithm`` "flat" or "halo"."""
    if algorithm == "flat":
        return a2a_flat(m, n, g, platform)
    if algorithm == "halo":
        return a2a_halo(m, n, g, platform)
    raise ValueError(f"all-to-all algorithm must be 'flat' or 'halo' (got {algorithm!r})")


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
