"""TokenFile: a user's pre-tokenised corpus, a flat binary stream of token ids (memory-mapped)."""

from __future__ import annotations

import os

import numpy as np

from .counter import counter_bits


class TokenFile:
    """Random windows of a flat token file, with the same batch contract as MarkovSource.

    TokenFile(path, vocab, dtype="uint16", seed=0)
        path: a file of native-endian integers, one token id each (e.g. written with
            np.ndarray.tofile); vocab: ids must lie in [0, vocab), checked per batch;
        dtype: an integer numpy dtype whose size divides the file size.
        seed: int >= 0; window offsets are functions of (seed, sequence index).

    The file is mapped read-only, never loaded whole; batch() reads only its windows.
    """

    def __init__(self, path, vocab: int, dtype="uint16", seed: int = 0):
        self.path, self.vocab, self.seed = os.fspath(path), vocab, seed
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"{self.path}: dtype must be an integer type, got {self.dtype}")
        if not isinstance(vocab, int) or vocab < 2:
            raise ValueError(f"vocab must be an int >= 2, got {vocab!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        size = os.path.getsize(self.path)
        if size % self.dtype.itemsize:
            raise ValueError(f"{self.path}: size {size} bytes is not a multiple of the "
                             f"{self.dtype.itemsize}-byte dtype {self.dtype}")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens < 2:
            raise ValueError(f"{self.path}: holds {self.num_tokens} tokens; need at least 2")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def batch(self, first: int, count: int, seq_len: int) -> np.ndarray:
        """Windows for sequences first .. first+count-1: int64 [count, seq_len + 1].

        Sequence g starts at an offset in [0, num_tokens - seq_len - 1] that depends on
        (seed, g) only. Raises ValueError naming the file and offset of an id outside
        [0, vocab).
        """
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        starts = self.num_tokens - seq_len  # number of valid window offsets
        if starts < 1:
            raise ValueError(f"{self.path}: holds {self.num_tokens} tokens, too short for one "
                             f"sequence of seq_len + 1 = {seq_len + 1} tokens")
        offset = counter_bits(self.seed, first, count, 1)[:, 0] % np.uint64(starts)
        index = offset.astype(np.int64)[:, None] + np.arange(seq_len + 1)
        out = np.asarray(self.tokens[index], dtype=np.int64)
        bad = (out < 0) | (out >= self.vocab)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            at = int(index[row, col])
            raise ValueError(f"{self.path}: token {out[row, col]} at token offset {at} (byte "
                             f"{at * self.dtype.itemsize}) is outside [0, vocab={self.vocab})")
        return out

    def entropy_rate(self) -> None:
        """Unknown for real text: None."""
        return None

    def describe(self) -> str:
        return (f"tokens({self.path}, {self.num_tokens} x {self.dtype}, vocab={self.vocab}, "
                f"seed={self.seed})")
