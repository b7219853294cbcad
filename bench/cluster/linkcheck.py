"""Is the emulated link really in the path? The arithmetic of cluster.sh's bypass check.

The check runs an MPI all-to-all of `bytes_per_rank` bytes per rank (probe.py) across the
emulated nodes and compares it with what a capped link must show:

  * counters: each node's link (its veth in the namespace) must have transmitted at least the
    bytes its ranks send to other nodes (`inter_node_bytes`); far fewer means the data went
    through shared memory (or another path) instead of the veth;
  * time: one all-to-all cannot be faster than those bytes at the cap's rate (`line_seconds`);
    much faster means the cap is not in the path.

Both must hold, with tolerances (`MIN_COUNTER_FRACTION`, `MIN_TIME_FRACTION`) wide enough for
TCP header overhead and clock granularity and far from the 10-100x of a bypass.

    python bench/cluster/linkcheck.py --nodes 2 --ppn 2 --bytes 1048576 --rounds 5 \\
        --rate 200mbit --seconds 0.044 --tx 5400000,5400000     # exit 1 on a bypass
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass

# A node's veth must carry at least this fraction of the bytes its ranks send off-node (TCP
# adds ~3-5% on top, so a healthy run reads 1.03-1.1; a shared-memory bypass reads ~0).
MIN_COUNTER_FRACTION = 0.95
# One all-to-all may not beat the line-rate time of its bytes by more than this factor (tbf's
# burst lets the first few KiB through at full speed; a bypass is 10-100x faster).
MIN_TIME_FRACTION = 0.8

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate ("200mbit", "1gbit", "125mbps" = bytes/s as tc reads it)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", rate)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"rate {rate!r}: expected a number and one of {', '.join(_UNITS)} "
                         f"(tc's units, e.g. 200mbit, 1gbit)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def inter_node_bytes(nodes: int, ppn: int, bytes_per_rank: int) -> int:
    """Bytes one node sends to other nodes in one equal-split all-to-all: its ppn ranks each
    send bytes_per_rank / P to every one of the P - ppn ranks elsewhere (P = nodes * ppn)."""
    if nodes < 1 or ppn < 1 or bytes_per_rank < 0:
        raise ValueError(f"nodes ({nodes}) and ppn ({ppn}) must be >= 1, bytes ({bytes_per_rank}) "
                         f">= 0")
    P = nodes * ppn
    return ppn * (P - ppn) * (bytes_per_rank // P)


def line_seconds(node_bytes: float, rate_bps: float) -> float:
    """Seconds a link of rate_bps needs for node_bytes of payload (each node's egress is capped
    on its own and all nodes send at once, so this is the time of one exchange)."""
    return 8.0 * node_bytes / rate_bps


@dataclass(frozen=True)
class Verdict:
    ok: bool
    expected_node_bytes: int      # payload one node must send off-node, all rounds together
    min_tx_bytes: int             # the smallest veth TX counter over the nodes
    counter_ratio: float          # min_tx_bytes / expected_node_bytes
    line_seconds: float           # one exchange at the cap's rate
    seconds: float                # one exchange as measured
    time_ratio: float             # seconds / line_seconds
    reasons: tuple[str, ...]      # why not ok (empty when ok)


def verdict(*, nodes: int, ppn: int, bytes_per_rank: int, rounds: int, rate_bps: float,
            seconds: float, tx_bytes: list[int]) -> Verdict:
    """Judges one probe: `rounds` all-to-alls (warm-up included) were made while the counters
    ran; `seconds` is one exchange (the slowest rank's median); tx_bytes[i] is node i's veth
    TX counter difference over the probe."""
    if len(tx_bytes) != nodes:
        raise ValueError(f"{len(tx_bytes)} counters for {nodes} nodes")
    per_round = inter_node_bytes(nodes, ppn, bytes_per_rank)
    expected = per_round * rounds
    low = min(tx_bytes)
    line = line_seconds(per_round, rate_bps)
    c_ratio = low / expected if expected else float("inf")
    t_ratio = seconds / line if line else float("inf")
    reasons = []
    if nodes < 2:
        reasons.append("one node: nothing crosses the link, so the cap cannot be checked")
    if expected and c_ratio < MIN_COUNTER_FRACTION:
        reasons.append(
            f"BYPASS: the veth of node {tx_bytes.index(low)} transmitted {low} B but its ranks "
            f"sent {expected} B to other nodes ({c_ratio:.3f} < {MIN_COUNTER_FRACTION}): the "
            f"data took another path (shared memory between namespaces?)")
    if line and t_ratio < MIN_TIME_FRACTION:
        reasons.append(
            f"BYPASS: one all-to-all took {seconds * 1e3:.2f} ms, but its {per_round} B per node "
            f"need {line * 1e3:.2f} ms at {rate_bps / 1e6:g} Mbit/s ({t_ratio:.3f} < "
            f"{MIN_TIME_FRACTION}): the cap is not in the path")
    return Verdict(not reasons, expected, low, c_ratio, line, seconds, t_ratio, tuple(reasons))


def describe(v: Verdict) -> str:
    """One paragraph for the log: the figures, then OK or each reason."""
    head = (f"link check: {v.seconds * 1e3:.2f} ms per all-to-all vs {v.line_seconds * 1e3:.2f} "
            f"ms at line rate (x{v.time_ratio:.2f}); veth TX {v.min_tx_bytes} B vs "
            f"{v.expected_node_bytes} B sent off-node (x{v.counter_ratio:.3f})")
    return head + (": OK, the capped link is in the path" if v.ok else
                   "\n" + "\n".join(f"  {r}" for r in v.reasons))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ppn", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True, help="bytes one rank sends per exchange")
    p.add_argument("--rounds", type=int, required=True, help="exchanges made (warm-up included)")
    p.add_argument("--rate", required=True, help="the tc rate, e.g. 200mbit")
    p.add_argument("--seconds", type=float, required=True, help="one exchange, measured")
    p.add_argument("--tx", required=True, help="comma-separated veth TX byte deltas, per node")
    p.add_argument("--json", default=None, help="also write the verdict here")
    a = p.parse_args(argv)
    v = verdict(nodes=a.nodes, ppn=a.ppn, bytes_per_rank=a.bytes, rounds=a.rounds,
                rate_bps=parse_rate(a.rate), seconds=a.seconds,
                tx_bytes=[int(x) for x in a.tx.split(",")])
    print(describe(v), file=sys.stdout if v.ok else sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(asdict(v), f, indent=1)
            f.write("\n")
    return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
