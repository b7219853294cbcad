"""Pipeline schedules as per-rank action lists: GPipe, 1F1B, interleaved 1F1B and ZB-H1.

A schedule is a list (one per pipeline rank) of `Action(kind, stage, mb)`:
    "F": forward of micro-batch `mb` through virtual stage `stage`;
    "B": backward of it (input and weight gradients; with ZB-H1 only the input gradient);
    "W": ZB-H1 only, the weight gradient of a "B" done earlier on the same rank.
Virtual stage v (0 .. pp * vpp - 1) runs on pipeline rank v % pp (Megatron's interleaved
layout: rank r holds stages r, r + pp, r + 2 pp, ...); activations flow v -> v + 1 and
gradients v + 1 -> v.

Why Piper builds its own lists instead of torch.distributed.pipelining's schedule classes: the
MoE layers inside a stage run collectives (the expert-parallel all-to-all and the balancing
statistics) across the data-parallel replicas of that stage, so every replica of a stage must
execute exactly the same action order, and the runtime interleaves those collectives with
its own point-to-point traffic and (later) asynchronous all-to-all; torch's classes own the
p2p and the loop and expose no such hook. What does serve, the split of a backward into an
input part and a weight part for ZB-H1, is taken from torch (see engine.py).

`simulate` runs a schedule under unit costs and returns its makespan and bubble; the tests
use it to check that a schedule is valid (no deadlock: every dependency is met) and that the
schedules differ the way the papers say (interleaving and ZB-H1 shrink the bubble).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common import SCHEDULES


@dataclass(frozen=True)
class Action:
    kind: str   # "F" | "B" | "W"
    stage: int  # virtual stage
    mb: int     # micro-batch

    def __repr__(self) -> str:
        return f"{self.kind}{self.stage}.{self.mb}"


def build(name: str, pp: int, num_micro: int, vpp: int = 1) -> list[list[Action]]:
    """The action list of every pipeline rank (index = rank) for schedule `name`.

    pp: pipeline ranks; num_micro: micro-batches per step; vpp: virtual stages per rank
    (interleaved only; the others need vpp == 1). Interleaved needs num_micro % pp == 0.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    if pp < 1 or num_micro < 1 or vpp < 1:
        raise ValueError(f"schedule {name}: pp, num_micro and vpp must be >= 1 "
                         f"(got {pp}, {num_micro}, {vpp})")
    if name != "interleaved" and vpp != 1:
        raise ValueError(f"schedule {name} runs one stage per rank (vpp=1), got vpp={vpp}; "
                         f"use schedule 'interleaved' for several")
    if name == "gpipe":
        return [_gpipe(r, num_micro) for r in range(pp)]
    if name == "1f1b":
        return [_one_f_one_b(r, pp, num_micro) for r in range(pp)]
    if name == "zb-h1":
        return _zb_h1_all(pp, num_micro)
    if num_micro % pp:
        raise ValueError(f"interleaved schedule: num_micro={num_micro} must be a multiple of "
                         f"pp={pp}")
    return [_interleaved(r, pp, num_micro, vpp) for r in range(pp)]


def _gpipe(r: int, M: int) -> list[Action]:
    return [Action("F", r, m) for m in range(M)] + [Action("B", r, m) for m in range(M)]


def _one_f_one_b(r: int, pp: int, M: int) -> list[Action]:
    warmup = min(pp - r - 1, M)
    acts = [Action("F", r, m) for m in range(warmup)]
    f, b = warmup, 0
    while f < M:
        acts += [Action("F", r, f), Action("B", r, b)]
        f, b = f + 1, b + 1
    acts += [Action("B", r, m) for m in range(b, M)]
    return acts


def _zb_h1_all(pp: int, M: int) -> list[list[Action]]:
    """1F1B's F/B order with each backward split in B (input gradient, on the critical path)
    and W (weight gradient, off it), the W passes placed where a rank would otherwise wait:
    a unit-cost list-scheduling pass over all ranks at once (the zero-bubble papers' greedy
    heuristic, Qi et al. 2024). Rank r never holds more than pp - r micro-batches whose W is
    not done, which is 1F1B's activation memory: the H1 ("same memory") variant. Under unit
    costs (F = B = W) a step takes 3 M + 2 (pp - 1), two thirds of 1F1B's bubble. Returns one
    action list per rank. Why not the paper's looser bound (pp for every rank):
    docs/performance.md, "Pipeline schedules"."""
    queues = [_one_f_one_b(r, pp, M) for r in range(pp)]
    acts: list[list[Action]] = [[] for _ in range(pp)]
    done: dict[tuple[str, int, int], int] = {}
    pos, pending, held = [0] * pp, [[] for _ in range(pp)], [0] * pp
    t = 0
    while any(pos[r] < len(queues[r]) or pending[r] for r in range(pp)):
        finished = []
        for r in range(pp):
            nxt = queues[r][pos[r]] if pos[r] < len(queues[r]) else None
            ready = nxt is not None and all(
                done.get(d, t + 1) <= t for d in _deps(nxt, pp))
            if ready and nxt.kind == "F" and held[r] >= pp - r:
                ready = False  # memory bound: a W must run first
            if ready:
                acts[r].append(nxt)
                pos[r] += 1
                if nxt.kind == "F":
                    held[r] += 1
                else:
                    pending[r].append(nxt.mb)
                finished.append((nxt.kind, nxt.stage, nxt.mb))
            elif pending[r]:
                mb = pending[r].pop(0)
                acts[r].append(Action("W", r, mb))
                held[r] -= 1
        for key in finished:
            done[key] = t + 1
        t += 1
        if t > 10 * pp * M + 10:
            raise AssertionError("zb-h1 construction did not finish")
    return acts


def _deps(a: Action, num_stages: int) -> list[tuple[str, int, int]]:
    """What must finish before `a` starts (data dependencies only)."""
    if a.kind == "F":
        return [("F", a.stage - 1, a.mb)] if a.stage else []
    if a.kind == "B":
        up = [("B", a.stage + 1, a.mb)] if a.stage + 1 < num_stages else []
        return [("F", a.stage, a.mb), *up]
    return [("B", a.stage, a.mb)]


def _interleaved(r: int, pp: int, M: int, vpp: int) -> list[Action]:
    """Megatron's interleaved 1F1B: forwards in groups of pp micro-batches per chunk, chunk by
    chunk; backwards the same with chunks in reverse order."""
    total = M * vpp

    def fwd(k: int) -> Action:
        chunk = (k // pp) % vpp
        mb = (k // (pp * vpp)) * pp + k % pp
        return Action("F", chunk * pp + r, mb)

    def bwd(k: int) -> Action:
        chunk = vpp - 1 - (k // pp) % vpp
        mb = (k // (pp * vpp)) * pp + k % pp
        return Action("B", chunk * pp + r, mb)

    warmup = min((pp - r - 1) * 2 + (vpp - 1) * pp, total)
    acts = [fwd(k) for k in range(warmup)]
    f, b = warmup, 0
    while f < total:
        acts += [fwd(f), bwd(b)]
        f, b = f + 1, b + 1
    acts += [bwd(k) for k in range(b, total)]
    return acts


@dataclass
class SimResult:
    makespan: float
    bubble: float           # idle fraction of the pipeline ranks over the makespan
    peak_in_flight: list[int]  # per rank: most forwards held (F done, B not yet)


def simulate(schedule: list[list[Action]], num_stages: int, cost_f: float = 1.0,
             cost_b: float = 2.0, cost_w: float = 0.0) -> SimResult:
    """Runs the per-rank lists in order under unit costs (F, B, W; B includes W when the
    schedule has no W actions) with free communication. Raises ValueError naming the stuck
    actions if the schedule deadlocks or is incomplete (each (stage, mb) must have one F, one
    B, and one W when the schedule uses W)."""
    pp = len(schedule)
    has_w = any(a.kind == "W" for acts in schedule for a in acts)
    if not has_w:
        cost_b += cost_w
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    pos = [0] * pp
    busy = [0.0] * pp
    held = [0] * pp
    peak = [0] * pp
    M = 1 + max(a.mb for acts in schedule for a in acts)
    for r, acts in enumerate(schedule):
        seen = {(a.kind, a.stage, a.mb) for a in acts}
        if len(seen) != len(acts):
            raise ValueError(f"rank {r}: an action appears twice")
        if any(a.stage % pp != r for a in acts):
            raise ValueError(f"rank {r}: holds a stage of another rank")
    need = {(k, v, m) for v in range(num_stages) for m in range(M)
            for k in (("F", "B", "W") if has_w else ("F", "B"))}
    have = {(a.kind, a.stage, a.mb) for acts in schedule for a in acts}
    if have != need:
        raise ValueError(f"schedule incomplete or extra actions: missing "
                         f"{sorted(need - have)[:5]}, extra {sorted(have - need)[:5]}")

    cost = {"F": cost_f, "B": cost_b, "W": cost_w}
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule[r]):
                a = schedule[r][pos[r]]
                ready = [done.get(d) for d in _deps(a, num_stages)]
                if any(t is None for t in ready):
                    break
                start = max([clock[r], *ready])
                clock[r] = start + cost[a.kind]
                busy[r] += cost[a.kind]
                done[(a.kind, a.stage, a.mb)] = clock[r]
                held[r] += 1 if a.kind == "F" else (-1 if a.kind == "B" else 0)
                peak[r] = max(peak[r], held[r])
                pos[r] += 1
                progressed = True
    stuck = [schedule[r][pos[r]] for r in range(pp) if pos[r] < len(schedule[r])]
    if stuck:
        raise ValueError(f"schedule deadlocks: ranks wait at {stuck}")
    makespan = max(clock)
    bubble = 1.0 - sum(busy) / (pp * makespan)
    return SimResult(makespan, bubble, peak)
