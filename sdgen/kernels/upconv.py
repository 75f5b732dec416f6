"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution (stride 1, padding 1) -- the upsamplers of the
UNet and of the VAE decoder -- computed on the low-resolution map: the upsampled map is never made.

Output pixel (2i + a, 2j + c) of conv3x3(up2(x)) reads the upsampled map at rows 2i + a - 1 .. 2i + a + 1, which
are x's rows i + a - 1 + r, r in {0, 1}, one of them twice; the same for columns. So each of the four phases
(a, c) is a 2x2 convolution of x whose taps are sums of the 3x3 taps w:

    W_ac = R_a w R_c^T,   R_0 = [[1, 0, 0], [0, 1, 1]],   R_1 = [[1, 1, 0], [0, 0, 1]],

its top-left tap at (i + a - 1, j + c - 1). Each phase runs as Winograd F(4x4, 2x2) (interpolation points
{0, 1, -1, 2}, +infinity; `matrices()`): 25 products per 4x4 tile of a phase, where F(4,3) on the upsampled map
takes 36 per 4x4 tile: 31% fewer multiplications, an input transform over a quarter of the pixels, and no 4x larger
input map in memory. The filters (25 x Cin x Cout per phase) are made at each call from the stored 3x3 weights, a
phase and a group of output channels at a time (into the shared "winograd" scratch buffer). The tiles go through
winograd.py's transforms (F(4,2) on 25 slabs, each phase's window offset by its padding, outputs written into
every other pixel) and 25 GEMMs (tiles, Cin) @ (Cin, Cout) per phase and block of tiles, through BLAS on the kernel
workers.

The numbers differ from upsample-then-convolve by float32 roundings only (the taps' sums, the transforms): tested
against a float64 reference.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from . import _pool
from .winograd import (_NO_RES, STREAM_FILTER_BYTES, _Buffers, channel_block, filter_buffer, filter_shape,
                       input_transform, output_transform, padded_channels, point_products, pre_args, put_columns,
                       tile_block)

# F(4,2): B^T (5 x 5), G (5 x 2), A^T (4 x 5), float64, for tests; winograd.py's tile transforms write B^T and A^T
# out (its input_transform and output_transform run F(4,2) on 25 slabs), _g52 below writes G out.
_BT = np.array([[2, -1, -2, 1, 0], [0, -2, -1, 1, 0], [0, 2, -3, 1, 0], [0, -1, 0, 1, 0], [0, 2, -1, -2, 1]],
               dtype=np.float64)
_G = np.array([[1 / 2, 0], [-1 / 2, -1 / 2], [-1 / 6, 1 / 6], [1 / 6, 1 / 3], [0, 1]], dtype=np.float64)
_AT = np.array([[1, 1, 1, 1, 0], [0, 1, -1, 2, 0], [0, 1, 1, 4, 0], [0, 1, -1, 8, 1]], dtype=np.float64)
_R = (np.array([[1, 0, 0], [0, 1, 1]], dtype=np.float64), np.array([[1, 1, 0], [0, 0, 1]], dtype=np.float64))

M = 4  # output tile (per phase, on the low-resolution grid)
A = 5  # input tile
A2 = A * A


def matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(4x4, 2x2) in float64."""
    return _BT, _G, _AT


def phase_taps(w_oihw: np.ndarray) -> np.ndarray:
    """The four phases' 2x2 taps R_a w R_c^T of 3x3 weights, (2, 2, Cout, Cin, 2, 2) [a, c, o, i, r, s], float64
    (for tests)."""
    w = np.asarray(w_oihw, dtype=np.float64)
    return np.stack([np.stack([np.einsum("rk,oikl,sl->oirs", _R[a], w, _R[c]) for c in range(2)])
                     for a in range(2)])


# ---------------------------------------------------------------- filters
#
# From the taps g (9, L) of a block of output channels (L = Cin * ob, tap t = 3 k + l), u[5 i + j, e] of one phase
# (a, c): first the phase row's sums of tap rows and G to them (rows of t), then the column sums and G again. Each loop stores into rows whose last index is the bare loop counter, so LLVM vectorises it.


@njit(inline="always")
def _g52(x0r, x1r, y0, y1, y2, y3, y4, nb):
    """(y0..y4)[t] = G (x0, x1)[t] of F(4,2)."""
    h = np.float32(0.5)
    s6 = np.float32(1.0 / 6.0)
    s3 = np.float32(1.0 / 3.0)
    for t in range(nb):
        x0 = x0r[t]
        x1 = x1r[t]
        y0[t] = h * x0
        y1[t] = -h * (x0 + x1)
        y2[t] = s6 * (x1 - x0)
        y3[t] = s6 * x0 + s3 * x1
        y4[t] = x1


@njit(inline="always")
def _add(x0r, x1r, y, nb):
    for t in range(nb):
        y[t] = x0r[t] + x1r[t]


_PIECE = 512  # elements per piece of the filter transform (its temporaries stay in L1/L2)


@njit(nogil=True, cache=True)
def _filters(g, a, c, u):
    """u[5 i + j, e] = (G W_ac G^T)[i, j] of the taps g[t, e] (t = 3 k + l), e < L = g.shape[1]; 0 for the rest
    of u's rows. float32 (9, L) -> (25, >= L)."""
    n_all = g.shape[1]
    rs = np.empty((2, _PIECE), dtype=np.float32)  # the phase row's two tap-row sums, for one column tap
    t = np.empty((5, 3, _PIECE), dtype=np.float32)  # [i, l]: G applied to the rows
    cs = np.empty((2, _PIECE), dtype=np.float32)
    for s in range(0, n_all, _PIECE):
        e = min(n_all, s + _PIECE)
        n = e - s
        for l in range(3):
            if a == 0:  # rows: w0 | w1 + w2
                for q in range(n):
                    rs[0, q] = g[l, s + q]
                _add(g[3 + l, s:e], g[6 + l, s:e], rs[1], n)
            else:  # rows: w0 + w1 | w2
                _add(g[l, s:e], g[3 + l, s:e], rs[0], n)
                for q in range(n):
                    rs[1, q] = g[6 + l, s + q]
            _g52(rs[0], rs[1], t[0, l], t[1, l], t[2, l], t[3, l], t[4, l], n)
        for i in range(5):
            if c == 0:  # columns: w0 | w1 + w2
                for q in range(n):
                    cs[0, q] = t[i, 0, q]
                _add(t[i, 1], t[i, 2], cs[1], n)
            else:  # columns: w0 + w1 | w2
                _add(t[i, 0], t[i, 1], cs[0], n)
                for q in range(n):
                    cs[1, q] = t[i, 2, q]
            p = 5 * i
            _g52(cs[0], cs[1], u[p, s:e], u[p + 1, s:e], u[p + 2, s:e], u[p + 3, s:e], u[p + 4, s:e], n)
    for p in range(u.shape[0]):
        for q in range(n_all, u.shape[1]):
            u[p, q] = np.float32(0.0)


def make_filters(block_hwio: np.ndarray, a: int, c: int, u: np.ndarray) -> None:
    """The F(4,2) filters of phase (a, c) of a block of output channels: float32 (3, 3, Cin, ob) taps -> u (25,
    Cin', ob) float32 (contiguous), rows from Cin on zero. Serial."""
    kh, kw, cin, ob = block_hwio.shape
    assert (kh, kw) == (3, 3) and u.shape[0] == A2 and u.shape[2] == ob and u.shape[1] >= cin, (block_hwio.shape,
                                                                                               u.shape)
    g = np.ascontiguousarray(block_hwio, dtype=np.float32).reshape(9, cin * ob)
    _filters(g, a, c, u.reshape(A2, -1))


# ---------------------------------------------------------------- driver

# the phase filters made at once (a group of output channels) take at most this: the buffer Winograd's filters made
# at each call use (the same "winograd" scratch slot), so the upsamplers add no memory
UPCONV_FILTER_BYTES = STREAM_FILTER_BYTES
MIN_TILES = 128  # with fewer F(4,2) tiles (the UNet's 8x8 and 16x16 maps) the products are too small to pay


def worth_it(n: int, h: int, w: int) -> bool:
    """Whether upsample_conv3x3 beats upsampling then Winograd F(4,3) for an (n, h, w, C) input: enough tiles for
    the products (n ceil(h/4) ceil(w/4) >= MIN_TILES)."""
    return n * -(-h // M) * -(-w // M) >= MIN_TILES


def upsample_conv3x3(x: np.ndarray, weight_blocks, cout: int, bias: np.ndarray, nworkers: int | None = None,
                     filter_bytes: int = UPCONV_FILTER_BYTES) -> np.ndarray:
    """conv3x3(nearest_up2(x)) + bias, padding 1, for C-contiguous float32 NHWC x (N, H, W, Cin) -> (N, 2H, 2W,
    cout). weight_blocks(o_lo, o_hi, ob) returns the float32 weights of output channels [o_lo, o_hi) in blocks of
    ob, (blocks, 3, 3, Cin, ob), zeros past o_hi (Conv2dPlan.output_blocks). bias: float32 (cout,).

    In groups of output channels whose filters for one phase take at most filter_bytes (the VAE's and SD's
    640-channel upsamplers: all of them), their weights taken once per group; then phase by phase, all workers make
    the phase's filters (a channel block each at a time), then take blocks of tiles one at a time: input transform,
    25 GEMMs, output transform into the phase's pixels. On small maps the blocks are made small enough that every
    worker gets one."""
    n, h, w, cin = x.shape
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    cbo = channel_block(cout)
    coutp = padded_channels(cout)
    cinp = padded_channels(cin)
    group = max(cbo, min(coutp, filter_bytes // (A2 * cinp * 4) // cbo * cbo))
    th, tw = -(-h // M), -(-w // M)
    ntiles = n * th * tw
    out = np.empty((n, 2 * h, 2 * w, cout), dtype=np.float32)
    for g0 in range(0, coutp, group):
        gp = min(group, coutp - g0)  # a whole number of channel blocks
        blocks = weight_blocks(g0, min(cout, g0 + gp), cbo)  # (gp / cbo, 3, 3, Cin, cbo)
        u = filter_buffer(A2, cinp, gp)  # in panels where the register tiles multiply
        for ph in range(4):

            def fill(i: int) -> None:
                tmp = np.empty((A2, cinp, cbo), dtype=np.float32)
                for j in range(i, len(blocks), nw):
                    make_filters(blocks[j], ph // 2, ph % 2, tmp)
                    put_columns(u, j * cbo, tmp)

            _pool.run(fill, min(nw, len(blocks)))
            _products(x, u, out, ph // 2, ph % 2, g0, cbo, bias, th, tw, ntiles, nw)
    return out


def _products(x, u, out, pa, pc, g0, cbo, bias, th, tw, ntiles, nw) -> None:
    """Phase (pa, pc) of the output channels from g0 on (filters u: (25, Cin', gp) as rows or in panels, gp a
    multiple of the channel block cbo), over blocks of tiles."""
    cin = x.shape[3]
    gp = filter_shape(u)[2]
    cinp = padded_channels(cin)
    tb = max(8, tile_block(M, cinp, gp, ntiles, nworkers=nw) * 36 // A2)  # tile_block sizes F(4,3)'s 36 slabs
    per_worker = -(-ntiles // nw)
    tb = min(tb, -(-per_worker // 8) * 8)  # at least one block per worker
    nblocks = -(-ntiles // tb)
    nxt = itertools.count()

    def work(_: int) -> None:
        buf = _Buffers(A2, tb, cin, gp)  # gp: whole channel blocks of cout, so its blocks are cbo wide
        while (blk := next(nxt)) < nblocks:
            t0 = blk * tb
            nt = min(tb, ntiles - t0)
            input_transform(M, x, buf.v, t0, 0, nt, th, tw, 1 - pa, 1 - pc, *pre_args(None))
            point_products(buf.vmat[:, :nt], u, buf.mmat[:, :nt])
            output_transform(M, buf.m, out, t0, 0, nt, th, tw, bias, _NO_RES, False, 0, gp // cbo, g0, 2, pa, pc)

    _pool.run(work, min(nw, nblocks))
