"""Linear layers by panels.py's register tiles, from weights packed once in panels of 32 output channels.

y = x W^T + b with W (N, K) as PyTorch stores it, packed as (N / 32, K, 32): panel p holds the 32 outputs
32 p .. 32 p + 31 of every input, contiguous. The product runs panel group by panel group (GROUP panels, 256
outputs), over the inner dimension in equal chunks of at most KC steps (a panel's chunk, up to 64 KB, stays in L2
beside the rows' chunk while the tiles of all the rows pass over it), each chunk's sums added to the last's, as BLAS
adds its blocks; the groups are shared out to the kernel workers. Chunks of 512 rather than 256 steps, and equal
ones (SD 1.5's 320 inputs: one chunk, not 256 + 64) took every SD layer shape past OpenBLAS (2 threads, Zen 4,
GFLOP/s, OpenBLAS / chunks of 256 / equal chunks of 512: 8192 x 320 x 1280 190 / 173-182 / 195-201, 8192 x 1280 x
320 198 / 188-215 / 215-218, 2048 x 640 x 5120 186 / 185-187 / 199-203, 256 x 1280 x 10240 182 / 211-215 /
215-222); SD 1.5's guided UNet forward from panels then took 0.954 of its time with OpenBLAS (alternating forwards).

Why: OpenBLAS packs the weights again at every call, which weighs most where the rows are few (SDXL's 256-token
layers above; the text's 77 tokens, 77 x 2048 x 2560: 125 -> 182 GFLOP/s with chunks of 256). Where
sdgen.models.layers' linear_panels says so (--linear-panels; by default the UNet's layers in denoising loops of 10
forwards and more), a layer's weights are packed at its first call, each chunk of W right before its tiles use it,
and replace W; every call of the layer then multiplies by the panels, whatever its rows, so that its numbers never
depend on what it ran before. Isolated, that first call costs 1.3-1.4x a packed one; in a whole forward it costs
the new memory too (8.9 GB of weights for SDXL: the first forward at 512x512 ~14.5 s instead of ~9.4; SD 1.5's
+1.2-1.6 s), which short runs would not win back.

The tile needs 32 vector registers (panels.AVAILABLE: AVX-512VL); elsewhere the layers keep BLAS.
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit, types
from numba.extending import overload

from . import _pool, panels
from .gemm import _NO_BIAS, _NO_RES2, add_bias_residual, linear_operands
from .panels import PANEL, tile_rows
from .weights import F16_TABLE, HALF_BF16, HALF_F16, HAS_F16C, widen_run

KC = 512  # inner-dimension steps per pass of the tiles at most (a panel's chunk: 64 KB)
GROUP = 8  # panels per job (256 outputs)
ROW_BLOCK = 512  # rows per pass over a group (their chunk stays in L2 beside the group's panels)
# the weights' dtypes that pack (uint16: bfloat16 bits) -> what products' half says of them (0: float32)
_HALF = {np.dtype(np.float32): 0, np.dtype(np.float16): HALF_F16, np.dtype(np.uint16): HALF_BF16}


def packable(weight: np.ndarray) -> bool:
    """Whether a linear layer with this weight (N, K) runs from packed panels: float32, float16 or bfloat16 bits
    (uint16), whole panels of outputs, a CPU with the registers for the tiles (and F16C, which all such CPUs have)."""
    return (panels.AVAILABLE and weight.dtype in _HALF and weight.ndim == 2 and weight.shape[0] % PANEL == 0
            and (weight.dtype == np.float32 or HAS_F16C))


def empty_panels(out_features: int, in_features: int, dtype=np.float32) -> np.ndarray:
    """The packed weights' array, (N / 32, K, 32) of the weights' dtype, for linear(..., weight=W) to fill.
    Half-precision panels keep the weights' size; the tiles read each chunk of them widened into float32 (exact)."""
    return np.empty((out_features // PANEL, in_features, PANEL), dtype=dtype)


def _chunk(wp, off, n, buf, half):
    """(array, offset) where the float32 values of the panels' elements wp[off : off + n] lie: wp itself when it is
    float32, else buf, into which they are widened (Numba picks the version by wp's dtype)."""


@overload(_chunk, jit_options={"nogil": True})
def _chunk_numba(wp, off, n, buf, half):
    if wp.dtype == types.float32:
        return lambda wp, off, n, buf, half: (wp, off)

    def widened(wp, off, n, buf, half):
        widen_run(wp, off, buf, 0, n, half, F16_TABLE)
        return buf, 0

    return widened


@njit(nogil=True, cache=True)
def _pack_chunk(w, k, wp, p, e0, kk):
    """Panel p's inner steps [e0, e0 + kk) from the flat (N, K) weights w into the flat packed wp."""
    base = p * k * PANEL + e0 * PANEL
    for t in range(PANEL):
        src = w[(p * PANEL + t) * k + e0:(p * PANEL + t) * k + e0 + kk]  # indexed from 0 (Numba's wraparound)
        dst = wp[base + t:base + t + kk * PANEL]
        for e in range(kk):
            dst[e * PANEL] = src[e]


@njit(nogil=True, cache=True)
def products(a, m, k, wp, n, c, g0, g1, w, pack, r_lo, r_hi, half):
    """c[i, 32 g0 : 32 g1] = a[i] @ W^T for r_lo <= i < r_hi, from the packed panels g0 .. g1 - 1 of wp; flat
    arrays, a (m, k) and c (m, n) float32, wp float32 or the bits (uint16) of half-precision panels (half: HALF_F16
    or HALF_BF16), each chunk of those widened once per block of rows, into a buffer that stays in L1/L2 while the
    block's tiles use it. pack: first make those panels from w (flat (n, k), wp's dtype), each chunk right before
    its use (then r_lo must be 0). Rows in blocks of ROW_BLOCK; per block, chunk by chunk of the inner steps
    (equal chunks of at most KC), panel by panel. Serial; releases the GIL."""
    step = -(-k // -(-k // KC))  # the inner dimension in equal chunks of at most KC
    buf = np.empty(step * PANEL if half else 1, dtype=np.float32)
    for r0 in range(r_lo, max(r_hi, r_lo + 1), ROW_BLOCK):  # (no rows: the packing only)
        mr = min(ROW_BLOCK, r_hi - r0)
        for e0 in range(0, k, step):
            kk = min(step, k - e0)
            more = 1 if e0 > 0 else 0
            for p in range(g0, g1):
                if pack and r0 == r_lo:
                    _pack_chunk(w, k, wp, p, e0, kk)
                if mr > 0:
                    b, b_off = _chunk(wp, p * k * PANEL + e0 * PANEL, kk * PANEL, buf, half)
                    tile_rows(c, r0 * n + p * PANEL, n, a, r0 * k + e0, k, mr, b, b_off, PANEL, kk, more)


def _jobs(m: int, npan: int, nw: int, pack: bool) -> list[tuple[int, int, int, int]]:
    """(first panel, end panel, first row, end row) of each job: groups of up to GROUP panels, times blocks of
    ROW_BLOCK rows (one block of all the rows when packing, so that each panel is packed once, before its use);
    groups made smaller while there are fewer than 4 jobs per worker (so the workers finish together: SD 1.5's
    320-output layers, 10 panels, in groups of 8 and 2 ran 1.5x behind BLAS)."""
    blocks = [(0, m)] if pack else [(r, min(m, r + ROW_BLOCK)) for r in range(0, max(m, 1), ROW_BLOCK)]
    gp = GROUP
    while gp > 1 and -(-npan // gp) * len(blocks) < 4 * nw:
        gp //= 2
    return [(g, min(npan, g + gp), r0, r1) for r0, r1 in blocks for g in range(0, npan, gp)]


def linear(x: np.ndarray, wp: np.ndarray, bias: np.ndarray | None, residual: np.ndarray | None = None,
           out: np.ndarray | None = None, weight: np.ndarray | None = None, nworkers: int | None = None) -> np.ndarray:
    """x @ W^T + bias (+ residual) over the last axis of x, as gemm.linear, with W packed in wp ((N / 32, K, 32),
    empty_panels); weight: W itself (N, K) of wp's dtype, to pack into wp during this call (wp is then complete).
    Half-precision panels give the numbers of float32 panels of the same weights widened. Bias and
    residual are added by each worker to its outputs while they are in cache. nworkers: threads (default
    _pool.workers()); the numbers do not depend on it."""
    npan, k, _ = wp.shape
    n = npan * PANEL
    a, y, res2, lead = linear_operands(x, k, n, residual, out)
    m = a.shape[0]
    has_bias = bias is not None
    bb = np.asarray(bias, dtype=np.float32) if has_bias else _NO_BIAS
    half = _HALF[wp.dtype]
    bits = np.float32 if half == 0 else np.uint16  # what the kernel sees of the panels (Numba has no float16)
    pack = weight is not None
    if pack and weight.dtype != wp.dtype:
        raise ValueError(f"linear: {weight.dtype} weights for {wp.dtype} panels")
    wf = np.ascontiguousarray(weight).reshape(-1).view(bits) if pack else np.zeros(1, dtype=bits)
    af, wpf, yf = a.reshape(-1), wp.reshape(-1).view(bits), y.reshape(-1)
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    jobs = _jobs(m, npan, nw, pack)
    nxt = itertools.count()  # jobs handed out one at a time: a worker slowed down by a busy machine takes fewer

    def part(_: int) -> None:
        while (i := next(nxt)) < len(jobs):
            g0, g1, r0, r1 = jobs[i]
            products(af, m, k, wpf, n, yf, g0, g1, wf, pack, r0, r1, half)
            if r1 > r0 and (has_bias or res2 is not None):
                add_bias_residual(y[r0:r1], bb, has_bias, _NO_RES2 if res2 is None else res2[r0:r1],
                                  res2 is not None, g0 * PANEL, g1 * PANEL)

    _pool.run(part, min(nw, len(jobs)))
    return y.reshape(*lead, n) if out is None else out
