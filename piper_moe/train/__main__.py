"""python -m piper_moe.train: see piper_moe/train/main.py (CLI), trainer.py, launch.py."""

from .main import finish, main

finish(main())
