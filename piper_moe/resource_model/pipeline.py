"""Pipeline schedules: micro-batches in flight per stage (memory) and the bubble (time).

P = pp stages, m = micro-batches per step, v = vpp virtual chunks per rank, stage s in [0, P).

In flight (activations of whole micro-batches a stage holds at its peak, in units of the stage's
layers):
- gpipe: m (all forwards before any backward);
- 1f1b and zb-h1: min(P - s, m) (Piper's ZB-H1 never holds more micro-batches without their W
  than 1F1B holds without their B; at its peak one of them is between B and W and also holds
  its weights' output gradients: ``memory.weight_grad_inputs``);
- interleaved: Megatron's warm-up, min(m*v, 2*(P - s - 1) + (v - 1)*P + 1) chunk micro-batches
  of 1/v of the stage's layers each.

Bubble (idle time of a stage per step), with t_f, t_b the forward and backward time of one
micro-batch on the slowest stage and t_w the weight-gradient part of t_b:
- gpipe, 1f1b: (P - 1) * (t_f + t_b);
- interleaved: (P - 1) * (t_f + t_b) / v;
- zb-h1: (P - 1) * (t_f + t_b - t_w): the runtime's ZB-H1 (runtime/schedules.py) takes W off
  the critical path, two thirds of 1F1B's bubble at F = B = W. The ZB paper's ZB-H1 (arXiv
  2401.10241: (p-1)(T_F+T_B-T_W) with T_B the input-gradient part, a third) lets later stages
  defer more W passes than Piper's memory bound allows (docs/performance.md, "Pipeline schedules").
"""

from __future__ import annotations

from .strategy import Strategy


def in_flight(s: Strategy, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak (stage-layer units)."""
    m, p, v = s.num_micro, s.pp, s.vpp
    if not 0 <= stage < p:
        raise ValueError(f"stage ({stage}) must be in [0, pp={p})")
    if s.schedule == "gpipe":
        return float(m)
    if s.schedule == "interleaved":
        chunks = min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1)
        return chunks / v
    return float(min(p - stage, m))


def bubble(s: Strategy, t_f: float, t_b: float, t_w: float) -> float:
    """Pipeline bubble per step (seconds) from per-micro-batch forward ``t_f``, backward ``t_b``
    (seconds, slowest stage) and the weight-gradient part ``t_w`` of ``t_b``."""
    p = s.pp
    if p == 1:
        return 0.0
    if s.schedule == "interleaved":
        return (p - 1) * (t_f + t_b) / s.vpp
    if s.schedule == "zb-h1":
        return (p - 1) * max(0.0, t_f + t_b - t_w)
    return (p - 1) * (t_f + t_b)
