"""Single-process tests of the training pieces: data sources and checkpoints."""
