"""Winograd minimal-filtering convolution F(2x2,3x3), F(4x4,3x3) and F(6x6,3x3), stride 1, NHWC.

A 3x3 convolution producing an m x m output tile is computed from an (m+2) x (m+2) input tile d as

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A          (.) = element-wise product,

summed over input channels. The element-wise stage, summed over channels, is one matrix product per transform point:
with alpha = m + 2 there are alpha^2 independent GEMMs  M[p] = V[p] @ U[p],  V[p]: (tiles, Cin), U[p]: (Cin, Cout).
U = G g G^T is computed once per weight (filter_transform); B^T d B (input transform) and A^T m A (output transform)
run in Numba over tiles, the GEMMs by register tiles (point_products: panels.gemm_tiles; BLAS on CPUs without
AVX-512VL). Tiles are processed in blocks so that the transformed buffers stay bounded (and mostly in cache) whatever
the image size.

The matrices are the classic ones from the interpolation points {0, 1, -1} (+infinity) for F(2,3),
{0, 1, -1, 2, -2} (+infinity) for F(4,3) and {0, 1, -1, 2, -2, 1/2, -1/2} (+infinity) for F(6,3); `matrices(m)`
returns them (float64) for tests and the filter transform, and the Numba transforms below are those same matrices
written out by hand. Larger tiles need fewer multiplications per output (F(2,3) 2.25x fewer than direct
convolution, F(4,3) 4x, F(6,3) 5.06x) and move less transformed data per output, but round more: against float64,
fp32 F(6,3) errs about twice as much as F(4,3) (~4e-6 relative with 256 input channels, against ~2e-6). The tile
transforms also run F(4x4,2x2) (5x5 tiles, 25 slabs) for the upsamplers of upconv.py, whose matrices and filters
live there: windows offset by a padding per axis, outputs written into every other pixel. The input transform can
normalize each pixel as it reads it (a GroupNorm, then SiLU: norm.Normalization, conv2d's pre), so that a ResNet
block's normalized maps are never made; each pixel is then normalized once per tile that reads it (1.78x in F(6,3),
2.25x in F(4,3)), which costs about the pass over the map it saves.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from . import panels
from .channel_passes import make_pass
from .norm import normalize_pixel
from .prefetch import prefetch_span

_F23 = (
    np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),  # B^T
    np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),  # G
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),  # A^T
)
_F43 = (
    np.array(
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        dtype=np.float64,
    ),
    np.array(
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        dtype=np.float64,
    ),
    np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64),
)
# F(6,3): points {0, 1, -1, 2, -2, 1/2, -1/2} (+infinity). A^T's column of point p holds p^i; the rows of B^T for the
# points 2 and 1/2 (and their negatives) are scaled so that their entries stay small, G's rows inversely.
_F63 = (
    np.array(
        [
            [1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0],
            [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
            [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0],
            [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
            [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0],
            [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
            [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0],
            [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1],
        ],
        dtype=np.float64,
    ),
    np.array(
        [
            [1, 0, 0],
            [-2 / 9, -2 / 9, -2 / 9],
            [-2 / 9, 2 / 9, -2 / 9],
            [1 / 90, 1 / 45, 2 / 45],
            [1 / 90, -1 / 45, 2 / 45],
            [32 / 45, 16 / 45, 8 / 45],
            [32 / 45, -16 / 45, 8 / 45],
            [0, 0, 1],
        ],
        dtype=np.float64,
    ),
    np.array(
        [
            [1, 1, 1, 1, 1, 1, 1, 0],
            [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0],
            [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0],
            [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0],
            [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
            [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1],
        ],
        dtype=np.float64,
    ),
)


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) in float64 for F(m x m, 3 x 3), m in {2, 4, 6}."""
    if m == 2:
        return _F23
    if m == 4:
        return _F43
    if m == 6:
        return _F63
    raise ValueError(f"no Winograd F({m},3)")


def filter_transform(weight_oihw: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T for every (out, in) pair, laid out (alpha*alpha, Cin', Cout') float32, Cin' and Cout' the channel
    counts padded as the transforms want them (padded_channels), with zeros there. Computed by
    weights.fill_filters (float32 arithmetic), the same numbers as the filters made at each call from stored
    weights (FilterSource)."""
    from .weights import fill_filters, hwio

    cout, cin, kh, kw = weight_oihw.shape
    assert (kh, kw) == (3, 3), weight_oihw.shape
    a = m + 2
    u = np.zeros((a * a, padded_channels(cin), padded_channels(cout)), dtype=np.float32)
    fill_filters(hwio(np.asarray(weight_oihw, dtype=np.float32)), m, u, 0, cout)
    return u


# Where the channels are few (Cin' + Cout' up to this: the VAE's 128-channel layers at 512x512), blocks of half the
# budget and from 32 tiles: 2 threads, Zen 4, medians of 9 alternating calls, against 128-176 tiles per block:
# 128 -> 128 channels F(6,3) at 512x512 0.89, 256 -> 128 0.96, 128 at 256x256 0.99, 128 at 128x128 F(4,3) 0.89,
# 64 at 128x128 0.92 (from 256 -> 256 channels on, the larger blocks are faster: 120 against 125-128 ms at 256x256).
FEW_CHANNELS = 384


def tile_block(m: int, cin: int, cout: int, ntiles: int, budget_bytes: int = 6 << 20, min_tiles: int = 128,
               nworkers: int = 1) -> int:
    """Tiles per block so that the transformed input and output blocks take about budget_bytes together (but at
    least min_tiles: the products' rows; half that budget and from 32 tiles where cin + cout <= FEW_CHANNELS),
    then evened out so that the blocks, if more than the workers, come in a multiple of their number, of near-equal
    size: on the small maps a last worker left with an extra block, or a short one, cost up to 25% (VAE and UNet
    64x64 layers: 96-tile blocks 35-154 ms, 128-tile ones 31-140)."""
    a2 = (m + 2) * (m + 2)
    if cin + cout <= FEW_CHANNELS:
        budget_bytes, min_tiles = budget_bytes // 2, min(min_tiles, 32)
    per_tile = a2 * (cin + cout) * 4
    tb = min(max(min_tiles, budget_bytes // per_tile), ntiles)
    nb = -(-ntiles // tb)
    if nb > nworkers > 1:
        nb = nb // nworkers * nworkers
        per_block = -(-ntiles // nb)
        tb = min(ntiles, -(-per_block // 8) * 8)
    return int(tb)


# ---------------------------------------------------------------- Numba transforms
#
# Layout of the transformed tiles: v[p, k, b, c] = slab p (of alpha^2), tile k of the block, channel b*cb + c.
# Channels are split in blocks of cb and padded to a whole number of blocks (the padding stays zero, the
# transformed filters have zero rows/columns there), so slab p is a (tiles, channels) matrix for the GEMM.
#
# The 1-D passes of B^T and A^T across the channels are vector intrinsics (channel_passes.make_pass, from the
# formulas below, the same numbers): as Numba loops, reading 4-8 rows and writing 2-8 rows of arrays LLVM cannot
# prove apart, they stayed scalar. The other loops run over the contiguous channel axis and reach channels at an
# offset through flat views made once per transform call, by unsigned indices: an index c0 + c with c0 a signed
# run-time value gets Numba's negative-index wraparound on every element (gathers or scalar code), and a slice
# made per pixel costs two atomic reference counts (10% of the output transform's time). 8 x 8 tiles of 128
# channels, one thread, Zen 4: the output transform 6.3 -> 2.9-3.7 us a tile; in a 1024 x 1024 convolution of 128
# channels (2 threads, with _prefetch_window) the output transforms 267 -> 156 ms of thread time, the input
# transforms 246 -> 190, the convolution 622 -> 534 ms.


# The 1-D transforms, each written once: B^T d (a values of a row or column of an input tile, d) and A^T m (the
# products of a row or column, m), in pairs of sums and differences where the points come in +- pairs. The row and
# column passes below apply them across the tiles' channels.


@njit(inline="always")
def _b4(d0, d1, d2, d3):
    """B^T d of F(2,3)."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always")
def _b5(d0, d1, d2, d3, d4):
    """B^T d of F(4,2) (upconv.py's phases)."""
    f2 = np.float32(2.0)
    f3 = np.float32(3.0)
    return (f2 * (d0 - d2) - d1 + d3, d3 - f2 * d1 - d2, f2 * d1 - f3 * d2 + d3, d3 - d1,
            f2 * (d1 - d3) - d2 + d4)


@njit(inline="always")
def _b6(d0, d1, d2, d3, d4, d5):
    """B^T d of F(4,3)."""
    f4 = np.float32(4.0)
    f5 = np.float32(5.0)
    f2 = np.float32(2.0)
    t1 = d4 - f4 * d2
    t2 = d3 - f4 * d1
    t3 = d4 - d2
    t4 = f2 * (d3 - d1)
    return f4 * d0 - f5 * d2 + d4, t1 + t2, t1 - t2, t3 + t4, t3 - t4, f4 * d1 - f5 * d3 + d5


@njit(inline="always")
def _b8(d0, d1, d2, d3, d4, d5, d6, d7):
    """B^T d of F(6,3) (the rows of _F63[0]), in pairs sharing their even and odd parts."""
    q = np.float32(0.25)
    h = np.float32(0.5)
    f2 = np.float32(2.0)
    f4 = np.float32(4.0)
    f5 = np.float32(5.0)
    c1 = np.float32(5.25)
    c2 = np.float32(4.25)
    c3 = np.float32(1.25)
    c4 = np.float32(2.5)
    a1 = d2 + d6 - c2 * d4
    b1 = d1 + d5 - c2 * d3
    a2 = q * d2 - c3 * d4 + d6
    b2 = h * d1 - c4 * d3 + f2 * d5
    a3 = f4 * d2 - f5 * d4 + d6
    b3 = f2 * d1 - c4 * d3 + h * d5
    return (d0 - d6 + c1 * (d4 - d2), a1 + b1, a1 - b1, a2 + b2, a2 - b2, a3 + b3, a3 - b3,
            d7 - d1 + c1 * (d3 - d5))


@njit(inline="always")
def _a4(m0, m1, m2, m3):
    """A^T m of F(2,3)."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(inline="always")
def _a5(m0, m1, m2, m3, m4):
    """A^T m of F(4,2)."""
    s = m1 + m2
    d = m1 - m2
    return m0 + s + m3, d + np.float32(2.0) * m3, s + np.float32(4.0) * m3, d + np.float32(8.0) * m3 + m4


@njit(inline="always")
def _a6(m0, m1, m2, m3, m4, m5):
    """A^T m of F(4,3)."""
    s1 = m1 + m2
    d1 = m1 - m2
    s2 = m3 + m4
    d2 = m3 - m4
    return m0 + s1 + s2, d1 + np.float32(2.0) * d2, s1 + np.float32(4.0) * s2, d1 + np.float32(8.0) * d2 + m5


@njit(inline="always")
def _a8(m0, m1, m2, m3, m4, m5, m6, m7):
    """A^T m of F(6,3) (the rows of _F63[2]): the points +-1, +-2, +-1/2 in sums and differences of pairs."""
    s1 = m1 + m2
    d1 = m1 - m2
    s2 = m3 + m4
    d2 = m3 - m4
    s3 = m5 + m6
    d3 = m5 - m6
    return (m0 + s1 + s2 + s3, d1 + np.float32(2.0) * d2 + np.float32(0.5) * d3,
            s1 + np.float32(4.0) * s2 + np.float32(0.25) * s3, d1 + np.float32(8.0) * d2 + np.float32(0.125) * d3,
            s1 + np.float32(16.0) * s2 + np.float32(0.0625) * s3,
            d1 + np.float32(32.0) * d2 + np.float32(0.03125) * d3 + m7)


# The passes (channel_passes.make_pass: B^T or A^T of each channel in vector registers, the numbers of the scalar
# formulas above). Row pass of the input transform: dst[i, a, c] = (B^T d)[a], d = the alpha pixels of one input
# row, src[s_off + j s_ld + c] (channels c0 .. of an NHWC image, or a padded copy of the row); column pass:
# v[a alpha + j, k, b, c] = (B^T tmp[:, j, c])[a]. Row pass of the output transform: tmp[i, j, c] =
# (A^T mm[i alpha .. i alpha + alpha - 1, k, b, c])[j]; column pass: col[i, c] = (A^T tmp[:, j, c])[i].

_PB4, _PB5, _PB6, _PB8 = (make_pass(f.py_func, n, n) for f, n in ((_b4, 4), (_b5, 5), (_b6, 6), (_b8, 8)))
_PA4, _PA5, _PA6, _PA8 = (make_pass(f.py_func, n, o) for f, n, o in ((_a4, 4, 2), (_a5, 5, 4), (_a6, 6, 4),
                                                                         (_a8, 8, 6)))


@njit(inline="always")
def _alpha(slabs):
    """The input tile's side from the number of transformed slabs: 8 (F(6,3)), 6 (F(4,3)), 5 (F(4,2)) or 4
    (F(2,3))."""
    return 8 if slabs == 64 else (6 if slabs == 36 else (5 if slabs == 25 else 4))


@njit(inline="always")
def _b_pass(a, src, s_off, s_ld, dst, d_off, d_ld, nc):
    if a == 8:
        _PB8(src, s_off, s_ld, dst, d_off, d_ld, nc)
    elif a == 6:
        _PB6(src, s_off, s_ld, dst, d_off, d_ld, nc)
    elif a == 5:
        _PB5(src, s_off, s_ld, dst, d_off, d_ld, nc)
    else:
        _PB4(src, s_off, s_ld, dst, d_off, d_ld, nc)


@njit(inline="always")
def _a_pass(a, src, s_off, s_ld, dst, d_off, d_ld, nc):
    if a == 8:
        _PA8(src, s_off, s_ld, dst, d_off, d_ld, nc)
    elif a == 6:
        _PA6(src, s_off, s_ld, dst, d_off, d_ld, nc)
    elif a == 5:
        _PA5(src, s_off, s_ld, dst, d_off, d_ld, nc)
    else:
        _PA4(src, s_off, s_ld, dst, d_off, d_ld, nc)


@njit(inline="always")
def _bt_row(a, src, s_off, s_ld, dst, i, nc):
    """dst[i, :, :nc] = B^T of the alpha rows of nc floats at src[s_off + j s_ld ..] (dst (alpha, alpha, cb))."""
    cb = dst.shape[2]
    _b_pass(a, src, s_off, s_ld, dst, i * a * cb, cb, nc)


@njit(inline="always")
def _bt_col(a, tmp, j, v, k, b, nc):
    """v[q alpha + j, k, b, :nc] = (B^T tmp[:, j, :nc])[q] (tmp (alpha, alpha, cb), v (alpha^2, rows, nb, cb))."""
    cb = tmp.shape[2]
    rows, nb, cbv = v.shape[1], v.shape[2], v.shape[3]
    _b_pass(a, tmp, j * cb, a * cb, v, ((j * rows + k) * nb + b) * cbv, a * rows * nb * cbv, nc)


@njit(inline="always")
def _at_row(a, mm, i, k, b, tmp, nc):
    """tmp[i, :, :nc] = A^T mm[i alpha .. i alpha + alpha - 1, k, b, :nc] (tmp (alpha, m, cb))."""
    rows, nb, cbm = mm.shape[1], mm.shape[2], mm.shape[3]
    m, cb = tmp.shape[1], tmp.shape[2]
    _a_pass(a, mm, ((i * a * rows + k) * nb + b) * cbm, rows * nb * cbm, tmp, i * m * cb, cb, nc)


@njit(inline="always")
def _at_col(a, tmp, j, col, nc):
    """col[:, :nc] = A^T tmp[:, j, :nc] (tmp (alpha, m, cb), col (m, cb))."""
    m, cb = tmp.shape[1], tmp.shape[2]
    _a_pass(a, tmp, j * cb, m * cb, col, 0, col.shape[1], nc)


@njit(inline="always")
def _tile_in(a, x, xf, n, y0, x0, v, k, tmp, rowf, muf, scf, shf, pre):
    """Input transform of one a x a tile of image n whose top-left input pixel is (y0, x0) (may lie in the
    padding) into v[:, k]. xf: x flat; tmp: (a, a, cb) scratch, rowf: a cb floats of scratch, cb = v.shape[3].
    pre: each pixel of x first normalized, (x - mu[n, c]) * sc[n, c] + sh[n, c] (pre 1), then SiLU (pre 2), as
    norm.normalize does, mu, sc, sh given flat (muf, scf, shf); the padding stays zero."""
    n_, h, w, cin = x.shape
    cb = v.shape[3]
    inside_x = x0 >= 0 and x0 + a <= w
    for b in range(-(-cin // cb)):
        c0 = b * cb
        nc = min(cb, cin - c0)
        ab = (n if pre else 0) * cin + c0  # (without pre: the (1, 1) placeholders, never read)
        for i in range(a):
            yy = y0 + i
            if yy < 0 or yy >= h:
                for j in range(a):
                    for c in range(nc):
                        tmp[i, j, c] = np.float32(0.0)
                continue
            # one call site for the row transform (each is inlined for every tile size: two sites doubled the
            # compile time), from the image where the window lies inside it, else from a zero-padded (or
            # normalized) copy
            src, s_off = xf, ((n * h + yy) * w + x0) * cin + c0
            s_ld = cin
            if pre or not inside_x:
                for kk in range(a):
                    xx = x0 + kk
                    if xx < 0 or xx >= w:
                        for c in range(nc):
                            rowf[kk * cb + c] = np.float32(0.0)
                    elif pre:
                        normalize_pixel(xf, s_off + kk * cin, muf, scf, shf, ab, rowf, kk * cb, nc, pre == 2)
                    else:
                        xo, ro = np.uint64(s_off + kk * cin), np.uint64(kk * cb)
                        for c in range(nc):
                            rowf[ro + np.uint64(c)] = xf[xo + np.uint64(c)]
                src, s_off, s_ld = rowf, 0, cb
            _bt_row(a, src, s_off, s_ld, tmp, i, nc)
        for j in range(a):
            _bt_col(a, tmp, j, v, k, b, nc)


@njit(inline="always")
def _tile_out(a, m, mm, k, y, yf, n, oy, ox, bias, rf, has_res, b_lo, b_hi, c_lo, step, py, px, tmp, col):
    """Output transform of tile k of the block (mm[:, k]), channel blocks b_lo .. b_hi-1, + bias (+ the residual if
    has_res, NHWC like y, given flat as rf), into the m x m outputs at (oy.., ox..) of the grid of y's pixels (step r
    + py, step q + px) (all of them for step 1), through yf (y flat), channels from c_lo on (bias too), clipped at
    the edge. tmp: (a, m, cb), col: (m, cb)."""
    n_, h, w, cout = y.shape
    cb = mm.shape[3]
    nh = min(m, (h - py + step - 1) // step - oy)
    nw = min(m, (w - px + step - 1) // step - ox)
    for b in range(b_lo, b_hi):
        c0 = c_lo + b * cb
        nc = min(cb, cout - c0)
        bo = np.uint64(c0)  # the block's bias, by offset (no view per tile)
        for i in range(a):
            _at_row(a, mm, i, k, b, tmp, nc)
        for j in range(nw):
            _at_col(a, tmp, j, col, nc)
            xx = step * (ox + j) + px
            for i in range(nh):
                yy = step * (oy + i) + py
                # the pixel's channels by an unsigned flat offset: no view made per pixel (each costs two atomic
                # reference counts) and no negative-index wraparound, so the loop stays vectorised
                off = np.uint64(((n * h + yy) * w + xx) * cout + c0)
                if has_res:
                    for c in range(nc):
                        u = off + np.uint64(c)
                        yf[u] = col[i, c] + bias[bo + np.uint64(c)] + rf[u]
                else:
                    for c in range(nc):
                        yf[off + np.uint64(c)] = col[i, c] + bias[bo + np.uint64(c)]


@njit(inline="always")
def _prefetch_window(x, n, y0, rows, x0, x1):
    """Prefetch pixels x0 .. x1 - 1 (all channels) of rows y0 .. y0 + rows - 1 of image n of NHWC x, clipped to the
    image: the part of the next tile's window that this tile's does not cover, while this one is transformed. The
    hardware prefetchers stop at 4 KB pages, which the window's rows of a large map cross at nearly every tile
    (prefetch.py): an 8 x 8 tile of 128 channels of a 1024 x 1024 map, one thread, Zen 4, 7.8 -> 5.4 us."""
    n_, h, w, c = x.shape
    xs, xe = max(x0, 0), min(x1, w)
    if xe <= xs:
        return
    for i in range(rows):
        yy = y0 + i
        if 0 <= yy < h:
            prefetch_span(x, ((n * h + yy) * w + xs) * c, (xe - xs) * c)


@njit(inline="always")
def tile_position(t, tiles_h, tiles_w):
    """(image, tile row, tile column) of tile t, tiles numbered by image, then tile row, then tile column."""
    per_img = tiles_h * tiles_w
    n = t // per_img
    r = t - n * per_img
    ty = r // tiles_w
    return n, ty, r - ty * tiles_w


@njit(nogil=True, cache=True, error_model="numpy")  # numpy's: SiLU's loop vectorises (norm.normalize_pixel)
def input_transform(m, x, v, t0, k_lo, k_hi, tiles_h, tiles_w, pad_y, pad_x, mu, sc, sh, pre):
    """Input transform B^T d B of tiles t0+k, k in [k_lo, k_hi), of NHWC x into v[:, k] (layout above): F(m,3),
    or F(4,2) (upconv.py) when v has 25 slabs; tile (n, ty, tx)'s window starts at (ty m - pad_y, tx m - pad_x),
    zero outside x. pre 1 or 2: x normalized as it is read (_tile_in; mu, sc, sh (N, C) float32), else as it is
    (mu, sc, sh: _NO_PRE). Serial; releases the GIL."""
    a = _alpha(v.shape[0])
    cb = v.shape[3]
    tmp = np.empty((a, a, cb), dtype=np.float32)
    rowf = np.empty(a * cb, dtype=np.float32)
    # flat views, made once per call (a view costs two atomic reference counts: none is made per tile or pixel)
    xf, muf, scf, shf = x.reshape(-1), mu.reshape(-1), sc.reshape(-1), sh.reshape(-1)
    for k in range(k_lo, k_hi):
        n, ty, tx = tile_position(t0 + k, tiles_h, tiles_w)
        if k + 1 < k_hi:  # the next tile's window: the columns past this one's, or all of it on a new tile row
            n1, ty1, tx1 = tile_position(t0 + k + 1, tiles_h, tiles_w)
            x1 = tx1 * m - pad_x
            xs = tx * m - pad_x + a if n1 == n and ty1 == ty else x1
            _prefetch_window(x, n1, ty1 * m - pad_y, a, xs, x1 + a)
        _tile_in(a, x, xf, n, ty * m - pad_y, tx * m - pad_x, v, k, tmp, rowf, muf, scf, shf, pre)


@njit(nogil=True, cache=True)
def output_transform(m, mm, y, t0, k_lo, k_hi, tiles_h, tiles_w, bias, res, has_res, b_lo, b_hi, c_lo, step, py,
                     px):
    """Output transform A^T M A of tiles t0+k, k in [k_lo, k_hi) (mm[:, k], layout above; F(4,2) when mm has 25
    slabs), channel blocks [b_lo, b_hi), into NHWC y, adding bias and, if has_res, res (NHWC like y). Outputs land
    on y's pixels (step r + py, step q + px) and channels from c_lo on: step 1 and zeros for a convolution, step 2
    and a phase for upconv.py's. Serial; releases the GIL."""
    a = _alpha(mm.shape[0])
    cb = mm.shape[3]
    tmp = np.empty((a, m, cb), dtype=np.float32)
    col = np.empty((m, cb), dtype=np.float32)
    yf, rf = y.reshape(-1), res.reshape(-1)  # flat views, made once per call
    for k in range(k_lo, k_hi):
        n, ty, tx = tile_position(t0 + k, tiles_h, tiles_w)
        _tile_out(a, m, mm, k, y, yf, n, ty * m, tx * m, bias, rf, has_res, b_lo, b_hi, c_lo, step, py, px, tmp,
                  col)


# ---------------------------------------------------------------- driver

_NO_RES = np.zeros((1, 1, 1, 1), dtype=np.float32)  # stands in for "no residual" (keeps one compiled signature)
_NO_PRE = np.zeros((1, 1), dtype=np.float32)  # ... and for "no normalization" of the input


def pre_args(pre) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """input_transform's (mu, sc, sh, pre) for a norm.Normalization applied to the input as it is read, or None."""
    if pre is None:
        return _NO_PRE, _NO_PRE, _NO_PRE, 0
    return pre.mu, pre.a, pre.b, 2 if pre.silu else 1


def channel_block(c: int) -> int:
    """Channel block of the transforms: 64, or c rounded up to 8 below that."""
    return 64 if c >= 64 else -(-c // 8) * 8


def padded_channels(c: int) -> int:
    cb = channel_block(c)
    return -(-c // cb) * cb


def _rows_padded(rows: int, cols: int) -> int:
    """Rows per slab, >= rows, such that the slab stride in bytes is not close to a multiple of 4 KiB (slabs
    that start on the same cache sets evict each other in the transforms)."""
    r = rows
    while True:
        off = (r * cols * 4) % 4096
        if 512 <= off <= 3584:
            return r
        r += 1


def _split(total: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of `parts` near-equal contiguous ranges of range(total)."""
    return total * i // parts, total * (i + 1) // parts


class _Buffers:
    """One worker's transformed-input and product buffers for blocks of up to tb tiles."""

    def __init__(self, a2: int, tb: int, cin: int, cout: int):
        cbi, cbo = channel_block(cin), channel_block(cout)
        cinp, coutp = padded_channels(cin), padded_channels(cout)
        self.v = np.empty((a2, _rows_padded(tb, cinp), cinp // cbi, cbi), dtype=np.float32)
        self.m = np.empty((a2, _rows_padded(tb, coutp), coutp // cbo, cbo), dtype=np.float32)
        self.vmat = self.v.reshape(a2, self.v.shape[1], cinp)
        self.mmat = self.m.reshape(a2, self.m.shape[1], coutp)
        # the channel padding must read as 0 (the transforms never write it); the rest is written before it is read
        # (zeroing all of it took ~0.4% of an SD 1.5 UNet forward, on one thread)
        self.vmat[:, :, cin:] = 0.0


@njit(nogil=True, cache=True)
def _tile_products(v, v_step, ldv, rows, k, u, u_step, panel_step, ldu, n, mm, m_step, ldm, a2):
    """M[p][:rows, :n] = V[p][:rows, :k] @ U[p][:k, :n] for the alpha^2 points p by panels.gemm_tiles' register
    tiles (n a multiple of panels.PANEL); flat float32 arrays, point p's matrices from p *_step on, rows ld* apart,
    U's panels of PANEL columns panel_step apart (PANEL for U as rows of n columns, ldu = PANEL for packed panels)."""
    for p in range(a2):
        panels.gemm_tiles(v, p * v_step, ldv, rows, k, u, p * u_step, panel_step, ldu, n // panels.PANEL, mm,
                          p * m_step, ldm)


# The filters of a point, U[p] (Cin', Cout'), are laid out as rows of Cout' columns, (alpha^2, Cin', Cout'), or --
# those made whole at each call (filter_buffer), where the register tiles multiply -- in panels of PANEL columns,
# (alpha^2, Cout' / PANEL, Cin', PANEL): each panel's rows contiguous, so that the tiles read them as one stream
# instead of PANEL columns of rows Cout' apart. One thread, Zen 4, V[p] U[p] on 128 tiles: 320 -> 320 channels
# (F(6,3)) 77 -> 101 GFLOP/s, 640 -> 640 84 -> 107, 512 -> 512 79 -> 103 (throwaway script, best of 7). The
# convolutions whose filters are made whole (2 threads, medians of 9 alternating calls, panels / rows): SD 1.5's
# 64x64 maps 320 -> 320 0.87, 640 -> 320 0.80, 960 -> 320 0.76, 320 -> 640 at 32x32 0.74, the VAE's 512 at 64x64
# 0.77, at 128x128 0.82, 256 at 256x256 0.83, 128 at 256x256 0.93; the upsamplers (upconv.py) 0.75-0.89; a guided
# SD 1.5 UNet forward 0.97, a VAE decode 0.89. The same numbers. The filters of a block of 64 output columns
# (winograd_conv_blocks') are made in two panels too (weights.filter_block_buffer): one thread, their products
# 1.02-1.06x as fast with the filters in cache, 1.03-1.11x from memory (1280-2560 -> 1280 at 16x16 and 8x8, 640 at
# 32x32; throwaway script), F(4,3)'s filters made in 0.68-0.74 of the time (with weights.PANEL_GAP), F(2,3)'s in
# 1.02-1.05; those convolutions (2 threads, medians of 21 alternating calls, three runs) 0.88-1.01 of their time
# with the filters as rows.


def in_panels(u: np.ndarray) -> np.ndarray:
    """Filters as rows, (alpha^2, Cin', Cout'), re-laid in panels (a new C-contiguous array) where packs_filters
    (Cout'), else u itself: for the filters a plan with cache keeps (Conv2dPlan), read at every call."""
    a2, cinp, coutp = u.shape
    if not packs_filters(coutp):
        return u
    out = empty_filters(a2, cinp, coutp)
    put_columns(out, 0, u)
    return out


def empty_filters(a2: int, cinp: int, cols: int) -> np.ndarray:
    """A new float32 array for the filters of `cols` output columns, kept beyond one call: in panels where
    packs_filters (C-contiguous, (alpha^2, cols / PANEL, Cin', PANEL)), else as rows (alpha^2, Cin', cols)."""
    if packs_filters(cols):
        return np.empty((a2, cols // panels.PANEL, cinp, panels.PANEL), dtype=np.float32)
    return np.empty((a2, cinp, cols), dtype=np.float32)


def packs_filters(cols: int) -> bool:
    """Whether filters of `cols` output columns are made in panels (where the register tiles multiply them)."""
    return panels.AVAILABLE and cols % panels.PANEL == 0


def filter_shape(u: np.ndarray) -> tuple[int, int, int]:
    """(alpha^2, Cin', Cout') of filters laid out as rows or in panels."""
    if u.ndim == 4:
        return u.shape[0], u.shape[2], u.shape[1] * u.shape[3]
    return u.shape


def filter_columns(u: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The filters of output columns [lo, hi) of u, as a view in u's layout (panels: lo and hi on panel bounds, or
    hi the end)."""
    if u.ndim == 4:
        return u[:, lo // panels.PANEL:-(-hi // panels.PANEL)]
    return u[:, :, lo:hi]


def filter_buffer(a2: int, cinp: int, cols: int, slot: str = "winograd") -> np.ndarray:
    """Scratch for the filters of `cols` output columns: in panels where packs_filters(cols) (see above), each
    point's panels contiguous and the points POINT_GAP floats further apart than that (a multiple of 4 KB would put
    every point's stores in one L1 set as they are made, weights.filter_block_buffer), else as rows
    (weights.scratch: shared, overwritten by the next user of the slot)."""
    from .weights import POINT_GAP, scratch

    if not packs_filters(cols):
        return scratch(slot, a2 * cinp * cols).reshape(a2, cinp, cols)
    per_point = cinp * cols + POINT_GAP
    u = scratch(slot, a2 * per_point).reshape(a2, per_point)[:, :cinp * cols]
    return u.reshape(a2, cols // panels.PANEL, cinp, panels.PANEL)


def kept_filters(src: "FilterSource") -> np.ndarray:
    """All the filters of a FilterSource made now into an array of their own, laid out as filter_buffer lays them
    (in panels where packs_filters), for a plan that keeps them (Conv2dPlan's keep_filters): the numbers fill
    makes at each call."""
    coutp = padded_channels(src.cout)
    u = empty_filters((src.m + 2) ** 2, padded_channels(src.cin), coutp)
    src.fill(u, 0, coutp)
    return u


def put_columns(u: np.ndarray, lo: int, f: np.ndarray) -> None:
    """u's filters of output columns [lo, lo + w) <- f (alpha^2, Cin', w), whichever u's layout (panels: lo and w
    whole panels)."""
    if u.ndim == 4:
        a2, cinp, w = f.shape
        filter_columns(u, lo, lo + w)[...] = f.reshape(a2, cinp, w // panels.PANEL, panels.PANEL).transpose(0, 2, 1, 3)
    else:
        u[:, :, lo:lo + f.shape[2]] = f


def zero_columns(u: np.ndarray, lo: int) -> None:
    """u's filters of output columns from lo on <- 0, whichever u's layout."""
    if u.ndim == 4:
        q, r = divmod(lo, panels.PANEL)
        u[:, q, :, r:] = 0.0
        u[:, q + 1:] = 0.0
    else:
        u[:, :, lo:] = 0.0


def point_products(v: np.ndarray, u: np.ndarray, mm: np.ndarray) -> None:
    """The element-wise stage, mm[p] = v[p] @ u[p] for every point p (3-D float32 views, rows contiguous; u as rows,
    or in panels: 4-D, see above): by panels.gemm_tiles' register tiles where the CPU has the registers for them and
    u's columns fill whole panels, else by BLAS (numpy's batched matmul). OpenBLAS packs both operands at each of
    its alpha^2 calls, which weighs most where the tiles are few; the register tiles read V and U where they lie.
    One thread, Zen 4, the products of 64 output channels at a time: 32 tiles x 1280 -> 1280 channels (SD's 16x16
    maps, F(4,3)) 40.8 ms against OpenBLAS's 65.5, 128 tiles x 640 -> 640 (32x32) 38.7 against 52.8, 32 tiles x
    2560 -> 1280 (8x8, F(2,3)) 47.1 against 72.9; the 2-thread convolutions of those layers take 0.72-0.85 of their
    time before. With whole or kept filters as rows (U's rows 128-1280 floats apart) the two stay within 5% of each
    other (medians of alternating calls in one process, 2 threads: 0.95-1.05 of BLAS's time); filters in panels
    (filter_buffer) take the tiles 20-30% less time than as rows."""
    a2, rows, k = v.shape
    n = filter_shape(u)[2]
    if u.ndim == 4:
        ok = panels.AVAILABLE and u.strides[3] == 4 and u.strides[2] == 4 * panels.PANEL
        panel_step, ldu = u.strides[1] // 4, panels.PANEL
    else:
        ok = panels.AVAILABLE and n % panels.PANEL == 0 and u.strides[2] == 4
        panel_step, ldu = panels.PANEL, u.strides[1] // 4
    if ok and rows and all(a.strides[2] == 4 for a in (v, mm)):
        _tile_products(panels.flat(v), v.strides[0] // 4, v.strides[1] // 4, rows, k, panels.flat(u),
                       u.strides[0] // 4, panel_step, ldu, n, panels.flat(mm), mm.strides[0] // 4,
                       mm.strides[1] // 4, a2)
    elif u.ndim == 4:
        np.matmul(v, u.transpose(0, 2, 1, 3).reshape(a2, k, n), out=mm)
    else:
        np.matmul(v, u, out=mm)


def winograd_conv(
    x: np.ndarray,
    u,
    m: int,
    pad: int,
    bias: np.ndarray,
    cout: int,
    residual: np.ndarray | None = None,
    budget_bytes: int = 6 << 20,
    block_tiles: int | None = None,
    nworkers: int | None = None,
    pre=None,
) -> np.ndarray:
    """Stride-1 3x3 convolution of C-contiguous float32 NHWC x with u = filter_transform(w, m) (channel-padded).

    u may instead be a FilterSource (the filters made at each call from the stored weights, into bounded buffers:
    see winograd_conv_streamed). pad: zero padding on every side. bias: float32 (Cout,) (zeros for none).
    residual: None or C-contiguous float32 of the output's shape, added in the output transform. Tiles go in blocks
    of about budget_bytes of transformed data (block_tiles, if given, sets the tiles per block instead). pre: a
    norm.Normalization applied to x as the tiles read it (the numbers of convolving norm.normalize(x, pre)), or None.

    Parallel over nworkers threads (default: _pool.workers()). With at least as many blocks as workers, each worker
    takes whole blocks, one at a time as it is free (transform, 36 or 16 GEMMs, inverse transform in its own
    buffers); with fewer (small maps, where the transformed filters outweigh the data) all workers transform the
    tiles of one block, then each multiplies and inverse-transforms its own share of the output channels, so the
    filters are read once.
    """
    from . import _pool

    if isinstance(u, FilterSource):
        return winograd_conv_streamed(x, u, m, pad, bias, cout, residual, budget_bytes, block_tiles, nworkers, pre)
    n, h, w, cin = x.shape
    a2, cinp, coutp = filter_shape(u)
    assert a2 == (m + 2) ** 2 and cinp == padded_channels(cin) and coutp == padded_channels(cout), (x.shape, u.shape)
    th, tw = _tiles(h, w, m, pad)
    ntiles = n * th * tw
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    if block_tiles is None:
        tb = tile_block(m, cinp, coutp, ntiles, budget_bytes, nworkers=nw)
    else:
        tb = max(1, min(block_tiles, ntiles))
    nblocks = -(-ntiles // tb)
    if nblocks < nw:  # one block: split the tiles for the input transform, then the output channels

        def product(buf: _Buffers, c_lo: int, c_hi: int) -> None:
            point_products(buf.vmat[:, :ntiles], filter_columns(u, c_lo, c_hi), buf.mmat[:, :ntiles, c_lo:c_hi])

        return _one_block(x, m, pad, bias, cout, residual, nw, product, pre)

    out = np.empty((n, h + 2 * pad - 2, w + 2 * pad - 2, cout), dtype=np.float32)
    mu, sc, sh, pre_code = pre_args(pre)
    has_res = residual is not None
    res = residual if has_res else _NO_RES
    nbo = coutp // channel_block(cout)

    nxt = itertools.count()  # blocks handed out one at a time: a worker slowed down by a busy machine takes fewer

    def blocks(i: int) -> None:
        buf = _Buffers(a2, tb, cin, cout)
        while (blk := next(nxt)) < nblocks:
            t0 = blk * tb
            nt = min(tb, ntiles - t0)
            input_transform(m, x, buf.v, t0, 0, nt, th, tw, pad, pad, mu, sc, sh, pre_code)
            point_products(buf.vmat[:, :nt], u, buf.mmat[:, :nt])
            output_transform(m, buf.m, out, t0, 0, nt, th, tw, bias, res, has_res, 0, nbo, 0, 1, 0, 0)

    _pool.run(blocks, nw)
    return out


def _tiles(h: int, w: int, m: int, pad: int) -> tuple[int, int]:
    """Tile rows and columns of F(m,3) over an h x w map with zero padding pad."""
    return -(-(h + 2 * pad - 2) // m), -(-(w + 2 * pad - 2) // m)


def _one_block(x, m, pad, bias, cout, residual, nw, product, pre=None) -> np.ndarray:
    """winograd_conv with all the tiles in one block: the nw workers split the tiles for the input transform, then
    the output channel blocks; product(buf, c_lo, c_hi) writes M[:, :ntiles, c_lo:c_hi] of a worker's channels
    from the transformed tiles buf.vmat[:, :ntiles], which the worker then inverse-transforms. pre: as
    winograd_conv's."""
    from . import _pool

    n, h, w, cin = x.shape
    th, tw = _tiles(h, w, m, pad)
    ntiles = n * th * tw
    out = np.empty((n, h + 2 * pad - 2, w + 2 * pad - 2, cout), dtype=np.float32)
    has_res = residual is not None
    res = residual if has_res else _NO_RES
    cbo = channel_block(cout)
    nbo = padded_channels(cout) // cbo
    buf = _Buffers((m + 2) ** 2, ntiles, cin, cout)
    mu, sc, sh, pre_code = pre_args(pre)

    def transform(i: int) -> None:
        lo, hi = _split(ntiles, nw, i)
        input_transform(m, x, buf.v, 0, lo, hi, th, tw, pad, pad, mu, sc, sh, pre_code)

    def multiply(i: int) -> None:
        b_lo, b_hi = _split(nbo, nw, i)
        if b_lo == b_hi:
            return
        product(buf, b_lo * cbo, b_hi * cbo)
        output_transform(m, buf.m, out, 0, 0, ntiles, th, tw, bias, res, has_res, b_lo, b_hi, 0, 1, 0, 0)

    _pool.run(transform, nw)
    _pool.run(multiply, nw)
    return out


class FilterSource:
    """The Winograd filters of one convolution, made from its stored 3x3 weights each time they are needed instead
    of being kept: the weights HWIO ((3, 3, Cin, Cout); float32, float16 or bfloat16 bits; see
    sdgen.kernels.weights), or given as `blocks` of output channels (weights.block_outputs: (blocks, 3, 3, Cin,
    ob), for winograd_conv_blocks; weight_hwio is then None and cout says how many channels are real).
    ``fill(u, c_lo, c_hi)`` writes the filters of output channels [c_lo, c_hi) into u (alpha^2, Cin',
    c_hi - c_lo) float32."""

    def __init__(self, weight_hwio: np.ndarray | None, m: int, blocks: np.ndarray | None = None,
                 cout: int | None = None):
        self.weight = weight_hwio
        self.blocks = blocks
        self.m = m
        if blocks is not None:
            self.cin, self.ob, self.cout = blocks.shape[3], blocks.shape[4], int(cout)
        else:
            self.cin, self.cout = weight_hwio.shape[2], weight_hwio.shape[3]

    def fill(self, u: np.ndarray, c_lo: int, c_hi: int, parallel: bool = True) -> None:
        from .weights import fill_filters

        if self.blocks is not None:
            self._fill_from_blocks(u, c_lo, c_hi, parallel)
            return
        fill_filters(self.weight, self.m, u, c_lo, min(c_hi, self.cout), c_off=c_lo, parallel=parallel)
        if c_hi > self.cout:  # channel padding of the last block
            zero_columns(u, self.cout - c_lo)

    def _fill_from_blocks(self, u, c_lo, c_hi, parallel) -> None:
        """fill() from blocked weights: each block's filters made whole (one flat transform, in cache), then its
        columns copied into u; the blocks shared out to the workers."""
        from . import _pool
        from .weights import fill_block_filters, filter_block_buffer

        ob = self.ob
        js = list(range(c_lo // ob, -(-c_hi // ob)))
        nw = min(len(js), _pool.workers()) if parallel else 1

        def part(i: int) -> None:
            tmp = filter_block_buffer(*filter_shape(u)[:2], ob)
            taps = None if self.blocks.dtype == np.float32 else np.empty(9 * self.cin * ob, dtype=np.float32)
            for j in js[i::nw]:
                fill_block_filters(self.blocks[j], self.m, tmp, taps)
                lo, hi = max(c_lo, j * ob), min(c_hi, (j + 1) * ob)
                put_columns(u, lo - c_lo, tmp[:, :, lo - j * ob:hi - j * ob])

        _pool.run(part, nw)


# Filters made at each call go into one shared scratch buffer of at most this size; larger ones (1280-channel
# layers: 105-210 MB) are made and used a group of output channels at a time (the input transform is then repeated
# per group: cheap next to the products, on the small maps where such layers run).
STREAM_FILTER_BYTES = 48 << 20


def whole_filter_bytes(m: int) -> int:
    """The most bytes of F(m,3) filters made whole into the shared buffer (winograd_conv_streamed): 1.5x
    STREAM_FILTER_BYTES for F(6,3), whose 512-channel filters (67 MB) take 0.89 of F(4,3)'s time made whole on the
    VAE's 128x128 maps and 1.06 made in two groups (medians of 9 alternating calls, 2 threads, Zen 4)."""
    return STREAM_FILTER_BYTES * 3 // 2 if m == 6 else STREAM_FILTER_BYTES


# Where the filters outweigh the transformed tiles (small maps, many channels: the UNet's 16x16 and 32x32 layers)
# and all the tiles' transformed data stay within this, weights stored in blocks of output channels make their
# filters a block at a time, used at once while in cache (winograd_conv_blocks).
BLOCKS_TILES_BYTES = 64 << 20


def winograd_conv_streamed(x, src: FilterSource, m, pad, bias, cout, residual=None, budget_bytes=6 << 20,
                           block_tiles=None, nworkers=None, pre=None) -> np.ndarray:
    """winograd_conv with the filters made from the stored weights during the call: from weights stored in blocks
    of output channels, a block at a time where the filters outweigh the data (winograd_conv_blocks); else whole
    (by all workers, into the shared "winograd" scratch buffer), in groups of output channels whose filters take
    at most whole_filter_bytes(m), laid out in panels (filter_buffer). The numbers are those of winograd_conv with
    filter_transform's filters."""
    n, h, w, cin = x.shape
    a2 = (m + 2) ** 2
    cinp, coutp = padded_channels(cin), padded_channels(cout)
    th, tw = _tiles(h, w, m, pad)
    ntiles = n * th * tw
    tiles_bytes = a2 * _rows_padded(ntiles, max(cinp, coutp)) * (cinp + coutp) * 4
    if (src.blocks is not None and tiles_bytes < a2 * cinp * coutp * 4 and tiles_bytes <= BLOCKS_TILES_BYTES
            and block_tiles is None):
        return winograd_conv_blocks(x, src, m, pad, bias, cout, residual, nworkers, pre)
    limit = whole_filter_bytes(m)
    if a2 * cinp * coutp * 4 <= limit:
        u = filter_buffer(a2, cinp, coutp)
        src.fill(u, 0, coutp)
        return winograd_conv(x, u, m, pad, bias, cout, residual, budget_bytes, block_tiles, nworkers, pre)
    ngroups = -(-a2 * cinp * coutp * 4 // limit)
    group = -(-(-(-cout // ngroups)) // 64) * 64  # near-equal groups, whole channel blocks
    out = np.empty((n, h + 2 * pad - 2, w + 2 * pad - 2, cout), dtype=np.float32)
    for c0 in range(0, cout, group):
        c1 = min(cout, c0 + group)
        gp = padded_channels(c1 - c0)
        u = filter_buffer(a2, cinp, gp)
        src.fill(u, c0, c0 + gp)
        res = None if residual is None else np.ascontiguousarray(residual[..., c0:c1])
        out[..., c0:c1] = winograd_conv(x, u, m, pad, np.ascontiguousarray(bias[c0:c1]), c1 - c0, res,
                                        budget_bytes, block_tiles, nworkers, pre)
    return out


# The tile's rows whose filters winograd_conv_blocks makes and uses at once, per F(m,3): F(4,3)'s filters of a
# 64-channel block from 1280-2560 inputs take 12-24 MB, more than the cache holds beside the tiles for the two
# workers; made and used two rows (12 points) at a time they stay in it (the taps are read three times instead of
# once, from L2/L3). 2 threads, Zen 4, medians of 25 alternating calls, against the whole tile: 1280 -> 1280 at
# 16x16 (batch 2) 0.90, 2560 -> 1280 0.85, 1920 -> 1280 0.86, 640 at 32x32 0.90, 1920 -> 640 0.98; single rows
# 0.83-0.98. F(2,3)'s (5-10 MB) in halves: 1.00 with guidance, 1.25 at batch 1; whole.
BLOCK_ROW_GROUPS = {2: ((0, 4),), 4: ((0, 2), (2, 4), (4, 6)), 6: ((0, 8),)}


def winograd_conv_blocks(x, src: FilterSource, m, pad, bias, cout, residual=None, nworkers=None,
                         pre=None) -> np.ndarray:
    """winograd_conv for maps whose filters outweigh their tiles, from weights stored in blocks of 64 output
    channels (FilterSource with blocks): all workers transform the tiles (one block holding them all); then each
    worker, for each block of its share of the output channels and each group of the tile's rows
    (BLOCK_ROW_GROUPS), makes the filters of those points (rows x alpha x Cin' x 64, a few MB, from contiguous
    weights; in two panels of 32 output channels where packs_filters) and multiplies V @ U into M while they are in
    cache, then inverse-transforms its channels. The filters are never whole, and no sum is split: the same numbers
    as winograd_conv with filter_transform's filters, whatever the number of workers."""
    from . import _pool
    from .weights import fill_block_filters, filter_block_buffer, widen

    n, h, w, cin = x.shape
    a = m + 2
    ob = src.ob
    assert ob == channel_block(cout), (ob, cout)
    th, tw = _tiles(h, w, m, pad)
    ntiles = n * th * tw
    groups = BLOCK_ROW_GROUPS[m]

    def product(buf: _Buffers, c_lo: int, c_hi: int) -> None:
        u = filter_block_buffer(max(r1 - r0 for r0, r1 in groups) * a, padded_channels(cin), ob, packs_filters(ob))
        taps = None if src.blocks.dtype == np.float32 else np.empty(src.blocks[0].shape, dtype=np.float32)
        for j in range(c_lo // ob, c_hi // ob):
            block = src.blocks[j] if taps is None else widen(src.blocks[j], taps, parallel=False)
            for r0, r1 in groups:
                p0, p1 = r0 * a, r1 * a
                fill_block_filters(block, m, u[:p1 - p0], rows=(r0, r1))
                point_products(buf.vmat[p0:p1, :ntiles], u[:p1 - p0], buf.mmat[p0:p1, :ntiles, j * ob:(j + 1) * ob])

    return _one_block(x, m, pad, bias, cout, residual, _pool.workers() if nworkers is None else max(1, nworkers),
                      product, pre)
