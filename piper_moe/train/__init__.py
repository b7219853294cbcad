"""Training: atomic multi-rank checkpoints (checkpoint.py) and the training loop."""
