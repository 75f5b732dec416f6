"""Plain numpy versions of every kernel: the same math as the fast kernels, written to be obviously right.

Tests compare the fast kernels with these. Layout conventions shared by all kernels:
  images / feature maps: NHWC float32 (batch, height, width, channels)
  token sequences:       (batch, tokens, channels)
  conv weights:          OIHW as stored by PyTorch (out, in, kh, kw)
  linear weights:        (out, in) as stored by PyTorch
"""

from __future__ import annotations

import math

import numpy as np


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Direct convolution by im2col + one GEMM, NHWC in and out."""
    n, h, w, cin = x.shape
    cout, cin_w, kh, kw = weight.shape
    assert cin == cin_w, (cin, cin_w)
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    cols = np.empty((n, ho, wo, kh, kw, cin), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = x[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
    wmat = weight.transpose(2, 3, 1, 0).reshape(kh * kw * cin, cout)
    y = cols.reshape(n * ho * wo, kh * kw * cin) @ wmat
    if bias is not None:
        y += bias
    return y.reshape(n, ho, wo, cout)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def group_norm(x: np.ndarray, num_groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float, silu: bool = False) -> np.ndarray:
    """GroupNorm over NHWC (statistics per batch item and group of channels), optionally followed by SiLU."""
    n, h, w, c = x.shape
    g = x.reshape(n, h * w, num_groups, c // num_groups).astype(np.float64)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(n, h, w, c) * gamma + beta
    if silu:
        y = y / (1.0 + np.exp(-y))
    return y.astype(np.float32)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = x64.var(axis=-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Multi-head scaled dot-product attention. q: (B, Lq, C), k and v: (B, Lk, C) -> (B, Lq, C).

    mask, if given, is added to the scores and broadcasts to (B, heads, Lq, Lk) (e.g. a causal mask of -inf).
    """
    b, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    qh = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    vh = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    scores = (qh @ kh.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores + mask
    out = softmax(scores) @ vh
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(b, lq, c)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2))."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def quick_gelu(x: np.ndarray) -> np.ndarray:
    """CLIP's x * sigmoid(1.702 x)."""
    return x / (1.0 + np.exp(-1.702 * x))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def geglu(x: np.ndarray) -> np.ndarray:
    """GEGLU: split the last axis in halves (a, gate), a * gelu(gate) with the exact GELU."""
    a, gate = np.split(x, 2, axis=-1)
    return (a.astype(np.float64) * gelu(gate).astype(np.float64)).astype(np.float32)


def upsample2x(x: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upsampling by 2 of NHWC x: each pixel repeated 2 x 2."""
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def counter_uniform(shape, key: int, lo: float, hi: float) -> np.ndarray:
    """counter_random.uniform: element i lo + u_i (hi - lo), u_i the top 24 bits of SplitMix64's output i for seed
    key, times 2^-24 (numpy's uint64 arithmetic wraps modulo 2^64, as the generator's does)."""
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = np.uint64(key % (1 << 64)) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    width = np.float32(np.float32(hi) - np.float32(lo))
    return (np.float32(lo) + u * width).reshape(shape)
