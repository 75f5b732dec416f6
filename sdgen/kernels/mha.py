"""Multi-head scaled dot-product attention and softmax.

attention() splits the work into jobs of (image, group of heads, block of query rows), sized by _partition so that
the score block stays within block_bytes whatever the sequence length (one head per job for self-attention over long
sequences, all heads of a block of rows for cross-attention's 77 keys), and runs the jobs on the kernel workers
(_pool.py), each with single-threaded BLAS and its own score buffer; the workers take the jobs one at a time from a
shared counter, so a thread slowed down by a busy machine takes fewer. A job: one (batched over its heads) GEMM S =
Q K^T, a fused Numba pass over S (scale, mask, row max, exp, row sum), and a GEMM O = P V written
straight into the output; Q, K, V and O are read and written in place through strided views (except long keys split
into heads, whose K^T and V are first copied contiguous per head: on CPUs with 32 vector registers, for heads up to
128 wide, K^T into panels for panels.gemm_panels' register tiles instead of BLAS (from 1024 keys on; else from
2048), and on heads of 40, 64 and 80 P V by panels.gemm_rows' too; 0.82 of PyTorch's SDPA time on SD 1.5's 4096
tokens where BLAS gave 1.06-1.09, scripts/bench_kernels.py --only attention; a single head that fills whole panels,
the VAE's of 512, from 2048 keys on: K^T and V into panels, Q K^T and P V by the tiles, 0.92-0.96 of SDPA's time
where BLAS, reading them in place, gave 1.04-1.05). Score rows are padded to a multiple of 8 columns, which the
GEMMs skip: the exp loop then has no scalar tail. The probabilities are divided by their sums in the softmax pass
when keys are fewer than a head is wide (cross-attention's 77 keys on 160-wide heads), else the output rows after P
V (d columns instead of Lk). Results are bit-identical whatever the number of workers.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from numba import njit

from . import _pool, panels
from .panels import PANEL, ROW_WIDTHS, flat, gemm_panels, gemm_panels_by_chunk, gemm_rows
from ._math import _C2, _C3, _C4, _C5, _C6, _EXP_LO, _LN2_HI, _LN2_LO, _LOG2E, _P2, max32

_NO_MASK = np.zeros((1, 1), dtype=np.float32)
_NO_ROWMAX = np.zeros(1, dtype=np.float32)  # stands in for "no row maxima given" (keeps one compiled signature)


@njit(inline="always")
def _exp_nonpos(x):
    """_math.fexp for the arguments of a softmax (x - rowmax <= 0, up to a rounding): the same polynomial without
    the clamp at +88, which costs ~8% of the softmax pass."""
    xc = max(x, _EXP_LO)
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.float32(1.0) + r * (np.float32(1.0) + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    v = p * scale
    return v if x > _EXP_LO else np.float32(0.0)


_Q1, _Q2, _Q3, _Q4, _Q5, _Q6 = _P2[1:]
_EXP2_LO = np.float32(-126.0)


@njit(inline="always")
def _exp2_nonpos(y):
    """2^y for y <= 0 (up to a rounding), 0 below -126 (where 2^y is denormal): y = n + r with n = round(y), r
    exact (|r| <= 1/2), 2^r by _math's degree-6 polynomial, 2^n in the exponent bits. For softmax's
    exp(scale s - max) as 2^(c s - c max), c = scale log2(e): the fused multiply-add that forms y rounds as the one
    that forms exp's argument, and the range reduction then costs one subtraction instead of two multiply-adds
    (the pass over a 256 x 4096 score block: 0.70 -> 0.61 ms; same accuracy, ~5e-7 relative on the
    probabilities above 1e-4 against float64)."""
    yc = max(y, _EXP2_LO)
    n = np.floor(yc + np.float32(0.5))
    r = yc - n
    p = np.float32(1.0) + r * (_Q1 + r * (_Q2 + r * (_Q3 + r * (_Q4 + r * (_Q5 + r * _Q6)))))
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    v = p * scale
    return v if y > _EXP2_LO else np.float32(0.0)


@njit(nogil=True, cache=True, fastmath={"contract", "reassoc"})
def _softmax_block(s, n, scale, mask, has_mask, rowmax, has_rowmax, inv, normalise):
    """In place over the rows of s (rows, w): s <- exp(scale * s + mask - rowmax), inv[r] <- 1 / rowsum; the
    probabilities multiplied by inv if normalise, else left for the caller to scale where it is cheapest. A row that
    is entirely -inf gives inv = inf (and NaN downstream), as in PyTorch. Serial; releases the GIL.

    Rows may be padded (attention's score blocks): w >= n, scores in columns < n. Without a mask columns >= n are
    first set to -inf, and the exp loop then runs over all w columns (w a multiple of 8 keeps it free of a scalar
    tail, which costs ~20% on 77 keys), which leaves them 0 (scale > 0, as attention's 1 / sqrt(d) and
    softmax's 1); the row maxima of the unscaled scores (columns < n) are taken here, or given in rowmax if
    has_rowmax (numpy's max over long rows is faster than this loop, or than a max taken row by row inside the exp
    loop: the whole pass over a 256 x 4096 block 0.31 ms against 0.35; 0.70 against 0.81 with the float64 sums
    before). With a mask (rows, n), w must equal n, and the maxima are taken here, after it. The exp loop sums the
    probabilities as it stores them, in float32 partial sums that "reassoc" lets LLVM keep in vector registers (as
    PyTorch's SDPA sums in float32): one pass over the row, where a float64 sum after it made the pass 1.4-1.5x as
    long (256 x 4096 block, one thread, no max: 0.31 -> 0.20 ms; the probabilities the same bits, 1 / rowsum
    ~2e-7 from float64's, 1.3e-7 before)."""
    rows, w = s.shape
    for r in range(rows):
        row = s[r]
        acc = np.float32(0.0)
        if has_mask:
            mr = mask[r]
            for j in range(n):
                row[j] = row[j] * scale + mr[j]
            mx = max32(row, n)
            for j in range(n):
                v = _exp_nonpos(row[j] - mx)
                row[j] = v
                acc += v
        else:
            c = scale * _LOG2E
            mx = (rowmax[r] if has_rowmax else max32(row, n)) * c
            for j in range(n, w):
                row[j] = -np.inf
            for j in range(w):
                v = _exp2_nonpos(row[j] * c - mx)
                row[j] = v
                acc += v
        f = np.float32(1.0) / acc
        inv[r] = f
        if normalise:
            for j in range(n):
                row[j] *= f


_NUMPY_MAX_KEYS = 512  # from this many keys on, attention takes the row maxima with numpy


@njit(nogil=True, cache=True)
def _transpose_keys(k, kt):
    """k (Lk, C), one image's keys -> kt (heads, d, Lk): kt[h, e, j] = k[j, h d + e]. In blocks of 16 keys (a few
    times faster than numpy's strided copy: 2.5 vs 10 ms for the VAE's 4096 x 512)."""
    lk, c = k.shape
    heads, d, _ = kt.shape
    for j0 in range(0, lk, 16):
        j1 = min(lk, j0 + 16)
        for h in range(heads):
            for e in range(d):
                col = h * d + e
                for j in range(j0, j1):
                    kt[h, e, j] = k[j, col]


@njit(nogil=True, cache=True)
def _pack_keys(k, kp):
    """k (Lk, C), one image's keys -> kp (heads, Lk / PANEL, d, PANEL), each head's K^T in panels of PANEL keys
    (panels.gemm_panels' B): kp[h, p, e, t] = k[p PANEL + t, h d + e]."""
    heads, npan, d, _ = kp.shape
    for p in range(npan):
        for t in range(PANEL):
            key = k[p * PANEL + t]
            for h in range(heads):
                src = key[h * d:(h + 1) * d]
                dst = kp[h, p]
                for e in range(d):
                    dst[e, t] = src[e]


@njit(nogil=True, cache=True)
def _pack_values(v, vp):
    """v (Lk, C), one image's values -> vp (heads, d / PANEL, Lk, PANEL), each head's V in panels of PANEL of its
    channels (panels.gemm_panels_by_chunk's B): vp[h, p, j, t] = v[j, h d + p PANEL + t]."""
    heads, npd, lk, _ = vp.shape
    d = npd * PANEL
    for j in range(lk):
        row = v[j]
        for h in range(heads):
            for p in range(npd):
                src = row[h * d + p * PANEL:h * d + (p + 1) * PANEL]
                dst = vp[h, p, j]
                for t in range(PANEL):
                    dst[t] = src[t]


@njit(nogil=True, cache=True)
def _scores_panels(qf, q_off, ldq, d, nq, g, kpf, kp_off, npan, sf, lds):
    """The score blocks of a job's g heads, sf[gi nq lds + i lds + j] = q_h[i] . k_h[j] (j < npan PANEL), from the
    queries in qf (head gi's row i at q_off + gi d + i ldq) and the heads' packed keys (_pack_keys' panels, head gi's
    from kp_off + gi npan d PANEL)."""
    for gi in range(g):
        gemm_panels(qf, q_off + gi * d, ldq, nq, d, kpf, kp_off + gi * npan * d * PANEL, npan, sf, gi * nq * lds, lds)


@njit(nogil=True, cache=True)
def _values_rows(sf, lds, nq, lk, g, vf, v_off, of, o_off, ldo, d):
    """O = P V for a job's g heads of d (one of panels.ROW_WIDTHS; panels.gemm_rows): head gi's probabilities
    sf[gi nq lds + i lds + j] (j < lk) times its values vf[v_off + gi lk d + j d + e] into of[o_off + gi d + i ldo
    + e]."""
    for gi in range(g):
        gemm_rows(sf, gi * nq * lds, lds, nq, lk, vf, v_off + gi * lk * d, of, o_off + gi * d, ldo, d)


@njit(nogil=True, cache=True)
def _values_panels(sf, lds, nq, lk, g, vpf, vp_off, of, o_off, ldo, d):
    """O = P V for a job's g heads of d (a multiple of PANEL) from their values in panels (_pack_values; head gi's
    from vp_off + gi d lk): as _values_rows, by panels.gemm_panels_by_chunk."""
    for gi in range(g):
        gemm_panels_by_chunk(sf, gi * nq * lds, lds, nq, lk, vpf, vp_off + gi * d * lk, d // PANEL, of, o_off + gi * d,
                             ldo)


@njit(nogil=True, cache=True)
def _scale_out_rows(o, q0, nq, h0, hg, d, inv):
    """o (Lq, C), one image's output: o[q0 + i, (h0 + g) d + j] *= inv[g nq + i] for i < nq, g < hg, j < d."""
    for i in range(nq):
        for g in range(hg):
            f = inv[g * nq + i]
            c0 = (h0 + g) * d
            row = o[q0 + i, c0:c0 + d]  # indexed from 0 (o[q0 + i, c0 + j] stayed scalar: Numba's wraparound)
            for j in range(d):
                row[j] *= f


_COPY_MIN_KEYS = 2048  # from this many keys on, K^T and V are copied contiguous per head when there are several
# ... and from this many on where the copied keys go into panels (below): SD 1.5's and SDXL's 1024-token layers
# (2 x 8 heads of 80, 2 x 10 of 64; 2 threads, Zen 4, medians of 15) 36.1 -> 32.8 ms and 38.4 -> 34.1 ms, as fast
# as PyTorch's SDPA (33.3, 33.2) where the in-place path was 1.08-1.16x slower
_PACK_MIN_KEYS = 1024
_PANEL_MAX_D = 128  # heads up to this wide take Q K^T from keys packed in panels (panels.py) when they are copied
_MAX_QROWS = 256  # query rows per job at most
# Score blocks (per worker) at most: 4 MB where Q K^T reads keys packed once per image (panels); 16 MB where BLAS
# multiplies, since it packs K^T and V again at each call, a cost per job that its rows do not change: a job of
# fewer rows repacks all the keys for less work. 16 MB keeps 256 rows up to 16384 keys (the SDXL VAE's single head
# of 512 at 1024x1024: 3.99 -> 3.02 s, 9216 keys 1.07 -> 0.94; PyTorch's SDPA 2.85 s on the first); with packed
# keys the larger block is slower (heads of 64, 16384 keys 3.70 -> 3.91 s, 9216 1.14 -> 1.17; 2 threads, Zen 4)
_BLOCK_BYTES = 4 << 20
_BLAS_BLOCK_BYTES = 16 << 20
_MIN_JOBS = 8
_GROUP_BYTES = 1 << 20  # heads share a job while their score blocks together stay within this


def _partition(b: int, lq: int, lkp: int, heads: int, block_bytes: int) -> tuple[int, int]:
    """(query rows qb, heads hg) per job: a score block of hg x qb x lkp floats; qb rows of lkp within block_bytes
    (but qb >= 16) and at most _MAX_QROWS (blocks near L2 size; enough jobs to share out); heads grouped while the
    group's block stays within _GROUP_BYTES (one batched GEMM per group, so short key sequences, i.e.
    cross-attention, cost few Python calls per FLOP) but not below 8 jobs where smaller groups give more.
    Depends on the shapes only, never on the thread count, so that results do not depend on the worker count."""
    rows = max(16, block_bytes // (4 * lkp))
    qb = min(lq, rows, _MAX_QROWS)
    hg = max(1, min(heads, min(block_bytes, _GROUP_BYTES) // (4 * lkp * qb)))

    def njobs(g: int) -> int:
        return b * -(-heads // g) * -(-lq // qb)

    while hg > 1 and njobs(hg) < _MIN_JOBS:
        hg = (hg + 1) // 2
    return qb, hg


def _channels_contiguous(a: np.ndarray) -> np.ndarray:
    """a as float32 with unit stride along its channels (the last axis) and whole tokens: views such as the q, k
    and v thirds of a fused projection's output are used as they are (no copy), anything else is copied."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3 and a.strides[2] == 4 and min(a.strides) > 0:
        return a
    return np.ascontiguousarray(a)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    heads: int,
    mask: np.ndarray | None = None,
    block_bytes: int | None = None,
    nworkers: int | None = None,
    max_slices: int | None = None,
) -> np.ndarray:
    """Multi-head scaled dot-product attention. q: (B, Lq, C), k and v: (B, Lk, C) -> (B, Lq, C); q, k and v may
    be views whose tokens are further apart than C (e.g. np.split of a fused q/k/v projection): read in place.

    Scale 1/sqrt(C/heads). mask, if given, is added to the scores and broadcasts to (B, heads, Lq, Lk) (e.g. a
    causal mask of -inf). Each job's score block (heads in its group x query rows x Lk floats) stays under
    block_bytes (but holds at least 16 query rows; default 4 MB where the keys are packed in panels, else 16 MB).
    Bit-identical whatever the number of workers.
    max_slices: diffusers' attention slicing -- the score blocks of all the jobs running at once hold at most
    max_slices (image x head) slices of Lq x Lk scores (block_bytes is lowered to fit; same results).
    """
    q, k, v = _channels_contiguous(q), _channels_contiguous(k), _channels_contiguous(v)
    b, lq, c = q.shape
    lk = k.shape[1]
    if c % heads or k.shape != (b, lk, c) or v.shape != (b, lk, c):
        raise ValueError(f"attention: shapes q {q.shape} k {k.shape} v {v.shape}, heads {heads}")
    d = c // heads
    scale = np.float32(1.0 / math.sqrt(d))
    m4 = None
    if mask is not None:
        m4 = np.broadcast_to(np.asarray(mask, dtype=np.float32), (b, heads, lq, lk))
    # score rows padded to a multiple of 8 columns (the exp loop then has no scalar tail), which GEMMs skip
    lkp = lk if m4 is not None else -(-lk // 8) * 8
    # The copied keys go into panels of PANEL keys when the heads are narrow (up to _PANEL_MAX_D) and the keys
    # fill whole panels (and the CPU has the registers for it, panels.AVAILABLE): Q K^T is then panels.gemm_panels'
    # register tiles, 1.4-1.5x OpenBLAS's speed on heads of 40-80 (its packing of both operands at each call weighs
    # on an inner dimension that short), the same numbers. So do a single head's keys when the head fills whole
    # panels (the VAE's head of 512), and its values too (_pack_values: P V by panels.gemm_panels_by_chunk): Q K^T
    # and P V ~1.2x and ~1.1x OpenBLAS's speed there; from _COPY_MIN_KEYS keys on, since the copies cost more than
    # they save on fewer (one head of 512, 2 threads, Zen 4, time against BLAS's: 1024 keys 1.07, 2048 0.95, 4096
    # 0.89, 9216 0.90).
    packable = (panels.AVAILABLE and lk % PANEL == 0 and lk == lkp
                and (d <= _PANEL_MAX_D if heads > 1 else d % PANEL == 0))
    if heads > 1:
        copied = lk >= _COPY_MIN_KEYS or (packable and lk >= _PACK_MIN_KEYS)
    else:
        copied = packable and lk >= _COPY_MIN_KEYS
    packed = packable and copied
    if block_bytes is None:
        block_bytes = _BLOCK_BYTES if packed else _BLAS_BLOCK_BYTES
    if max_slices is not None:
        nw_max = _pool.workers() if nworkers is None else max(1, nworkers)
        block_bytes = min(block_bytes, max(1, max_slices) * lq * lk * 4 // nw_max)
    qb, hg = _partition(b, lq, lkp, heads, block_bytes)
    jobs = [(bi, h0, q0) for bi in range(b) for h0 in range(0, heads, hg) for q0 in range(0, lq, qb)]
    out = np.empty((b, lq, c), dtype=np.float32)
    nw = min(_pool.workers() if nworkers is None else max(1, nworkers), len(jobs))
    # Q (B, H, Lq, d), O, K^T (B, H, d, Lk) and V (B, H, Lk, d) as strided views, except where the keys are long
    # and split into heads: on 4096 keys, 8 heads of 40 or 5 of 64, BLAS packs contiguous operands 5-7% faster than
    # rows of d floats C apart, which pays for copying K^T and V per head (an image per worker, before the jobs);
    # on shorter keys the copies cost more than they save (256 keys, 1280 channels, 8 heads, batch 2: 10.3 -> 6.5
    # ms), and a single head is contiguous already (but goes into panels where it fills them: packable, above).
    # Same results either way: BLAS reads the same numbers.
    rows_pv = packed and d in ROW_WIDTHS  # and P V by panels.gemm_rows' register tiles (1.25-1.4x OpenBLAS's speed)
    panels_pv = packed and not rows_pv and d % PANEL == 0  # ... or by gemm_panels_by_chunk's, from V in panels
    qv = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    ov = out.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    if not copied:
        kt = k.reshape(b, lk, heads, d).transpose(0, 2, 3, 1)
        vv = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    else:
        npan = lk // PANEL
        kt = np.empty((b, heads, npan, d, PANEL) if packed else (b, heads, d, lk), dtype=np.float32)
        vv = np.empty((b, heads, d // PANEL, lk, PANEL) if panels_pv else (b, heads, lk, d), dtype=np.float32)
        nwc = min(b, _pool.workers() if nworkers is None else max(1, nworkers))

        def copy(i: int) -> None:  # an image per worker
            for bi in range(i, b, nwc):
                if packed:
                    _pack_keys(k[bi], kt[bi])
                else:
                    _transpose_keys(k[bi], kt[bi])
                if panels_pv:
                    _pack_values(v[bi], vv[bi])
                else:
                    vv[bi] = v[bi].reshape(lk, heads, d).transpose(1, 0, 2)

        _pool.run(copy, nwc)
    if packed:
        qf, ktf, vvf, outf = flat(q), kt.reshape(-1), vv.reshape(-1), out.reshape(-1)
        sq0, sq1 = q.strides[0] // 4, q.strides[1] // 4
    # the probabilities are normalised before P V when that is the narrower of the two (keys fewer than d: the
    # 77 keys of cross-attention on 160-wide heads), else the output rows after it
    norm_p = lk < d
    nxt = itertools.count()  # jobs handed out one at a time (next() is atomic): a thread slowed down by a busy
    # machine takes fewer; which thread runs a job never changes its result

    def work(_: int) -> None:
        sbuf = np.zeros(hg * qb * lkp, dtype=np.float32)  # padding columns: 0 here, 0 from the softmax after
        inv = np.empty(hg * qb, dtype=np.float32)
        rowmax = np.empty(hg * qb, dtype=np.float32)
        while True:
            i = next(nxt)
            if i >= len(jobs):
                return
            bi, h0, q0 = jobs[i]
            h1 = min(heads, h0 + hg)
            q1 = min(lq, q0 + qb)
            g, nq = h1 - h0, q1 - q0
            s = sbuf[: g * nq * lkp].reshape(g, nq, lkp)
            if packed:
                _scores_panels(qf, bi * sq0 + q0 * sq1 + h0 * d, sq1, d, nq, g, ktf,
                               (bi * heads + h0) * npan * d * PANEL, npan, sbuf, lkp)
            else:
                np.matmul(qv[bi, h0:h1, q0:q1], kt[bi, h0:h1], out=s[:, :, :lk])
            s2 = s.reshape(g * nq, lkp)
            if m4 is None:
                if lk >= _NUMPY_MAX_KEYS:
                    np.max(s2[:, :lk], axis=1, out=rowmax[: g * nq])
                _softmax_block(s2, lk, scale, _NO_MASK, False, rowmax, lk >= _NUMPY_MAX_KEYS, inv, norm_p)
            else:
                mb = np.ascontiguousarray(m4[bi, h0:h1, q0:q1]).reshape(g * nq, lk)
                _softmax_block(s2, lk, scale, mb, True, rowmax, False, inv, norm_p)
            if rows_pv:
                _values_rows(sbuf, lkp, nq, lk, g, vvf, (bi * heads + h0) * lk * d, outf,
                             (bi * lq + q0) * c + h0 * d, c, d)
            elif panels_pv:
                _values_panels(sbuf, lkp, nq, lk, g, vvf, (bi * heads + h0) * lk * d, outf,
                               (bi * lq + q0) * c + h0 * d, c, d)
            else:
                np.matmul(s[:, :, :lk], vv[bi, h0:h1], out=ov[bi, h0:h1, q0:q1])
            if not norm_p:
                _scale_out_rows(out[bi], q0, nq, h0, g, d, inv)

    _pool.run(work, nw)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along axis (float32 out and row sums)."""
    x = np.asarray(x, dtype=np.float32)
    xm = np.moveaxis(x, axis, -1)
    n = xm.shape[-1]
    s = np.array(xm.reshape(-1, n), dtype=np.float32, copy=True)  # never write into the caller's array
    inv = np.empty(s.shape[0], dtype=np.float32)
    _softmax_block(s, n, np.float32(1.0), _NO_MASK, False, _NO_ROWMAX, False, inv, True)
    return np.moveaxis(s.reshape(xm.shape), -1, axis)
