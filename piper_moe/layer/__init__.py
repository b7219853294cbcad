"""The MoE layer: MoEConfig (no torch needed), MoELayer and the expert rebalancing tools
(LoadTracker, plan_swaps, apply_swaps, migrate), imported on first use, so that importing
piper_moe stays light and starts nothing distributed."""

from .config import MoEConfig, MoEOptions

__all__ = ["LoadTracker", "MoEConfig", "MoELayer", "MoEOptions", "apply_swaps", "migrate",
           "plan_swaps"]
_REBALANCE = ("LoadTracker", "apply_swaps", "migrate", "plan_swaps")


def __getattr__(name: str):
    if name == "MoELayer":
        from .moe import MoELayer

        return MoELayer
    if name in _REBALANCE:
        from . import rebalance

        return getattr(rebalance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
