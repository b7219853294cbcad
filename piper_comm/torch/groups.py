"""Which Piper communicator serves a torch process group (or None, or a Communicator).

A "piper" process group carries its own communicator. Any other group (gloo, nccl) gets one
built on first use over torch point-to-point and cached; without torch.distributed at all,
the process-wide communicator of `piper_comm.init()` is used. Building one is collective:
every rank of the group reaches it at the same call, as with any collective.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..bootstrap import connect, init
from ..communicator import Communicator
from ..transport import TorchTransport

_by_group: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_process_comm: Communicator | None = None


def resolve(comm: Any = None) -> Communicator:
    """A Communicator for `comm`: a Communicator, a torch ProcessGroup, or None (the default
    process group when torch.distributed is initialised, else `piper_comm.init()`)."""
    global _process_comm
    if isinstance(comm, Communicator):
        return comm
    import torch.distributed as dist

    if comm is None:
        if not (dist.is_available() and dist.is_initialized()):
            if _process_comm is None:
                _process_comm = init()
            return _process_comm
        comm = dist.group.WORLD
    own = getattr(comm, "piper_communicator", None)
    if own is not None:
        return own
    if comm not in _by_group:
        group = None if comm is dist.group.WORLD else comm
        _by_group[comm] = connect(TorchTransport(group))
    return _by_group[comm]
