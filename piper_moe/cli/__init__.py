"""The command-line tools: `python -m piper_moe.train` (train.py; the training job),
`python -m piper_moe.cli.plan` (rank parallel strategies by the resource model) and
`python -m piper_moe.cli.calibrate` (measure a host into a platform YAML)."""
