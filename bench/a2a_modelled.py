"""MODELLED (not measured) all-to-all time of HALO vs flat on multi-node GPU platforms.

No multi-node or multi-GPU machine exists here, so this is what Piper's alpha-beta model
(`piper_comm/cost.py`, the one `algorithm="auto"` uses, in its uniform case through
`piper_moe/resource_model/comm.py`) predicts from a shipped platform file (public figures, plus the
latencies marked [I] in it, which are our assumptions), for 8 GPUs per node and 1-128 nodes.
Only CPU hosts were ever measured against it (bench/results/a2a_validation.md, made with an
earlier HALO formula, the two-phase exchange the executor does not run); the GPU figures below
are predictions.

    .venv/bin/python bench/a2a_modelled.py                 # dgx-h100 and frontier
    .venv/bin/python bench/a2a_modelled.py --platform my-calibrated.yaml --out -

Prints, per platform, the predicted speed-up of HALO over flat (t_flat / t_halo, > 1: HALO
faster) for each size a rank sends (m bytes, m / n to every rank) and node count, the
predicted busbw (nccl-tests: m / t * (n - 1) / n) of the faster one, and the crossover size
above which flat is predicted faster.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piper_moe.resource_model import load_platform  # noqa: E402
from piper_moe.resource_model.comm import a2a_flat, a2a_halo, cost_links  # noqa: E402

NODES = (1, 2, 4, 8, 16, 32, 64, 128)
SIZES = tuple(2**k for k in range(13, 31, 2))  # 8 KiB .. 1 GiB per rank, factor 4


def _size(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.3g} {unit}"
    return f"{b:.3g} B"


def _crossover(platform, n: int, g: int) -> str:
    """Smallest size (bytes per rank, bisection over 1 B .. 64 GiB) at which flat is predicted
    at least as fast as HALO; '-' when HALO is faster over the whole range."""
    lo, hi = 1.0, float(2**36)
    if a2a_flat(hi, n, g, platform) > a2a_halo(hi, n, g, platform):
        return "-"
    if a2a_flat(lo, n, g, platform) <= a2a_halo(lo, n, g, platform):
        return "always flat"
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        if a2a_flat(mid, n, g, platform) <= a2a_halo(mid, n, g, platform):
            hi = mid
        else:
            lo = mid
    return _size(hi)


def table(name: str) -> str:
    p = load_platform(name)
    g = p.devices_per_node
    out = [f"## {p.name} ({p.device}, {g} per node): MODELLED, not measured",
           f"# platform: {name} (piper_moe/configs/platforms or a path); intra: "
           f"{p.intra.latency * 1e6:g} us + {p.intra.bandwidth / 1e9:g} GB/s, inter: "
           f"{p.inter.latency * 1e6:g} us + {p.inter.bandwidth / 1e9:g} GB/s per rank, "
           f"copies {p.copy_bandwidth / 1e9:g} GB/s, node barrier "
           f"{cost_links(p).alpha_barrier * 1e6:g} us",
           "# cell: t_flat / t_halo (> 1: HALO predicted faster)"]
    head = f"{'size per rank':>14} |" + "".join(f" {f'{N} node' + ('s' if N > 1 else ''):>9}"
                                                for N in NODES)
    out += [head, "-" * len(head)]
    for m in SIZES:
        cells = []
        for N in NODES:
            n = N * g
            tf, th = a2a_flat(m, n, g, p), a2a_halo(m, n, g, p)
            cells.append(f" {tf / th:9.2f}")
        out.append(f"{_size(m):>14} |" + "".join(cells))
    out.append("")
    out.append(f"{'nodes':>6} {'ranks':>6} {'crossover (flat faster from)':>30} "
               f"{'busbw at 1 MiB':>16} {'busbw at 64 MiB':>16}")
    for N in NODES[1:]:
        n = N * g
        bw = []
        for m in (2**20, 2**26):
            t = min(a2a_flat(m, n, g, p), a2a_halo(m, n, g, p))
            bw.append(f"{m / t * (n - 1) / n / 1e9:12.1f} GB/s")
        out.append(f"{N:>6} {n:>6} {_crossover(p, n, g):>30} {bw[0]:>16} {bw[1]:>16}")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--platform", action="append",
                    help="shipped platform name or YAML path (repeatable; default: dgx-h100, "
                         "frontier)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/a2a_modelled.txt"),
                    help="output file, '-' for stdout only")
    args = ap.parse_args(argv)
    names = args.platform or ["dgx-h100", "frontier"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    text = "\n".join([
        "# MODELLED all-to-all, HALO vs flat: predictions of piper_comm/cost.py (uniform case, "
        "through", "# piper_moe/resource_model/comm.py), NOT measurements",
        f"# command: python bench/a2a_modelled.py {' '.join(argv or sys.argv[1:])}".rstrip(),
        f"# date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}  commit: {commit}",
        "# model: alpha-beta per link level; HALO as the executor runs it (pack into the node "
        "segment,", "# two node barriers, one message per remote node, copy-out); every "
        "message pays its latency in", "# turn (no overlap of message latencies, which favours "
        "HALO at small sizes), no congestion, no", "# NIC or switch contention, no kernel-launch "
        "or per-call software overhead. Only CPU hosts were", "# measured against the model "
        "(bench/results/a2a_validation.md, made with the earlier two-phase", "# HALO formula)",
        ""]
        + [table(n) + "\n" for n in names])
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
