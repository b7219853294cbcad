"""Piper MoE runtime: MoE layer, pipeline runtime, resource model and planner."""
