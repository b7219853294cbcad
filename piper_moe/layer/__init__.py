"""The MoE layer: MoEConfig (no torch needed) and MoELayer (imported on first use, so that
importing piper_moe stays light and starts nothing distributed)."""

from .config import MoEConfig

__all__ = ["MoEConfig", "MoELayer"]


def __getattr__(name: str):
    if name == "MoELayer":
        from .moe import MoELayer

        return MoELayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
