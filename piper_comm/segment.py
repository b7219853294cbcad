"""The node-shared segment of HALO, or a private stand-in on a node of one rank."""

from __future__ import annotations

import numpy as np

from . import _C


class PrivateSegment:
    """Same interface as _C.NodeChannel for a node with a single rank: no sharing, no waits."""

    def __init__(self, world_size: int):
        self._rows = np.zeros((2, 1, world_size), dtype=np.int64)
        self._data = np.empty(0, dtype=np.uint8)

    def barrier(self, what: str, timeout_s: float) -> None:
        pass

    def set_progress(self, progress) -> None:
        pass

    def publish_row(self, parity: int, row: np.ndarray) -> None:
        self._rows[parity & 1, 0] = row

    def read_rows(self, parity: int, world_size: int) -> np.ndarray:
        return self._rows[parity & 1].copy()

    def ensure_data(self, nbytes: int, what: str, timeout_s: float) -> bool:
        if nbytes <= self._data.size:
            return False
        self._data = np.empty(max(nbytes, 2 * self._data.size), dtype=np.uint8)
        return True

    @property
    def data_address(self) -> int:
        return int(self._data.ctypes.data)

    @property
    def data_bytes(self) -> int:
        return int(self._data.size)

    def data_view(self):
        return memoryview(self._data)

    def unlink(self) -> None:
        pass

    def close(self) -> None:
        self._data = np.empty(0, dtype=np.uint8)


def node_segment(prefix: str, local_rank: int, local_ranks: list[int], world_size: int,
                 create: bool):
    """A _C.NodeChannel over POSIX shared memory (see csrc/host/node_channel.hpp)."""
    return _C.NodeChannel(prefix, local_rank, local_ranks, world_size, create)
