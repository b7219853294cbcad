"""The array kinds Piper moves (numpy arrays, torch tensors, CUDA arrays) as the C++ core sees
them.

An array is seen as `rows` rows of `row_bytes` bytes each: dim 0 is split between ranks, any
trailing shape is carried along. csrc/python/args.cpp reads arrays without copying; this module
gives it what needs Python: the stable dtype ids that ranks compare (DTYPE_NAMES), and new
receive arrays (`new_rows`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import _C
from .errors import PiperUsageError

# Stable ids for the per-call header; names are numpy's and torch's common spellings.
DTYPE_NAMES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "complex32",
)
DTYPE_IDS = {name: i + 1 for i, name in enumerate(DTYPE_NAMES)}

# Local-check codes (csrc/runtime/call.hpp), worded by validate.py: E_NONE, E_TYPE, ...
globals().update({f"E_{name}": code for name, code in _C.LOCAL_ERRORS.items()})


def _torch():
    """torch if the program imported it (a tensor implies it did); never imports it, which
    would cost seconds on the first call."""
    return sys.modules.get("torch")


def dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, np.dtype('<f4') or torch.float32."""
    text = str(dtype)
    return text[len("torch."):] if text.startswith("torch.") else np.dtype(dtype).name


def dtype_info(dtype: Any) -> tuple[int, int]:
    """(DTYPE_IDS id or 0 when unknown, itemsize in bytes) of a numpy or torch dtype. Called
    once per dtype object by the C++ argument parser, which caches the answer."""
    torch = _torch()
    if torch is not None and isinstance(dtype, torch.dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
    else:
        itemsize = np.dtype(dtype).itemsize
    return DTYPE_IDS.get(dtype_name(dtype), 0), itemsize


def caller_stream(like: Any) -> Any:
    """The stream object a call on `like` is ordered on (torch's or CuPy's current stream of
    like's device, read on the calling thread), or None for host arrays: what an async call
    hands to new_rows, whose allocation runs on the communicator's worker thread."""
    torch = _torch()
    if torch is not None and isinstance(like, torch.Tensor):
        return torch.cuda.current_stream(like.device) if like.is_cuda else None
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(like, cupy.ndarray):
        with like.device:
            return cupy.cuda.get_current_stream()
    return None


def new_rows(like: Any, rows: int, stream: Any = None) -> Any:
    """A new uninitialised array of `rows` rows with like's dtype, trailing shape, kind and
    device (numpy array, torch tensor on CPU or CUDA, CuPy array). Called by the C++ call path
    when no recv was given. The allocation is ordered on `stream` (caller_stream's result) or,
    when None, on this thread's current stream: torch's caching allocator and CuPy's pool tie
    a block to the stream it was allocated on, so the caller's stream must be named when this
    runs on another thread (async calls)."""
    shape = (rows, *like.shape[1:])
    torch = _torch()
    if torch is not None and isinstance(like, torch.Tensor):
        if stream is None:
            return like.new_empty(shape)
        with torch.cuda.stream(stream):
            return like.new_empty(shape)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(like, cupy.ndarray):
        with like.device, (stream if stream is not None else cupy.cuda.get_current_stream()):
            return cupy.empty(shape, dtype=like.dtype)
    if hasattr(like, "__cuda_array_interface__"):
        raise PiperUsageError("piper: pass recv for CUDA arrays other than torch tensors and "
                              f"CuPy arrays (got {type(like).__name__}): Piper cannot allocate "
                              "one like it")
    return np.empty(shape, dtype=like.dtype)
