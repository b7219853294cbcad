"""Counter-based random numbers: value (seed, index, t) is a pure function of its three ints.

A data source that draws sequence `index` from these reads the same tokens whatever range of
indices a rank asks for, so every data-parallel layout sees bitwise the same global batch.
The mixer is splitmix64 (Steele, Lea, Flood 2014), vectorised over numpy uint64 arrays.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 array x (wrapping arithmetic, no overflow warnings)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def counter_bits(seed: int, first: int, count: int, width: int) -> np.ndarray:
    """Random uint64 [count, width]: row i, column t is a function of (seed, first + i, t) only.

    seed, first: ints >= 0 (seed up to 2**64 - 1); count, width: ints >= 0.
    """
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    if first < 0 or count < 0 or width < 0:
        raise ValueError(f"first, count and width must be >= 0, got {first}, {count}, {width}")
    stream = _mix(np.array([seed], dtype=np.uint64) + _GOLDEN)
    index = np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)
    keys = _mix(stream + index * _GOLDEN)  # [count], one key per sequence
    t = np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN
    return _mix(keys[:, None] ^ _mix(t)[None, :])


def counter_uniform(seed: int, first: int, count: int, width: int) -> np.ndarray:
    """Uniform float64 in [0, 1) [count, width], from the top 53 bits of counter_bits."""
    bits = counter_bits(seed, first, count, width) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))
