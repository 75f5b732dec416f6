"""Linear layers by panels.py's register tiles, from weights in panels of 32 output channels.

y = x W^T + b with W (N, K) as PyTorch stores it, in panels (N / 32, K, 32): panel p holds the 32 outputs
32 p .. 32 p + 31 of every input, contiguous. The product runs panel group by panel group (GROUP panels, 256
outputs), over the inner dimension in equal chunks of at most KC steps (a panel's chunk, up to 64 KB, stays in L2
beside the rows' chunk while the tiles of all the rows pass over it), each chunk's sums added to the last's, as BLAS
adds its blocks; the groups are shared out to the kernel workers. Chunks of 512 rather than 256 steps, and equal
ones (SD 1.5's 320 inputs: one chunk, not 256 + 64) took every SD layer shape past OpenBLAS (2 threads, Zen 4,
GFLOP/s, OpenBLAS / chunks of 256 / equal chunks of 512: 8192 x 320 x 1280 190 / 173-182 / 195-201, 8192 x 1280 x
320 198 / 188-215 / 215-218, 2048 x 640 x 5120 186 / 185-187 / 199-203, 256 x 1280 x 10240 182 / 211-215 /
215-222).

Two ways to the panels (sdgen.models.layers' linear_panels): from W as it lies (products_unpacked, the default),
each chunk packed into a 64 KB buffer right before the tiles of a block of rows use it (8 x 8 blocks transposed in
registers, half-precision weights widened as they are loaded), then dropped; or packed once, at the layer's first
call, into panels that replace W (products, --linear-panels on; half-precision weights in half-precision panels,
each chunk widened as it is used). Both give the same sums. Packing at every use costs little where the rows are
many and OpenBLAS's packing (which also runs at every call, and more slowly) weighs most where they are few: the
text's 77 tokens, SDXL's 256-token layers; the panels kept for the run cost a pass over the weights into new
memory at the first call (8.9 GB for SDXL: its first forward at 512x512 ~14.5 s instead of ~9.4; SD 1.5's
+2.5 s) and then gain 0-1% a forward.

The tile needs 32 vector registers (panels.AVAILABLE: AVX-512VL); elsewhere the layers keep BLAS.
"""

from __future__ import annotations

import itertools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import _pool, panels
from .gemm import linear_operands
from .panels import NO_STREAM, NOTHING, PANEL, tile_rows_then
from .weights import F16_TABLE, HALF_BF16, HALF_F16, HAS_F16C, widen_bits_ir, widen_one, widen_run

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


def _chunk(wp, off, n, buf, half, table):
    """(array, offset) where the float32 values of the panels' elements wp[off : off + n] lie: wp itself when it is
    float32, else buf, into which they are widened (table: F16_TABLE; Numba picks the version by wp's dtype)."""


@overload(_chunk, jit_options={"nogil": True})
def _chunk_numba(wp, off, n, buf, half, table):
    if wp.dtype == types.float32:
        return lambda wp, off, n, buf, half, table: (wp, off)

    def widened(wp, off, n, buf, half, table):
        widen_run(wp, off, buf, 0, n, half, table)
        return buf, 0

    return widened


@intrinsic
def _transpose8(typingctx, dst, d_off, ldd, src, s_off, lds, half):
    """dst[d_off + j ldd + i] = src[s_off + i lds + j] for i, j < 8: an 8 x 8 block transposed in registers (8
    loads, 24 shuffles, 8 stores); dst float32; src float32, or uint16 bits of float16 (half = HALF_F16) or bfloat16
    (HALF_BF16) widened as they are loaded; 1-D arrays, no bounds check."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == types.float32
            and src.dtype in (types.float32, types.uint16) and dst.ndim == src.ndim == 1):
        return None
    sig = types.void(dst, types.intp, types.intp, src, types.intp, types.intp, types.intp)
    bits = src.dtype == types.uint16

    def codegen(context, builder, signature, args):
        dv, do, ld, sv, so, ls, hv = args
        dp = context.make_array(signature.args[0])(context, builder, dv).data
        sp = context.make_array(signature.args[3])(context, builder, sv).data
        vec = ir.VectorType(ir.FloatType(), 8)
        i64 = do.type

        def shuffle(a, b, idx):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), idx))

        def row(i, widen):
            ptr = builder.gep(sp, [builder.add(so, builder.mul(ir.Constant(i64, i), ls))])
            if widen is None:
                return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)
            raw = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), 8).as_pointer()), align=2)
            return widen_bits_ir(builder, raw, widen)

        def block(widen):
            r = [row(i, widen) for i in range(8)]
            # pairs of rows interleaved, then pairs of pairs, then the 128-bit halves: column j in vector j
            t = [shuffle(r[q], r[q + 1], idx) for q in range(0, 8, 2)
                 for idx in ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])]
            lo, hi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            u = [shuffle(t[a], t[a + 2], idx) for a in (0, 1, 4, 5) for idx in (lo, hi)]
            first, second = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
            cols = [shuffle(u[j], u[j + 4], first) for j in range(4)] + [shuffle(u[j], u[j + 4], second)
                                                                          for j in range(4)]
            for j in range(8):
                at = builder.gep(dp, [builder.add(do, builder.mul(ir.Constant(i64, j), ld))])
                builder.store(cols[j], builder.bitcast(at, vec.as_pointer()), align=4)

        if not bits:
            block(None)
        else:
            with builder.if_else(builder.icmp_signed("==", hv, ir.Constant(hv.type, HALF_F16))) as (f16, bf16):
                with f16:
                    block(HALF_F16)
                with bf16:
                    block(HALF_BF16)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _pack_widened(w, k, buf, p, e0, kk, half, table):
    """buf[e PANEL + t] = W[32 p + t, e0 + e] as float32 for e < kk, t < PANEL: panel p's chunk of inner steps
    [e0, e0 + kk) from the flat (N, K) weights w (float32, or half-precision bits, half as for _transpose8; table:
    F16_TABLE, for the last steps), in 8 x 8 blocks transposed in registers (~4-8x the scalar copy's speed)."""
    base = p * PANEL * k + e0
    e = 0
    while e + 8 <= kk:
        for t0 in range(0, PANEL, 8):
            _transpose8(buf, e * PANEL + t0, PANEL, w, base + t0 * k + e, k, half)
        e += 8
    if e < kk:
        for t in range(PANEL):
            _widen_tail(w, base + t * k + e, buf, e * PANEL + t, PANEL, kk - e, half, table)


@njit(inline="always")
def _widen_tail(w, s_off, buf, d_off, step, n, half, table):
    """buf[d_off + i step] = w[s_off + i] as float32 for i < n (the last few inner steps of a chunk)."""
    for i in range(n):
        buf[d_off + i * step] = _as_f32(w[s_off + i], half, table)


def _as_f32(v, half, table):
    """One element of a weight as float32: itself, or float16 / bfloat16 bits widened (weights.widen_one; Numba
    picks the version by type)."""


@overload(_as_f32, jit_options={"nogil": True})
def _as_f32_numba(v, half, table):
    if v == types.float32:
        return lambda v, half, table: v
    return lambda v, half, table: widen_one(v, half, table)


@njit(inline="always")
def _residual_stream(res, co, ldc, m):
    """The stream (panels.tile_rows_then's pf .. pf_lines) over the bytes of the residual res (flat float32) of its
    rows 6 .. m - 1 of a panel's tiles whose first row starts at float co (rows ldc floats apart): 3 lines for each
    row of 32 floats (128 bytes, which span 3 lines unless aligned), shared out 18 lines to a tile of 6 rows, so
    that each tile fetches the next tile's rows while it multiplies: where it is read from memory, the residual
    cost SD's layers (8192 x 320 x 320 .. 256 x 5120 x 1280, 2 threads, Zen 4) 1-15% more time than a bias alone,
    and 0-11% with this (never more; in some processes no less, for reasons not established)."""
    return res.view(np.uint8), (co + 6 * ldc) * 4, ldc * 4, 3, (m - 6) * 3


@njit(nogil=True, cache=True)
def products_unpacked(a, m, k, w, ldc, c, c_p0, g0, g1, r_lo, r_hi, half, table, z, res, then):
    """c[i, 32 (c_p0 + g0) : 32 (c_p0 + g1)] = a[i] @ W[32 g0 : 32 g1]^T for r_lo <= i < r_hi (a block of at most
    a few ROW_BLOCK rows; c's rows ldc apart), from W (flat (n, k): float32, or the bits of half-precision weights,
    half as in products) as it lies, each panel's chunk of inner steps packed (and widened) into a 64 KB buffer
    right before the block's tiles use it, then dropped: no memory kept and no first call that costs more, for
    layers run once or a few times. c_p0: the panel of c where W's outputs begin (a block of a fused layer's
    outputs). Chunk by chunk of the inner steps, panel by panel; the same sums as products from packed panels.
    z, res, then: the bias (n,) and residual (laid out as c) added as the last chunk's tiles store (then & 1, then &
    2: panels.tile_rows_then). table: F16_TABLE. While they multiply, the tiles prefetch the next chunk to pack
    from w's bytes: packing a chunk read from memory took 5.1 us against 1.6 from cache (32 x
    427 floats, one thread, Zen 4), 6-8% of the products of SDXL's 256-token layers, which pack each chunk for few
    rows; with the prefetch 256 x 1280 x 1280, 256 x 5120 x 1280 and 256 x 1280 x 10240 ran at 0.894 of the fp32
    peak on average instead of 0.868 (two rounds, 2 threads, weights cycled through memory; panels kept for the
    run: 0.89-0.94), an SDXL-Turbo forward in 0.966-0.974 of the time (alternating processes), SD 1.5's the same.
    On the last chunk of a layer that adds a residual the tiles prefetch the residual's rows instead
    (_residual_stream). Serial; releases the GIL."""
    step = -(-k // -(-k // KC))
    buf = np.empty(step * PANEL, dtype=np.float32)
    wb = w.view(np.uint8)  # the bytes the tiles prefetch
    size = w.itemsize
    for e0 in range(0, k, step):
        kk = min(step, k - e0)
        more = 1 if e0 > 0 else 0
        last = then if e0 + kk == k else 0
        for p in range(g0, g1):
            _pack_widened(w, k, buf, p, e0, kk, half, table)
            co = r_lo * ldc + (c_p0 + p) * PANEL
            if last & 2 and r_hi - r_lo > 6:
                # while the tiles run, each brings the next tile's rows of the residual it adds into L2
                pf, pf0, pld, lpr, lines = _residual_stream(res, co, ldc, r_hi - r_lo)
            else:
                # ... or the weights of the next chunk to pack: panel p + 1's, or the group's first panel's next
                # chunk (PANEL rows of W, k apart, as bytes: + 1 line, for rows that do not start on one)
                q, e1 = (p + 1, e0) if p + 1 < g1 else (g0, e0 + step)
                k1 = min(step, k - e1) if e1 < k else 0
                lpr = -(-k1 * size // 64) + 1
                pf, pf0, pld, lines = wb, (q * PANEL * k + e1) * size, k * size, PANEL * lpr if k1 > 0 else 0
            tile_rows_then(c, co, ldc, a, r_lo * k + e0, k, r_hi - r_lo, buf, 0, PANEL, kk, more, z,
                           (c_p0 + p) * PANEL, res, co, last, pf, pf0, pld, lpr, lines)


@njit(nogil=True, cache=True)
def _pack_chunk(w, k, wp, p, q, e0, kk):
    """Panel p's inner steps [e0, e0 + kk) from the flat (N, K) weights w into panel q of the flat packed wp."""
    base = q * k * PANEL + e0 * PANEL
    for t in range(PANEL):
        src = w[(p * PANEL + t) * k + e0:(p * PANEL + t) * k + e0 + kk]  # indexed from 0 (Numba's wraparound)
        dst = wp[base + t:base + t + kk * PANEL]
        for e in range(kk):
            dst[e * PANEL] = src[e]


@njit(nogil=True, cache=True)
def products(a, m, k, wp, n, c, g0, g1, w, w_p0, pack, r_lo, r_hi, half, table, z, res, then):
    """c[i, 32 g0 : 32 g1] = a[i] @ W^T for r_lo <= i < r_hi, from the packed panels g0 .. g1 - 1 of wp; flat
    arrays, a (m, k) and c (m, n) float32, wp float32 or the bits (uint16) of half-precision panels (half: HALF_F16
    or HALF_BF16), each chunk of those widened once per block of rows, into a buffer that stays in L1/L2 while the
    block's tiles use it (table: F16_TABLE). pack: first make those panels from w (flat (n_w, k), wp's dtype, whose
    panel 0 is wp's panel w_p0: a block of a fused layer's outputs), each chunk right before its use (then r_lo
    must be 0). Rows in blocks of ROW_BLOCK; per block, chunk by chunk of the inner steps (equal chunks of at most
    KC), panel by panel. z, res, then: as products_unpacked. Serial; releases the GIL."""
    step = -(-k // -(-k // KC))  # the inner dimension in equal chunks of at most KC
    buf = np.empty(step * PANEL if half else 1, dtype=np.float32)
    for r0 in range(r_lo, max(r_hi, r_lo + 1), ROW_BLOCK):  # (no rows: the packing only)
        mr = min(ROW_BLOCK, r_hi - r0)
        for e0 in range(0, k, step):
            kk = min(step, k - e0)
            more = 1 if e0 > 0 else 0
            last = then if e0 + kk == k else 0
            for p in range(g0, g1):
                if pack and r0 == r_lo:
                    _pack_chunk(w, k, wp, p - w_p0, p, e0, kk)
                if mr > 0:
                    b, b_off = _chunk(wp, p * k * PANEL + e0 * PANEL, kk * PANEL, buf, half, table)
                    co = r0 * n + p * PANEL
                    pf, pf0, pld, lpr, lines = (_residual_stream(res, co, n, mr) if last & 2 and mr > 6
                                                 else (NO_STREAM, 0, 0, 1, 0))
                    tile_rows_then(c, co, n, a, r0 * k + e0, k, mr, b, b_off, PANEL, kk, more, z, p * PANEL, res,
                                   co, last, pf, pf0, pld, lpr, lines)


def _jobs(m: int, part_panels: list[int], nw: int, pack: bool) -> list[tuple[int, int, int, int, int]]:
    """(block of W, first panel, end panel, first row, end row) of each job, panels counted within the block:
    each block's panels in near-equal groups of up to GROUP (a group never spans two blocks, e.g. the q,
    k and v weights of a fused layer), times blocks of ROW_BLOCK rows (one block of all the rows when packing, so
    that each panel is packed once, before its use); groups made smaller while there are fewer than 4 jobs per
    worker (so the workers finish together: SD 1.5's 320-output layers, 10 panels, in groups of 8 and 2 ran 1.5x
    behind BLAS)."""
    blocks = [(0, m)] if pack else [(r, min(m, r + ROW_BLOCK)) for r in range(0, max(m, 1), ROW_BLOCK)]

    def groups(gp: int) -> list[tuple[int, int, int]]:
        out = []
        for j, npan in enumerate(part_panels):
            ng = -(-npan // gp)
            cuts = [npan * i // ng for i in range(ng + 1)]
            out += [(j, g0, g1) for g0, g1 in zip(cuts, cuts[1:])]
        return out

    gp = GROUP
    while gp > 1 and len(groups(gp)) * len(blocks) < 4 * nw:
        gp //= 2
    return [(j, g0, g1, r0, r1) for r0, r1 in blocks for j, g0, g1 in groups(gp)]


def linear(x: np.ndarray, wp: np.ndarray | None, bias: np.ndarray | None, residual: np.ndarray | None = None,
           out: np.ndarray | None = None, weight=None, nworkers: int | None = None) -> np.ndarray:
    """x @ W^T + bias (+ residual) over the last axis of x, as gemm.linear, with W packed in wp ((N / 32, K, 32),
    empty_panels); weight: W itself (N, K) of wp's dtype, to pack into wp during this call (wp is then complete).
    wp None: from weight as it lies (float32, float16 or bfloat16 bits; packable), each chunk packed for its use
    only (products_unpacked). weight may also be a list of blocks of W's rows (each (N_i, K), packable, one dtype:
    a fused layer's q, k and v weights where they lie), which are read in place, never joined. Half-precision
    weights give the numbers of float32 ones widened, and all three ways the same numbers. Bias and residual are
    added by the tiles as they store the sums, ((x W^T) + b) + r as a pass of their own would round. nworkers:
    threads (default _pool.workers()); the numbers do not depend on it."""
    unpacked = wp is None
    parts = [] if weight is None else [weight] if isinstance(weight, np.ndarray) else list(weight)
    if unpacked:
        if not parts or any(not packable(w) or w.shape[1] != parts[0].shape[1] or w.dtype != parts[0].dtype
                            for w in parts):
            raise ValueError(f"linear: weights {[(w.dtype, w.shape) for w in parts]} do not fill panels")
        k, dtype = parts[0].shape[1], parts[0].dtype
        n = sum(w.shape[0] for w in parts)
    else:
        npan, k, _ = wp.shape
        n, dtype = npan * PANEL, wp.dtype
        if parts and sum(w.shape[0] for w in parts) != n:
            raise ValueError(f"linear: weights of {[w.shape for w in parts]} for {n}-output panels")
    a, y, res2, lead = linear_operands(x, k, n, residual, out)
    m = a.shape[0]
    # the bias and the residual are added by the tiles as they store the sums (panels.tile_rows_then)
    zf = NOTHING if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    if bias is not None and zf.size != n:
        raise ValueError(f"linear: a bias of {zf.size} for {n} outputs")
    rf = NOTHING if res2 is None else res2.reshape(-1)
    then = (0 if bias is None else 1) | (0 if res2 is None else 2)
    half = _HALF[dtype]
    bits = np.float32 if half == 0 else np.uint16  # what the kernel sees of the weights (Numba has no float16)
    pack = bool(parts) and not unpacked
    if any(w.dtype != dtype for w in parts):
        raise ValueError(f"linear: {parts[0].dtype} weights for {dtype} panels")
    wfs = [np.ascontiguousarray(w).reshape(-1).view(bits) for w in parts] or [np.zeros(1, dtype=bits)]
    part_panels = [w.shape[0] // PANEL for w in parts] if parts else [npan]
    p0s = [sum(part_panels[:j]) for j in range(len(part_panels))]  # where each block's panels begin
    af, yf = a.reshape(-1), y.reshape(-1)
    wpf = None if unpacked else wp.reshape(-1).view(bits)
    nw = _pool.workers() if nworkers is None else max(1, nworkers)
    jobs = _jobs(m, part_panels, nw, pack)
    nxt = itertools.count()  # jobs handed out one at a time: a worker slowed down by a busy machine takes fewer

    def part(_: int) -> None:
        while (i := next(nxt)) < len(jobs):
            j, g0, g1, r0, r1 = jobs[i]
            p0 = p0s[j]
            if unpacked:
                products_unpacked(af, m, k, wfs[j], n, yf, p0, g0, g1, r0, r1, half, F16_TABLE, zf, rf, then)
            else:
                products(af, m, k, wpf, n, yf, p0 + g0, p0 + g1, wfs[j], p0, pack, r0, r1, half, F16_TABLE, zf, rf,
                         then)

    _pool.run(part, min(nw, len(jobs)))
    return y.reshape(*lead, n) if out is None else out
