"""Per-layer communication of the two MoE dispatchers (seconds, alpha-beta, ``comm.py``).

Notation: T tokens per micro-batch of one tensor-parallel group (``micro_batch * seq_len``), h
hidden, e bytes per element, g the TP group size (one node), S = T * h * e.

- PPMoE (``piper_moe/layer/ppmoe.py``): every rank of the TP group holds the group's T tokens,
  computes its own experts' pairs and the group sums the [T, h] partials: one ring all-reduce of
  S bytes over the intra-node link, ``2 (g-1) (a_i + S/g/b_i)``, 2 (g-1)/g * S bytes leaving each
  rank. Sequence-sharded (each rank holds T/g rows): all-gather of the input then reduce-scatter
  of the output, the same ring bytes and time. No dispatch traffic: the selection is an index.
- all-to-all: each rank sends its T_r = T/sp tokens' ``top_k`` rows out and gets them back:
  dispatch + combine, each ``m = T_r * top_k * h * e * imbalance`` bytes per rank of which
  (ep-1)/ep leave the rank, over the EP group (``comm.all_to_all``, flat or HALO).

Forward only; the backward runs the duals (all-reduce / all-gather <-> reduce-scatter,
all-to-all reversed) at the same cost. Bytes sent per rank in one forward:
PPMoE 2 (g-1)/g * S; all-to-all 2 (ep-1)/ep * T_r * top_k * h * e. With T_r = T/g and ep = g
(the TP group is the EP group) their ratio is g / top_k: the all-to-all moves fewer bytes when
top_k < g. In a tensor-parallel model, though, the sum is the MoE block's own TP collective
(the reduce-scatter or all-reduce a TP MLP ends with), so PPMoE replaces the all-to-all by
communication the layer pays anyway: ``estimate`` charges it as such.
"""

from __future__ import annotations

from . import comm
from .spec import PlatformSpec


def ppmoe_bytes(tokens: float, hidden: int, elem_bytes: int, g: int) -> float:
    """Bytes one rank sends in one PPMoE forward (ring all-reduce of tokens * hidden)."""
    return 2 * (g - 1) / g * tokens * hidden * elem_bytes if g > 1 else 0.0


def a2a_bytes(tokens_per_rank: float, top_k: int, hidden: int, elem_bytes: int, ep: int,
              imbalance: float = 1.0) -> float:
    """Bytes one rank sends to other ranks in one all-to-all forward (dispatch + combine)."""
    m = tokens_per_rank * top_k * hidden * elem_bytes * imbalance
    return 2 * (ep - 1) / ep * m if ep > 1 else 0.0


def ppmoe_time(tokens: float, hidden: int, elem_bytes: int, g: int, platform: PlatformSpec,
               sequence_sharded: bool = False) -> float:
    """Seconds of one PPMoE forward over a TP group of g ranks in one node: the all-reduce of
    the [tokens, hidden] partials, or (sequence_sharded) the input all-gather plus the output
    reduce-scatter."""
    if g > platform.devices_per_node:
        raise ValueError(f"PPMoE group ({g} ranks) must fit one node "
                         f"({platform.devices_per_node} devices)")
    size = tokens * hidden * elem_bytes
    if sequence_sharded:
        return (comm.all_gather(size, g, g, platform)
                + comm.reduce_scatter(size, g, g, platform))
    return comm.all_reduce(size, g, g, platform)


def a2a_time(tokens_per_rank: float, top_k: int, hidden: int, elem_bytes: int, ep: int,
             per_node: int, platform: PlatformSpec, algorithm: str = "flat",
             imbalance: float = 1.0) -> float:
    """Seconds of one all-to-all forward (dispatch + combine) over ep ranks, per_node of them
    per node."""
    m = tokens_per_rank * top_k * hidden * elem_bytes * imbalance
    return 2 * comm.all_to_all(m, ep, per_node, platform, algorithm)
