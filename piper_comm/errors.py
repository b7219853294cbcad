"""Piper's exceptions. Every message names the operation, this rank, the peer(s) and sizes."""

__all__ = [
    "PiperError",
    "PiperPeerError",
    "PiperSystemError",
    "PiperTimeoutError",
    "PiperUsageError",
]


class PiperError(RuntimeError):
    """Base class of every error Piper raises."""


class PiperUsageError(PiperError, ValueError):
    """Bad input (counts, dtypes, shapes, buffers). Raised on every rank of the collective,
    before any data moved; the communicator stays usable."""


class PiperTimeoutError(PiperError, TimeoutError):
    """A blocking wait passed its deadline (PIPER_TIMEOUT). The communicator is unusable."""


class PiperPeerError(PiperError):
    """A peer process died. The communicator is unusable."""


class PiperSystemError(PiperError, OSError):
    """A system call failed (shared memory, mmap, ...)."""
