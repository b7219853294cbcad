"""python -m piper_moe.train: see piper_moe/train/main.py."""

import sys

from .main import main

sys.exit(main())
