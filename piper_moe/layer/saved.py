"""Counting what autograd keeps for backward: the bytes a forward leaves alive until its
backward (activation memory), as the resource model's memory formulas predict them.

    with SavedTensors(exclude=layer.parameters()) as saved:
        y = layer(x)
    saved.bytes        # storages saved for backward, each counted once, parameters excluded
    saved.host_bytes   # of which host copies made by chunk_memory="offload" (layer/chunk_memory)

Counts tensors saved through ``save_for_backward`` and by built-in ops (what
``torch.autograd.graph.saved_tensors_hooks`` sees), not tensors a custom Function keeps as a
plain ``ctx`` attribute (the chunked layer's int64 row maps). A storage counts once, at its
full size, however many views of it are saved. Local: no communication; the block may contain
collectives (then every rank runs it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensors:
    """Context manager; see the module docstring. ``exclude``: tensors (e.g. parameters)
    whose storages are not counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._sizes: dict[int, int] = {}
        self._host: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a wrapper subclass with no storage of its own (torch's
            # AsyncCollectiveTensor, e.g. in a peer layer): counted at its own size
            ptr, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
        if ptr not in self._excluded:
            self._sizes[ptr] = max(self._sizes.get(ptr, 0), nbytes)
            if getattr(t, "_piper_offloaded", False):
                self._host.add(ptr)
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def host_bytes(self) -> int:
        return sum(self._sizes[p] for p in self._host)

    @property
    def storages(self) -> int:
        return len(self._sizes)
