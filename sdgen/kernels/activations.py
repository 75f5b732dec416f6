"""Element-wise activations in Numba (parallel, vectorised): gelu (exact, erf), quick_gelu, silu, geglu."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._math import fgelu, fquick_gelu, fsilu

_GELU, _QUICK_GELU, _SILU = 0, 1, 2
_CHUNK = 16384  # elements per parallel work item


@njit(parallel=True, cache=True)
def _unary(x, out, kind):
    """out = act(x) over flat float32 arrays; kind 0 gelu, 1 quick_gelu, 2 silu (one kernel, one compile)."""
    n = x.shape[0]
    nchunks = -(-n // _CHUNK)
    for ch in prange(nchunks):
        lo = ch * _CHUNK
        hi = min(n, lo + _CHUNK)
        xs, ys = x[lo:hi], out[lo:hi]  # indexed from 0 (an index lo + i gets Numba's wraparound: scalar code)
        if kind == 0:
            for i in range(hi - lo):
                ys[i] = fgelu(xs[i])
        elif kind == 1:
            for i in range(hi - lo):
                ys[i] = fquick_gelu(xs[i])
        else:
            for i in range(hi - lo):
                ys[i] = fsilu(xs[i])


def _apply(x: np.ndarray, kind: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _unary(x.reshape(-1), out.reshape(-1), kind)
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), float32."""
    return _apply(x, _GELU)


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """CLIP's x * sigmoid(1.702 x), float32."""
    return _apply(x, _QUICK_GELU)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), float32."""
    return _apply(x, _SILU)


@njit(parallel=True, cache=True)
def _geglu(x, out):
    """out[r, j] = x[r, j] * gelu(x[r, d + j]) for x (rows, 2d), out (rows, d)."""
    rows, d = out.shape
    for r in prange(rows):
        a, gate, y = x[r, :d], x[r, d:], out[r]  # the gate through a slice: x[r, d + j] stayed scalar (wraparound)
        for j in range(d):
            y[j] = a[j] * fgelu(gate[j])


def geglu(x: np.ndarray) -> np.ndarray:
    """GEGLU over the last axis: split it in halves (a, gate) and return a * gelu(gate) (exact GELU)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = x.shape[-1]
    if c % 2:
        raise ValueError(f"geglu: last axis {c} is odd")
    out = np.empty(x.shape[:-1] + (c // 2,), dtype=np.float32)
    _geglu(x.reshape(-1, c), out.reshape(-1, c // 2))
    return out
