"""Turns numpy arrays and torch CPU tensors into raw bytes without copying.

An array is seen as `rows` rows of `row_bytes` bytes each: dim 0 is split between ranks, any
trailing shape is carried along. The dtype is identified by a small integer (DTYPE_NAMES) so
that ranks can compare dtypes in the per-call metadata.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# Stable ids for the metadata exchange; names are numpy's and torch's common spellings.
DTYPE_NAMES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "complex32",
)
DTYPE_IDS = {name: i + 1 for i, name in enumerate(DTYPE_NAMES)}

# Error codes found by local checks; validate.py turns them into one message on every rank.
(E_NONE, E_TYPE, E_NONCONTIG, E_DEVICE, E_NDIM, E_RECV_TYPE, E_RECV_NONCONTIG,
 E_RECV_DTYPE) = range(8)
E_COUNTS_LEN, E_COUNTS_NEG, E_COUNTS_SUM, E_ROWS_DIV, E_RCOUNTS_LEN, E_RCOUNTS_NEG = range(8, 14)
E_ALGORITHM, E_COUNTS_TYPE, E_RECV_ROWS = 14, 15, 16


def _torch():
    """torch if the program imported it (a tensor implies it did); never imports it, which
    would cost seconds on the first call."""
    return sys.modules.get("torch")


_NAMES: dict[Any, str] = {}  # dtype object -> name (numpy's .name costs microseconds)


def dtype_name(dtype: Any) -> str:
    """'float32' for np.float32, np.dtype('<f4') or torch.float32."""
    name = _NAMES.get(dtype)
    if name is None:
        text = str(dtype)
        name = _NAMES[dtype] = (text[len("torch."):] if text.startswith("torch.")
                                else np.dtype(dtype).name)
    return name


@dataclass
class ArrayView:
    """A contiguous array seen as bytes. `data` aliases the array's memory (uint8, flat)."""

    array: Any            # the caller's object (numpy array or torch tensor)
    data: np.ndarray      # uint8 view of the same memory, shape [rows * row_bytes]
    kind: str             # "numpy" | "torch"
    dtype: str            # dtype name, e.g. "bfloat16"
    trailing: tuple       # shape[1:]
    rows: int             # shape[0]
    row_bytes: int        # bytes per row (itemsize * prod(trailing))

    @property
    def address(self) -> int:
        return self.data.__array_interface__["data"][0]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def dtype_id(self) -> int:
        return DTYPE_IDS.get(self.dtype, 0)


def view(array: Any) -> tuple[ArrayView | None, int, int]:
    """Returns (view, error_code, error_arg); view is None when the array cannot be used."""
    torch = _torch()
    if isinstance(array, np.ndarray):
        if array.ndim == 0:
            return None, E_NDIM, 0
        if not array.flags.c_contiguous:
            return None, E_NONCONTIG, 0
        data = array.reshape(-1).view(np.uint8)
        kind, dtype = "numpy", dtype_name(array.dtype)
    elif torch is not None and isinstance(array, torch.Tensor):
        if array.device.type != "cpu":
            return None, E_DEVICE, 0
        if array.dim() == 0:
            return None, E_NDIM, 0
        if not array.is_contiguous():
            return None, E_NONCONTIG, 0
        data = array.detach().reshape(-1).view(torch.uint8).numpy()
        kind, dtype = "torch", dtype_name(array.dtype)
    elif hasattr(array, "__cuda_array_interface__"):
        return None, E_DEVICE, 0
    else:
        return None, E_TYPE, 0
    shape = tuple(array.shape)
    trailing = shape[1:]
    itemsize = array.element_size() if kind == "torch" else array.itemsize
    row_bytes = itemsize * math.prod(trailing)
    return ArrayView(array, data, kind, dtype, trailing, shape[0], row_bytes), 0, 0


def empty_like_rows(like: ArrayView, rows: int) -> ArrayView:
    """A new array of `rows` rows with like's dtype, trailing shape and kind."""
    shape = (rows, *like.trailing)
    if like.kind == "torch":
        torch = _torch()
        out = torch.empty(shape, dtype=like.array.dtype, device="cpu")
    else:
        out = np.empty(shape, dtype=like.array.dtype)
    v, err, _ = view(out)
    assert v is not None and err == 0
    return v


def head_rows(v: ArrayView, rows: int) -> Any:
    """The first `rows` rows of the caller's array, as a view (no copy)."""
    return v.array if rows == v.rows else v.array[:rows]
