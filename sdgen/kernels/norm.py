"""GroupNorm (NHWC, optionally followed by SiLU) and LayerNorm (last axis) in Numba.

Statistics are accumulated in float64. GroupNorm sums per channel over chunks of pixels (in parallel), each channel
shifted by its value at the first pixel so that a large mean does not cancel the variance away, then combines
channels into groups in float64; the normalisation itself is one fused pass y = (x - mean) * a[c] + beta[c] (+ SiLU).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._math import fsilu, sum64, sumsq_dev64

_PIX_CHUNK = 256  # pixels per parallel work item in GroupNorm


@njit(parallel=True, cache=True)
def _gn_partial_sums(x, s, q):
    """x (N, P, C) float32 -> s, q (N, chunks, C) float64: per chunk of _PIX_CHUNK pixels, the sums of
    d = x - x[n, 0, c] and of d^2."""
    n_, p, c = x.shape
    nch = s.shape[1]
    for job in prange(n_ * nch):
        n = job // nch
        ch = job - n * nch
        lo = ch * _PIX_CHUNK
        hi = min(p, lo + _PIX_CHUNK)
        acc_s = np.zeros(c, dtype=np.float64)
        acc_q = np.zeros(c, dtype=np.float64)
        for i in range(lo, hi):
            for k in range(c):
                d = np.float64(x[n, i, k]) - np.float64(x[n, 0, k])
                acc_s[k] += d
                acc_q[k] += d * d
        for k in range(c):
            s[n, ch, k] = acc_s[k]
            q[n, ch, k] = acc_q[k]


@njit(inline="always")
def normalize_pixel(x, x_off, mu, a, b, ab_off, dst, d_off, n, silu):
    """dst[d_off + c] = (x[x_off + c] - mu[ab_off + c]) * a[ab_off + c] + b[ab_off + c], then SiLU if silu, for
    c < n: one pixel's channels (flat float32 arrays), as GroupNorm normalizes them; _scale_shift's pass and the
    Winograd input transform (which normalizes as it reads) both call it, so that their numbers are the same.
    Subtracting the mean first keeps float32 exact when the mean is large against the spread. The offsets are
    taken unsigned: no view made per pixel (each costs two atomic reference counts) and no negative-index
    wraparound (which keeps the loop scalar). In a function with Numba's default error model SiLU's division
    checks for zero and the loop stays scalar too: the input transform takes numpy's."""
    xo, ao, do = np.uint64(x_off), np.uint64(ab_off), np.uint64(d_off)
    if silu:
        for c in range(n):
            u = np.uint64(c)
            dst[do + u] = fsilu((x[xo + u] - mu[ao + u]) * a[ao + u] + b[ao + u])
    else:
        for c in range(n):
            u = np.uint64(c)
            dst[do + u] = (x[xo + u] - mu[ao + u]) * a[ao + u] + b[ao + u]


@njit(parallel=True, cache=True)
def _scale_shift(x, mu, a, b, y, silu):
    """y[n, i] = normalize_pixel of x[n, i] by mu[n], a[n], b[n] (then SiLU if silu); x, y (N, P, C), mu, a, b
    (N, C) float32, C-contiguous."""
    n_, p, c = x.shape
    nch = -(-p // _PIX_CHUNK)
    xf, yf, muf, af, bf = x.reshape(-1), y.reshape(-1), mu.reshape(-1), a.reshape(-1), b.reshape(-1)
    for job in prange(n_ * nch):
        n = job // nch
        ch = job - n * nch
        lo = ch * _PIX_CHUNK
        hi = min(p, lo + _PIX_CHUNK)
        for i in range(lo, hi):
            at = (n * p + i) * c
            normalize_pixel(xf, at, muf, af, bf, n * c, yf, at, c, silu)


class Normalization(NamedTuple):
    """What GroupNorm (+ SiLU) does to each element of an NHWC map, its statistics taken: y[n, ..., c] =
    (x - mu[n, c]) * a[n, c] + b[n, c], then SiLU if silu; mu, a, b (N, C) float32. normalize() applies it; a
    convolution can apply it instead as it reads its input (kernels.conv2d's pre), to the same numbers, so that
    the normalized map is never made."""

    mu: np.ndarray
    a: np.ndarray
    b: np.ndarray
    silu: bool


def group_norm(
    x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float, silu: bool = False
) -> np.ndarray:
    """GroupNorm over NHWC x (statistics per image and group of C/num_groups channels), optionally then SiLU."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return normalize(x, group_norm_stats(x, num_groups, gamma, beta, eps, silu))


def normalize(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """norm applied to NHWC x (a new array)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, h, w, c = x.shape
    y = np.empty_like(x)
    _scale_shift(x.reshape(n, h * w, c), norm.mu, norm.a, norm.b, y.reshape(n, h * w, c), bool(norm.silu))
    return y


def group_norm_stats(
    x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float, silu: bool = False
) -> Normalization:
    """GroupNorm's statistics of NHWC x, as what it does to each element (Normalization; silu: then SiLU)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, h, w, c = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels not divisible into {num_groups} groups")
    p = h * w
    x3 = x.reshape(n, p, c)
    nch = -(-p // _PIX_CHUNK)
    s = np.empty((n, nch, c), dtype=np.float64)
    q = np.empty((n, nch, c), dtype=np.float64)
    _gn_partial_sums(x3, s, q)
    # per channel: sum of d and d^2 with d = x - k, k = x[n, 0, c]
    shift = x3[:, 0, :].astype(np.float64)
    sc = s.sum(axis=1)
    qc = q.sum(axis=1)
    cg = c // num_groups
    cnt = float(p * cg)
    mean_c = shift + sc / p  # per-channel means
    mean_g = mean_c.reshape(n, num_groups, cg).mean(axis=2)  # (n, G)
    # sum over the group of (x - mean_g)^2 = sum_c [ q_c + 2 (k_c - mean_g) s_c + p (k_c - mean_g)^2 ]
    dk = shift.reshape(n, num_groups, cg) - mean_g[:, :, None]
    m2 = (qc.reshape(n, num_groups, cg) + 2.0 * dk * sc.reshape(n, num_groups, cg) + p * dk * dk).sum(axis=2)
    var_g = np.maximum(m2 / cnt, 0.0)
    rstd = 1.0 / np.sqrt(var_g + eps)
    g64 = np.asarray(gamma, dtype=np.float64)
    b64 = np.asarray(beta, dtype=np.float64)
    a = np.repeat(rstd, cg, axis=1) * g64  # (n, c)
    mu = np.repeat(mean_g, cg, axis=1)
    mu32 = mu.astype(np.float32)
    # (x - mu32) is exact in float32 for x near the mean; what float32 rounding took off mu goes into the shift
    b = b64 - (mu - mu32.astype(np.float64)) * a
    f32 = lambda t: np.ascontiguousarray(t, dtype=np.float32)  # noqa: E731
    return Normalization(mu32, f32(a), f32(b), bool(silu))


@njit(parallel=True, cache=True)
def _layer_norm_rows(x, gamma, beta, eps, y):
    """Row-wise LayerNorm of x (rows, C) float32 into y: two passes over the row, float64 statistics."""
    rows, c = x.shape
    for r in prange(rows):
        xr = x[r]
        mean = sum64(xr, c) / c
        m = np.float32(mean)
        v = sumsq_dev64(xr, c, mean)
        rstd = np.float32(1.0 / np.sqrt(v / c + eps))
        for k in range(c):
            y[r, k] = (xr[k] - m) * rstd * gamma[k] + beta[k]


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of x (any leading shape), float32 out."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = x.shape[-1]
    y = np.empty_like(x)
    _layer_norm_rows(
        x.reshape(-1, c),
        np.ascontiguousarray(gamma, dtype=np.float32),
        np.ascontiguousarray(beta, dtype=np.float32),
        float(eps),
        y.reshape(-1, c),
    )
    return y
