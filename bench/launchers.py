"""Where the bench scripts find their launchers and tools (run as `python bench/<script>.py`,
this folder is on sys.path): beside this Python first (the repo's .venv), else on PATH (the
GPU machine's carried wheels install there). tests/launch.py does the same for the tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The path of `name` (mpirun, torchrun, py-spy, ...) beside this Python, else on PATH, else
    the bare name (the launch then fails naming it)."""
    return shutil.which(name, path=str(BIN)) or shutil.which(name) or name


MPIRUN = tool("mpirun")
