"""Counter-based random numbers: element i of a stream is a hash of (key, i), so a fill splits over any number of
threads and gives the same values whatever their number.

For stand-in weights (benchmarks of an architecture without its checkpoint), where only their range matters and
numpy's generators (13-17 ns an element here) made building SDXL's 3.5 billion take about a minute. The hash is
SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014) applied
to key + (i + 1) * the golden-ratio increment, which is the SplitMix64 sequence of seed `key`; its top 24 bits make
a float32 uniform on [0, 1) exactly, as torch.rand's 24 bits do.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
_ONE = np.uint64(1)
_INV24 = np.float32(2.0 ** -24)
_CHUNK = 1 << 16  # elements per parallel job


@njit(inline="always")
def _u24(key, i):
    """The top 24 bits of SplitMix64's element i (from 0) of the sequence seeded with key, as an integer."""
    z = key + (np.uint64(i) + _ONE) * _GAMMA
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return np.int64(z >> _S40)


@njit(parallel=True, cache=True)
def _fill(out, key, lo, width):
    n = out.size
    for job in prange(-(-n // _CHUNK)):
        for i in range(job * _CHUNK, min(n, (job + 1) * _CHUNK)):
            out[i] = lo + np.float32(_u24(key, i)) * _INV24 * width


def uniform(shape, key: int, lo: float, hi: float) -> np.ndarray:
    """A new float32 array of the given shape, element i (in C order) lo + u_i (hi - lo) with u_i uniform on [0, 1)
    in steps of 2^-24: SplitMix64's element i of the sequence seeded with key (any int, taken modulo 2^64), top 24
    bits. Parallel (numba threads); the same values whatever their number."""
    out = np.empty(shape, dtype=np.float32)
    _fill(out.reshape(-1), np.uint64(key % (1 << 64)), np.float32(lo), np.float32(np.float32(hi) - np.float32(lo)))
    return out
