"""GEMM-based kernels: linear layers, im2col for the convolutions that Winograd does not cover, bias/residual epilogue.

The GEMMs are numpy's (OpenBLAS), always single-threaded BLAS on the kernel workers (see _pool.py): a linear
layer or 1x1 convolution splits its rows (or columns) among them, the blocked im2col convolution its blocks.
The Numba kernels here are serial and release the GIL; they never call BLAS.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from . import _pool

_NO_RES2 = np.zeros((1, 1), dtype=np.float32)  # stands in for "no residual" (keeps one compiled signature)
_NO_BIAS = np.zeros(1, dtype=np.float32)


@njit(nogil=True, cache=True)
def add_bias_residual(y, bias, has_bias, res, has_res, c_lo, c_hi):
    """In place on the 2-D y, columns [c_lo, c_hi): y[i, j] += bias[j] (if has_bias) + res[i, j] (if has_res).

    Each row through slices indexed from 0: with the loop running over [c_lo, c_hi) directly LLVM left it scalar
    (2 G elements/s against 13 on a (128, 2560) block, AVX-512)."""
    n = c_hi - c_lo
    br = bias[c_lo:c_hi] if has_bias else bias
    for i in range(y.shape[0]):
        yr = y[i, c_lo:c_hi]
        if has_bias and has_res:
            rr = res[i, c_lo:c_hi]
            for j in range(n):
                yr[j] = yr[j] + br[j] + rr[j]
        elif has_bias:
            for j in range(n):
                yr[j] = yr[j] + br[j]
        elif has_res:
            rr = res[i, c_lo:c_hi]
            for j in range(n):
                yr[j] = yr[j] + rr[j]


def _as2d(a: np.ndarray, cols: int) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, cols)


def _split(total: int, parts: int, i: int, align: int = 1) -> tuple[int, int]:
    """The i-th of `parts` near-equal contiguous ranges of range(total), inner bounds multiples of align."""
    lo = 0 if i == 0 else min(total, (total * i // parts + align - 1) // align * align)
    hi = total if i == parts - 1 else min(total, (total * (i + 1) // parts + align - 1) // align * align)
    return lo, hi


_PARALLEL_FLOPS = 1 << 22  # multiply-adds below which a GEMM runs on one thread (the hand-off would dominate)
_CHUNKS_PER_WORKER = 4  # a GEMM's share-out: this many chunks per worker, taken one at a time
_MIN_CHUNK = 128


def _chunks(long: int, short: int, nw: int) -> int:
    """Blocks to cut the long side (the columns) of a GEMM's result into: a multiple of the workers (equal shares
    when the cores run alike), up to _CHUNKS_PER_WORKER each, but each block at least as long as the short side
    (each block packs the whole other operand again: at 256 x 1280 x 1280, 8 blocks ran ~8% slower than PyTorch,
    4 as fast)."""
    if nw <= 1:
        return 1
    return nw * max(1, min(_CHUNKS_PER_WORKER, long // (nw * max(_MIN_CHUNK, short))))


def gemm_bias(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None = None,
              nworkers: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b + bias (+ residual), a: (M, K) float32, b: (K, N) (C- or Fortran-contiguous; BLAS takes either);
    into out (C-contiguous float32 (M, N)) if given, else a new array.

    On the kernel workers, each with single-threaded BLAS (never BLAS's own threads, whose idle spinning slows the
    workers' next phase). The result is cut along its longer side: into blocks of columns when N >= M (each worker
    then packs only its columns of b, the weights, which dominate the traffic; SDXL's 256-token layers ran 7-15%
    faster than when each worker packed all of b for half the rows), up to _CHUNKS_PER_WORKER blocks per worker
    handed out one at a time, so a core slowed by a busy machine takes fewer; else into one block of rows per worker
    (more blocks of rows, each packing b again, made the SD1.5 UNet ~2% slower). Each worker adds bias and residual
    to its block while it is in cache."""
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        y = np.empty((m, n), dtype=np.float32)
    elif out.shape != (m, n) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"gemm_bias: out must be C-contiguous float32 {(m, n)}, got {out.dtype} {out.shape}")
    else:
        y = out
    res2 = None if residual is None else _as2d(residual, n)
    has_bias = bias is not None
    bb = bias if has_bias else _NO_BIAS
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    if m * n * k < _PARALLEL_FLOPS:
        nw = 1
    by_rows = m > n
    chunks = nw if by_rows else _chunks(n, m, nw)
    nxt = itertools.count()

    def part(_: int) -> None:
        while (i := next(nxt)) < chunks:
            if by_rows:
                lo, hi = _split(m, chunks, i, align=16)
                if lo < hi:
                    yp = y[lo:hi]
                    np.matmul(a[lo:hi], b, out=yp)
                    if has_bias or res2 is not None:
                        r = _NO_RES2 if res2 is None else res2[lo:hi]
                        add_bias_residual(yp, bb, has_bias, r, res2 is not None, 0, n)
            else:
                _multiply_columns(a, b, y, *_split(n, chunks, i, align=16), bb, has_bias, res2)

    _pool.run(part, nw)  # chunks is a multiple of nw
    return y


def _multiply_columns(a, b, out, lo: int, hi: int, bias, has_bias: bool, res2) -> None:
    """out[:, lo:hi] = a @ b[:, lo:hi] (+ bias, + res2), one worker's share of the columns."""
    if lo < hi:
        np.matmul(a, b[:, lo:hi], out=out[:, lo:hi])
        if has_bias or res2 is not None:
            add_bias_residual(out, bias, has_bias, _NO_RES2 if res2 is None else res2, res2 is not None, lo, hi)


def linear_operands(x: np.ndarray, k: int, n: int, residual: np.ndarray | None, out: np.ndarray | None,
                    who: str = "linear") -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple]:
    """What a linear layer's kernels take from its arguments, for weights of k inputs and n outputs: x's rows as an
    (M, k) float32 matrix, the (M, n) result (out's memory if given: C-contiguous float32 of x's leading shape +
    (n,), else new), the residual's rows (M, n) or None, and x's leading shape. ValueError (naming `who`) for an
    input of other than k features or an unfit out."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != k:
        raise ValueError(f"{who}: input has {x.shape[-1]} features, the weights expect {k}")
    lead = x.shape[:-1]
    a = _as2d(x, k)
    if out is None:
        y = np.empty((a.shape[0], n), dtype=np.float32)
    elif out.flags.c_contiguous and out.shape == (*lead, n) and out.dtype == np.float32:
        y = out.reshape(-1, n)
    else:
        raise ValueError(f"{who}: out must be C-contiguous float32 of shape {(*lead, n)}")
    return a, y, None if residual is None else _as2d(residual, n), lead


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T + bias (+ residual) over the last axis of x; weight (out, in) as PyTorch stores it.

    residual, if given, has the output's shape and is added in the same pass as the bias, after it: (x W^T + b) + r,
    as a residual connection after a linear layer rounds. out: a C-contiguous float32 array of the output's shape
    to write into (returned), instead of a new one.
    """
    weight = np.asarray(weight, dtype=np.float32)
    out_f, in_f = weight.shape
    a, y, res2, lead = linear_operands(x, in_f, out_f, residual, out)
    gemm_bias(a, weight.T, None if bias is None else np.asarray(bias, dtype=np.float32), res2, out=y)
    return y.reshape(*lead, out_f) if out is None else out


@njit(nogil=True, cache=True)
def im2col(x, cols, r0, rr_lo, rr_hi, ho, wo, stride, pad, kh, kw):
    """Rows r0+rr, rr in [rr_lo, rr_hi), of the im2col matrix of NHWC x (output pixels numbered image, row,
    column) into cols[rr] viewed as (kh*kw, Cin): cols[rr, i*kw + j, c] = x[n, oy*stride - pad + i,
    ox*stride - pad + j, c], zero outside the image. Serial; releases the GIL."""
    n_, h, w, cin = x.shape
    per_img = ho * wo
    for rr in range(rr_lo, rr_hi):
        r = r0 + rr
        n = r // per_img
        q = r - n * per_img
        oy = q // wo
        ox = q - oy * wo
        for i in range(kh):
            yy = oy * stride - pad + i
            for j in range(kw):
                xx = ox * stride - pad + j
                if yy < 0 or yy >= h or xx < 0 or xx >= w:
                    for c in range(cin):
                        cols[rr, i * kw + j, c] = np.float32(0.0)
                else:
                    for c in range(cin):
                        cols[rr, i * kw + j, c] = x[n, yy, xx, c]


def conv_im2col(
    x: np.ndarray,
    wmat: np.ndarray,
    kh: int,
    kw: int,
    stride: int,
    pad: int,
    bias: np.ndarray | None,
    residual: np.ndarray | None,
    budget_bytes: int = 4 << 20,
    min_rows: int = 128,
    nworkers: int | None = None,
) -> np.ndarray:
    """Any convolution as im2col + GEMM, in blocks of output rows (about budget_bytes of im2col matrix each), the
    bias/residual added per block while it is in cache. wmat: (kh*kw*Cin, Cout), rows ordered (i, j, c).

    With at least as many blocks as workers each worker takes whole blocks; otherwise (one block) the workers
    split its im2col rows, then the output columns of the GEMM, so the weights are read once.
    """
    n, h, w, cin = x.shape
    k, cout = wmat.shape
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    rows = n * ho * wo
    out = np.empty((rows, cout), dtype=np.float32)
    rb = int(min(rows, max(min_rows, budget_bytes // (4 * k))))
    nblocks = -(-rows // rb)
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    res2 = None if residual is None else _as2d(residual, cout)
    has_bias = bias is not None
    b = bias if has_bias else _NO_BIAS

    if nblocks >= nw:

        def blocks(i: int) -> None:
            cols = np.empty((rb, kh * kw, cin), dtype=np.float32)
            cmat = cols.reshape(rb, k)
            for blk in range(i, nblocks, nw):
                r0 = blk * rb
                nr = min(rb, rows - r0)
                im2col(x, cols, r0, 0, nr, ho, wo, stride, pad, kh, kw)
                yb = out[r0 : r0 + nr]
                np.matmul(cmat[:nr], wmat, out=yb)
                if has_bias or res2 is not None:
                    r = _NO_RES2 if res2 is None else res2[r0 : r0 + nr]
                    add_bias_residual(yb, b, has_bias, r, res2 is not None, 0, cout)

        _pool.run(blocks, nw)
    else:
        cols = np.empty((rows, kh * kw, cin), dtype=np.float32)
        cmat = cols.reshape(rows, k)

        def gather(i: int) -> None:
            lo, hi = _split(rows, nw, i)
            im2col(x, cols, 0, lo, hi, ho, wo, stride, pad, kh, kw)

        def multiply(i: int) -> None:
            _multiply_columns(cmat, wmat, out, *_split(cout, nw, i, align=16), b, has_bias, res2)

        _pool.run(gather, nw)
        _pool.run(multiply, nw)
    return out.reshape(n, ho, wo, cout)


# ---------------------------------------------------------------- few output channels: GEMM, then shifted sums
#
# A stride-1 convolution with few output channels (the VAE's and UNet's last one: 128 -> 3, 320 -> 4) is a poor
# GEMM as im2col, whose product has only Cout columns and whose (pixels, kh kw Cin) matrix must be gathered first.
# Instead every pixel is multiplied once by all the taps' weights at once, Z = X W_all with W_all (Cin, kh kw Cout),
# and each output is the sum of the kh kw products of its neighbourhood: y[i, j] = sum_{r,s} Z[i+r-pad, j+s-pad,
# (r kw + s) Cout + o] (the "kn2row" method). The same multiply-adds, no gather, one pass over the input.


@njit(nogil=True, cache=True)
def shift_add(z, z_row0, kh, kw, pad, bias, has_bias, res, has_res, y, n, r0, r1):
    """Output rows [r0, r1) of image n of y (NHWC): y[n, i, j, o] = bias[o] + sum over the taps (r, s), in order,
    of z[i + r - pad - z_row0, j + s - pad, (r kw + s) cout + o], taps outside the input skipped (zero padding);
    then + res[n, i, j, o] if has_res. z (rows, W, kh kw cout) holds the products of input rows z_row0 ..
    Serial; releases the GIL."""
    zr, w, kc = z.shape
    wo, cout = y.shape[2], y.shape[3]
    acc = np.empty((wo, cout), dtype=np.float32)
    for i in range(r0, r1):
        for j in range(wo):
            for o in range(cout):
                acc[j, o] = bias[o] if has_bias else np.float32(0.0)
        for r in range(kh):
            zy = i + r - pad - z_row0
            if zy < 0 or zy >= zr:
                continue
            for s in range(kw):
                base = (r * kw + s) * cout
                j_lo = max(0, pad - s)
                j_hi = min(wo, w + pad - s)
                for j in range(j_lo, j_hi):
                    for o in range(cout):
                        acc[j, o] += z[zy, j + s - pad, base + o]
        for j in range(wo):
            for o in range(cout):
                y[n, i, j, o] = acc[j, o] + res[n, i, j, o] if has_res else acc[j, o]


_NO_RES4 = np.zeros((1, 1, 1, 1), dtype=np.float32)


def conv_kn2row(x: np.ndarray, wk: np.ndarray, kh: int, kw: int, pad: int, bias: np.ndarray | None,
                residual: np.ndarray | None, budget_bytes: int = 8 << 20, nworkers: int | None = None) -> np.ndarray:
    """Stride-1 convolution of C-contiguous float32 NHWC x with zero padding pad, as one GEMM by all the taps'
    weights wk (Cin, kh*kw*Cout), columns ordered (r, s, o), then shifted sums (shift_add). In bands of output
    rows whose products take about budget_bytes (each band multiplies its kh - 1 extra input rows again), handed
    out to the workers one at a time, each with single-threaded BLAS; at least one band per worker."""
    n, h, w, cin = x.shape
    kc = wk.shape[1]
    cout = kc // (kh * kw)
    ho, wo = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    out = np.empty((n, ho, wo, cout), dtype=np.float32)
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    band = max(1, min(ho, budget_bytes // (4 * w * kc) - (kh - 1)))
    if n * -(-ho // band) < nw:
        band = max(1, -(-ho // -(-nw // n)))
    jobs = [(img, r0) for img in range(n) for r0 in range(0, ho, band)]
    has_bias, has_res = bias is not None, residual is not None
    b = bias if has_bias else _NO_BIAS
    res = residual if has_res else _NO_RES4
    nxt = itertools.count()

    def work(_: int) -> None:
        z = np.empty((min(h, band + kh - 1) * w, kc), dtype=np.float32)
        while (i := next(nxt)) < len(jobs):
            img, r0 = jobs[i]
            r1 = min(ho, r0 + band)
            lo = max(0, r0 - pad)
            rows = max(0, min(h, r1 - 1 + kh - pad) - lo)  # input rows the band reads (none: padding only)
            zb = z[: rows * w]
            np.matmul(x[img, lo:lo + rows].reshape(-1, cin), wk, out=zb)
            shift_add(zb.reshape(rows, w, kc), lo, kh, kw, pad, b, has_bias, res, has_res, out, img, r0, r1)

    _pool.run(work, min(nw, len(jobs)))
    return out
