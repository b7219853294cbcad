"""Resource model and planner for MoE training: memory, compute and communication of a parallel
strategy on a platform. The formulas: docs/resource_model.md.

    from piper_moe.resource_model import load_model, load_platform, Strategy, estimate, plan
    m = load_model("deepseek-v3"); p = load_platform("dgx-h100")
    e = estimate(m, p, Strategy(dp=8, tp=8, pp=16, ep=64, micro_batch=1, global_batch=2048,
                                seq_len=4096, recompute="full"))
    e.memory["total"], e.time["step"], e.mfu, e.fits, e.bottleneck
"""

from .estimate import Estimate, estimate
from .planner import PlanResult, plan
from .spec import ModelSpec, PlatformSpec, load_model, load_platform
from .strategy import Strategy

__all__ = [
    "Estimate",
    "ModelSpec",
    "PlanResult",
    "PlatformSpec",
    "Strategy",
    "estimate",
    "load_model",
    "load_platform",
    "plan",
]
