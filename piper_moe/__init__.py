"""Piper MoE runtime: MoE layer, pipeline runtime, resource model and planner."""

from .layer import MoEConfig, MoEOptions

__all__ = ["MoEConfig", "MoELayer", "MoEOptions"]


def __getattr__(name: str):
    if name == "MoELayer":  # imported on first use: `import piper_moe` needs no torch
        from .layer.moe import MoELayer

        return MoELayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
