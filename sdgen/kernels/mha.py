"""Multi-head scaled dot-product attention and softmax.

attention() splits the work into jobs of (image, head, block of query rows), the block sized so that its score
matrix stays within block_bytes whatever the sequence length, and runs the jobs on the kernel workers (_pool.py),
each with single-threaded BLAS and its own score buffer. A job: one GEMM S = Q K^T (Q read in place through a
strided view), a fused Numba pass over S (scale, mask, row max, exp, row sum in float64), a GEMM O = P V written
straight into the output through a strided view, and a Numba pass that divides each output row by its softmax sum
(cheaper on O, d columns wide, than on P, Lk wide). K^T and V are first copied contiguous per head.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import _pool
from ._math import fexp, max32, sum64

_NO_MASK = np.zeros((1, 1), dtype=np.float32)


@njit(nogil=True, cache=True, fastmath={"contract"})
def softmax_rows(s, scale, mask, has_mask, inv):
    """In place over the rows of s (rows, n): s <- exp(scale * s + mask - rowmax), inv[r] <- 1 / rowsum.

    Not normalised: the caller multiplies by inv where it is cheapest. mask (rows, n), used if has_mask; scale > 0.
    A row that is entirely -inf gives inv = inf (and NaN downstream), as in PyTorch. Serial; releases the GIL.
    """
    rows, n = s.shape
    for r in range(rows):
        row = s[r]
        if has_mask:
            mr = mask[r]
            for j in range(n):
                row[j] = row[j] * scale + mr[j]
            mx = max32(row, n)
            for j in range(n):
                row[j] = fexp(row[j] - mx)
        else:
            mx = max32(row, n) * scale
            for j in range(n):
                row[j] = fexp(row[j] * scale - mx)
        inv[r] = np.float32(1.0 / sum64(row, n))


@njit(nogil=True, cache=True)
def _scale_head_rows(o, q0, nq, c0, d, inv):
    """o (Lq, C): o[q0 + i, c0 + j] *= inv[i] for i < nq, j < d (one head's block of output rows)."""
    for i in range(nq):
        f = inv[i]
        for j in range(d):
            o[q0 + i, c0 + j] *= f


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    heads: int,
    mask: np.ndarray | None = None,
    block_bytes: int = 4 << 20,
    nworkers: int | None = None,
) -> np.ndarray:
    """Multi-head scaled dot-product attention. q: (B, Lq, C), k and v: (B, Lk, C) -> (B, Lq, C).

    Scale 1/sqrt(C/heads). mask, if given, is added to the scores and broadcasts to (B, heads, Lq, Lk) (e.g. a
    causal mask of -inf). Each job's score block (query rows x Lk floats) stays under block_bytes (but holds at
    least 16 query rows).
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    b, lq, c = q.shape
    lk = k.shape[1]
    if c % heads or k.shape != (b, lk, c) or v.shape != (b, lk, c):
        raise ValueError(f"attention: shapes q {q.shape} k {k.shape} v {v.shape}, heads {heads}")
    d = c // heads
    scale = np.float32(1.0 / math.sqrt(d))
    m4 = None
    if mask is not None:
        m4 = np.broadcast_to(np.asarray(mask, dtype=np.float32), (b, heads, lq, lk))
    qb = min(lq, max(16, block_bytes // (4 * lk)))
    jobs = [(bi, h, q0) for bi in range(b) for h in range(heads) for q0 in range(0, lq, qb)]
    out = np.empty((b, lq, c), dtype=np.float32)
    nw = min(_pool.workers() if nworkers is None else max(1, nworkers), len(jobs))
    # per image: Q (H, Lq, d) and O (H, Lq, d) as strided views; K^T (H, d, Lk) and V (H, Lk, d) copied
    # contiguous per head (cheap next to the GEMMs; BLAS packs contiguous operands faster, ~10%)
    views = [
        (
            q[bi].reshape(lq, heads, d).transpose(1, 0, 2),
            np.ascontiguousarray(k[bi].reshape(lk, heads, d).transpose(1, 2, 0)),
            np.ascontiguousarray(v[bi].reshape(lk, heads, d).transpose(1, 0, 2)),
            out[bi].reshape(lq, heads, d).transpose(1, 0, 2),
        )
        for bi in range(b)
    ]

    def work(i: int) -> None:
        sbuf = np.empty(qb * lk, dtype=np.float32)
        inv = np.empty(qb, dtype=np.float32)
        for bi, h, q0 in jobs[i::nw]:
            qv, kt, vv, ov = views[bi]
            q1 = min(lq, q0 + qb)
            nq = q1 - q0
            s = sbuf[: nq * lk].reshape(nq, lk)
            np.matmul(qv[h, q0:q1], kt[h], out=s)
            if m4 is None:
                softmax_rows(s, scale, _NO_MASK, False, inv)
            else:
                softmax_rows(s, scale, np.ascontiguousarray(m4[bi, h, q0:q1]), True, inv)
            np.matmul(s, vv[h], out=ov[h, q0:q1])
            _scale_head_rows(out[bi], q0, nq, h * d, d, inv)

    _pool.run(work, nw)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along axis (float32 out; float64 row sums)."""
    x = np.asarray(x, dtype=np.float32)
    xm = np.moveaxis(x, axis, -1)
    n = xm.shape[-1]
    s = np.array(xm.reshape(-1, n), dtype=np.float32, copy=True)  # never write into the caller's array
    inv = np.empty(s.shape[0], dtype=np.float32)
    softmax_rows(s, np.float32(1.0), _NO_MASK, False, inv)
    s *= inv[:, None]
    return np.moveaxis(s.reshape(xm.shape), -1, axis)
