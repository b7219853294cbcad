"""The pipeline runtime: the process mesh (mesh.py), the schedules (schedules.py) and the
engine that runs one rank's schedule (engine.py)."""
