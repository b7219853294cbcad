"""`python -m piper_moe.train`: the training command line (piper_moe/cli/train.py)."""

from ..cli.train import main
from .launch import finish

finish(main())
