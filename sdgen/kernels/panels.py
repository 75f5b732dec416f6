"""Register-tiled products where OpenBLAS is slow: attention's narrow heads (Q K^T and P V) and the Winograd
products of small maps (few tiles, many channels).

OpenBLAS runs Q K^T of heads 40-80 wide at 55-81 GFLOP/s a core (AVX-512 Zen 4): with an inner dimension that short,
its packing of both operands at every call weighs on few multiply-adds per element; and P V on heads of 40 (a
product only 40 columns wide) at 69-84. Here a register tile of R rows x V vectors (of 16 or 8 floats) runs down
the inner dimension, with R V accumulators held in vector registers throughout: at each step V vector loads of a
row of B, R broadcasts of A's elements and R V fused multiply-adds. The Winograd products (winograd.point_products)
have the opposite shape, a long inner dimension (1280 channels) and few rows (32 tiles), and OpenBLAS's packing
weighs there too: 50-75 GFLOP/s a core where the same tiles reach 90-110.

- gemm_panels (Q K^T): B (K^T) packed once, (n / 32, k, 32): panel p holds columns 32 p .. 32 p + 31 of every row
  of B, contiguous; tiles of up to 6 rows x 2 512-bit vectors (12 accumulators). The panel (k x 128 bytes) stays in L1
  while the tiles of all the rows of A pass over it. 109-113 GFLOP/s a core for 256 x 4096 scores on heads of 40,
  64 and 80, and the same numbers as OpenBLAS's here: each sum in the same order, one fused multiply-add at a time.
- gemm_tiles (Winograd's V[p] U[p]): the same tiles, B's panels further apart (the filters made in panels,
  winograd.filter_buffer) or B's rows read where they lie (PANEL columns of each: 20-30% slower where those rows
  are 320-640 floats apart, as the Winograd filters of SD's 64x64 maps), in passes of _ROWS_CHUNK steps of the
  inner dimension whose sums are added.
- gemm_panels_by_chunk (P V on a single head of 512, the VAE's): gemm_panels with the loops the other way round,
  every panel over each chunk of the rows of A while it is in L2, for a long inner dimension (thousands of keys).
- gemm_rows (P V, heads of 40, 64 and 80): B (V) as it is, rows of 40, 64 or 80 floats; tiles of 4 rows x 16 + 16
  + 8 floats (of 6 rows x 4 512-bit vectors for 64, of 4 x 5 for 80), in passes of 512 steps of the inner dimension
  whose sums are added, as BLAS adds its blocks. 93-117 GFLOP/s a core.
- tile_rows_then (the linear layers, linear_tiles.py): gemm_tiles' tiles adding a bias and a residual to the sums
  while they are in registers, before the store: no pass of their own over the outputs; and prefetching, a line
  every few steps, data the caller will need next (the weights it packs next) while the core is busy multiplying.

The tile is written in LLVM IR (a Numba intrinsic) since Numba has no vector type: the accumulators are vector
registers for the whole run down the inner dimension, which no Numba loop over arrays becomes. It needs 32 vector
registers (AVX-512 has 32, of 512 bits and, with VL, of 256; AVX2 has 16, where the tiles would spill): AVAILABLE
says whether this CPU has them, and attention and the Winograd products use BLAS where not.

Numba's on-disk cache only watches the file of each cached kernel: the kernels of other modules that call these
(mha.py, winograd.py) keep their compiled copy after this file is edited; delete sdgen/kernels/__pycache__ (or touch
them).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# The tiles of gemm_tiles / tile_rows_then: rows of VECTORS vectors of LANES floats, one panel wide. 512-bit vectors:
# Zen 4 runs a 512-bit multiply-add as two 256-bit halves, so there tiles of 6 rows x 2 vectors of 16 and of 6 x 4
# vectors of 8 run alike (one thread, hot panels, 480-96 rows x 320-512 x 256-1024: 116.3-117.0 against 115.7-117.1
# GFLOP/s, the same numbers; SD 1.5's guided forward 0.997 and SDXL-Turbo's 0.979 of the time with the 256-bit
# tiles: scripts/ab_revisions.py --base 14a1bd5, 6 rounds); cores with two full-width 512-bit multiply-add pipes
# (Intel's server cores, Zen 5) do twice the multiply-adds a cycle in 512 bits, which 256-bit tiles leave idle (not
# measured: no such CPU here).
LANES = 16  # floats per vector (512 bits)
VECTORS = 2  # vectors per tile row
PANEL = LANES * VECTORS  # columns per panel of B


def _has_32_vector_registers() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx512vl", False))
    except Exception:  # noqa: BLE001 (any failure to tell: take BLAS's path)
        return False


AVAILABLE = _has_32_vector_registers()


def _make_tile(rows: int, widths: tuple = (LANES,) * VECTORS, epilogue: bool = False):
    """The intrinsic computing one tile of `rows` rows x len(widths) vectors, vector v of widths[v] floats (16:
    512 bits, 8: 256 bits), side by side along the row (see tile's docstring); with epilogue, a tile that can also
    add a bias and a residual as it stores (tile_then's docstring)."""
    starts = [sum(widths[:v]) for v in range(len(widths))]  # each vector's first column

    def codegen(context, builder, signature, args):
        cv, co, lc, av, ao, la, bv, bo, lb, kk, more = args[:11]
        vecs = {w: ir.VectorType(ir.FloatType(), w) for w in set(widths)}
        i64 = co.type

        def data(pos, value):
            return context.make_array(signature.args[pos])(context, builder, value).data

        def vec_at(base, off, r, ld, v):  # the vector v of row r of a flat array: base[off + r ld + starts[v] ..]
            row = builder.add(off, builder.mul(ir.Constant(i64, r), ld))
            at = builder.gep(base, [builder.add(row, ir.Constant(i64, starts[v]))])
            return builder.bitcast(at, vecs[widths[v]].as_pointer())

        cp, ap, bp = data(0, cv), data(3, av), data(6, bv)
        fma = {w: cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), f"llvm.fma.v{w}f32")
               for w, t in vecs.items()}
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vecs[w], None)) for w in widths] for _ in range(rows)]
        first = ir.Constant(ir.IntType(32), 0)

        def run(start, count):  # steps start .. start + count - 1 down the inner dimension
            with cgutils.for_range(builder, count) as loop:
                e = builder.add(start, loop.index)
                row_b = builder.add(bo, builder.mul(e, lb))
                bvec = [builder.load(vec_at(bp, row_b, 0, lb, v), align=4) for v in range(len(widths))]
                for r in range(rows):
                    at = builder.add(builder.add(ao, builder.mul(ir.Constant(i64, r), la)), e)
                    a_elem = builder.load(builder.gep(ap, [at]))
                    x = {}  # a_elem in every lane, at each width
                    for w, t in vecs.items():
                        undef = ir.Constant(t, ir.Undefined)
                        x[w] = builder.shuffle_vector(builder.insert_element(undef, a_elem, first), undef,
                                                      ir.Constant(ir.VectorType(ir.IntType(32), w), [0] * w))
                    for v, w in enumerate(widths):
                        builder.store(builder.call(fma[w], [x[w], bvec[v], builder.load(acc[r][v])]), acc[r][v])

        if epilogue:  # pevery steps at a time, each run followed by a prefetch of the stream's next line
            pv, pbase, pld, plpr, pj0, pj1, pevery = args[17:]
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            pp = builder.bitcast(data(17, pv), i8p)
            pfn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                 "llvm.prefetch.p0")
            lines = builder.sub(pj1, pj0)
            lines = builder.select(builder.icmp_signed("<", lines, ir.Constant(i64, 0)), ir.Constant(i64, 0), lines)
            most = builder.sdiv(kk, pevery)
            segs = builder.select(builder.icmp_signed("<", lines, most), lines, most)
            # segs runs of pevery steps, each followed by a prefetch, then the rest of the steps (one loop body)
            rest = builder.sub(kk, builder.mul(segs, pevery))
            with cgutils.for_range(builder, builder.add(segs, ir.Constant(i64, 1))) as seg:
                prefetching = builder.icmp_signed("<", seg.index, segs)
                run(builder.mul(seg.index, pevery), builder.select(prefetching, pevery, rest))
                with builder.if_then(prefetching):
                    jv = builder.add(pj0, seg.index)
                    t = builder.sdiv(jv, plpr)
                    at = builder.add(pbase, builder.add(builder.mul(t, pld),
                                                        builder.mul(builder.sub(jv, builder.mul(t, plpr)),
                                                                    ir.Constant(i64, 64))))
                    builder.call(pfn, [builder.gep(pp, [at]), ir.Constant(i32, 0), ir.Constant(i32, 2),
                                       ir.Constant(i32, 1)])  # read, into L2 (locality 2), data
        else:
            run(ir.Constant(i64, 0), kk)

        def add_from(base, off, ld, per_row):  # acc[r][v] += base's vector (the same for every row unless per_row)
            for r in range(rows):
                for v in range(len(widths)):
                    y = builder.load(vec_at(base, off, r if per_row else 0, ld, v), align=4)
                    builder.store(builder.fadd(builder.load(acc[r][v]), y), acc[r][v])

        with builder.if_then(builder.icmp_signed("!=", more, ir.Constant(more.type, 0))):
            add_from(cp, co, lc, True)
        if epilogue:
            zv, zo, rv, ro, lr, then = args[11:17]
            for bit, base, off, per_row in ((1, data(11, zv), zo, False), (2, data(13, rv), ro, True)):
                flag = builder.and_(then, ir.Constant(then.type, bit))
                with builder.if_then(builder.icmp_signed("!=", flag, ir.Constant(then.type, 0))):
                    add_from(base, off, lr, per_row)
        for r in range(rows):
            for v in range(len(widths)):
                builder.store(builder.load(acc[r][v]), vec_at(cp, co, r, lc, v), align=4)
        return context.get_dummy_value()

    def f32_arrays(*arrays) -> bool:
        return all(isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 1 and t.layout == "C"
                   for t in arrays)

    if not epilogue:
        @intrinsic
        def tile(typingctx, c, c_off, ldc, a, a_off, lda, b, b_off, ldb, k, accumulate):
            """c[c_off + r ldc + j] (+)= sum_e a[a_off + r lda + e] b[b_off + e ldb + j] for r < rows,
            j < sum(widths), e < k: each sum from 0 in order of e by fused multiply-adds, then added to c's value
            if accumulate is non-zero, else stored (1-D C-contiguous float32 arrays; no bounds check)."""
            if not f32_arrays(c, a, b):
                return None
            return types.void(c, types.intp, types.intp, a, types.intp, types.intp, b, types.intp, types.intp,
                              types.intp, types.intp), codegen

        return tile

    @intrinsic
    def tile_then(typingctx, c, c_off, ldc, a, a_off, lda, b, b_off, ldb, k, accumulate, z, z_off, res, res_off,
                  ldr, then, pf, pf_base, pf_ld, pf_lpr, pf_j0, pf_j1, pf_every):
        """tile's sums, then (if then & 1) + z[z_off + j] (a bias), then (if then & 2) + res[res_off + r ldr + j]
        (a residual) before the store: ((c + sum) + bias) + residual, each addition rounded, as a separate pass
        adding them to the stored tile would give, while the sums are in registers.

        Meanwhile, every pf_every steps, a prefetch into L2 of the next of the lines pf_j0 .. pf_j1 - 1 of a stream
        over the bytes pf (uint8, 1-D): pf_lpr lines of 64 bytes in each of its rows, rows pf_ld bytes apart from
        byte pf_base (line j at pf_base + t pf_ld + 64 (j - t pf_lpr), t = j // pf_lpr). A later job's data (the
        next weights to pack) arrives while the products keep the core busy; a prefetch never faults."""
        if not (f32_arrays(c, a, b, z, res) and isinstance(pf, types.Array) and pf.dtype == types.uint8
                and pf.ndim == 1):
            return None
        return types.void(c, types.intp, types.intp, a, types.intp, types.intp, b, types.intp, types.intp,
                          types.intp, types.intp, z, types.intp, res, types.intp, types.intp, types.intp,
                          pf, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp), codegen

    return tile_then


# Q K^T, the Winograd products and the linear layers: tiles of 6 rows x 2 vectors (12 accumulators, 2 panel vectors
# and a broadcast), then 4, 2, 1; they can add a bias and a residual as they store (tile_rows_then)
_TILE6, _TILE4, _TILE2, _TILE1 = (_make_tile(r, epilogue=True) for r in (6, 4, 2, 1))
# C = A B with B's rows 40 floats (attention's P V on SD 1.5's heads of 40): tiles of 4 rows x 16 + 16 + 8 floats
# (two 512-bit vectors and a 256-bit one: 12 accumulators) and of 1 row for the rest. 93-115 GFLOP/s a core against
# OpenBLAS's 69-84 on 256 x 4096 x 40; as fast on Zen 4 as 4 rows x 5 256-bit vectors (115.7-115.8 GFLOP/s, hot;
# the same numbers), in 12 multiply-add instructions a step instead of 20 where 512-bit ones take no longer. Rows of
# 64 floats (SD 2.x's and SDXL's heads) in 512-bit vectors: tiles of 6 rows x 4 vectors (24 accumulators), then 4,
# 2, 1 rows; 116-117 GFLOP/s a core against OpenBLAS's 91-94 on 256 x 4096 x 64 and 113 x 9216 x 64 (tiles of 3
# rows x 8 256-bit vectors: 80-90; of 2 rows: no faster than OpenBLAS). Rows of 80 (SD 1.5's heads over 32x32):
# tiles of 4 rows x 5 512-bit vectors, then 1 row: 117 GFLOP/s a core against OpenBLAS's 99-100 on 256 x 1024 x 80
# and 256 x 4096 x 80.
ROW_WIDTHS = (40, 64, 80)
_W40, _W40_1 = _make_tile(4, (16, 16, 8)), _make_tile(1, (16, 16, 8))
_W64_6, _W64_4, _W64_2, _W64_1 = (_make_tile(r, (16,) * 4) for r in (6, 4, 2, 1))
_W80, _W80_1 = _make_tile(4, (16,) * 5), _make_tile(1, (16,) * 5)
_ROWS_CHUNK = 512  # inner-dimension steps per pass over the rows of A (gemm_rows, gemm_tiles)


NOTHING = np.zeros(1, dtype=np.float32)  # stands in for "no bias" and "no residual" (one compiled signature)
NO_STREAM = np.zeros(1, dtype=np.uint8)  # ... and for "nothing to prefetch"


@njit(nogil=True, cache=True)
def tile_rows_then(c, c_off, ldc, a, a_off, lda, m, b, b_off, ldb, k, more, z, z_off, res, res_off, then,
                   pf, pf_base, pf_ld, pf_lpr, pf_lines):
    """c[c_off + i ldc + j] (+)= sum_e a[a_off + i lda + e] b[b_off + e ldb + j] for i < m, j < PANEL, e < k (added
    to c's values if more, else stored), then + z[z_off + j] if then & 1 (a bias) and + res[res_off + i ldc + j] if
    then & 2 (a residual laid out as c) before the store: the rows in tiles of 6, then 4, 2, 1. Meanwhile the
    tiles prefetch the pf_lines lines of a stream over the bytes pf (pf_lpr lines in each row, rows pf_ld bytes
    apart from byte pf_base; tile_then's docstring), shared out among them, each spreading its share over its
    steps."""
    tiles = m // 6 + m % 6 // 4 + m % 6 % 4 // 2 + m % 2
    share = -(-pf_lines // max(tiles, 1))
    every = max(1, k // max(share, 1))
    i = 0
    j = 0
    while i + 6 <= m:
        _TILE6(c, c_off + i * ldc, ldc, a, a_off + i * lda, lda, b, b_off, ldb, k, more, z, z_off, res,
               res_off + i * ldc, ldc, then, pf, pf_base, pf_ld, pf_lpr, min(pf_lines, j), min(pf_lines, j + share),
               every)
        i += 6
        j += share
    if i + 4 <= m:
        _TILE4(c, c_off + i * ldc, ldc, a, a_off + i * lda, lda, b, b_off, ldb, k, more, z, z_off, res,
               res_off + i * ldc, ldc, then, pf, pf_base, pf_ld, pf_lpr, min(pf_lines, j), min(pf_lines, j + share),
               every)
        i += 4
        j += share
    if i + 2 <= m:
        _TILE2(c, c_off + i * ldc, ldc, a, a_off + i * lda, lda, b, b_off, ldb, k, more, z, z_off, res,
               res_off + i * ldc, ldc, then, pf, pf_base, pf_ld, pf_lpr, min(pf_lines, j), min(pf_lines, j + share),
               every)
        i += 2
        j += share
    if i < m:
        _TILE1(c, c_off + i * ldc, ldc, a, a_off + i * lda, lda, b, b_off, ldb, k, more, z, z_off, res,
               res_off + i * ldc, ldc, then, pf, pf_base, pf_ld, pf_lpr, min(pf_lines, j), min(pf_lines, j + share),
               every)


@njit(nogil=True, cache=True)
def tile_rows(c, c_off, ldc, a, a_off, lda, m, b, b_off, ldb, k, more):
    """c[c_off + i ldc + j] (+)= sum_e a[a_off + i lda + e] b[b_off + e ldb + j] for i < m, j < PANEL, e < k (added
    to c's values if more, else stored): the rows in tiles of 6, then 4, 2, 1."""
    tile_rows_then(c, c_off, ldc, a, a_off, lda, m, b, b_off, ldb, k, more, NOTHING, 0, NOTHING, 0, 0,
                   NO_STREAM, 0, 0, 1, 0)


@njit(nogil=True, cache=True)
def gemm_tiles(a, a_off, lda, m, k, b, b_off, panel_step, ldb, panels, c, c_off, ldc):
    """c[c_off + i ldc + p PANEL + t] = sum_e a[a_off + i lda + e] b[b_off + p panel_step + e ldb + t] for i < m,
    p < panels, t < PANEL, e < k: panel by panel of B, the rows of A in tiles of 6 (then 4, 2, 1), each tile in
    passes of _ROWS_CHUNK steps of e whose sums (in order of e) are added, as BLAS adds its blocks of the inner
    dimension. B's panels packed (ldb = PANEL: each panel's rows contiguous, as mha._pack_keys and the Winograd
    filters of winograd.filter_buffer lay them out) or B as it is (panel_step = PANEL, rows ldb apart). Serial;
    releases the GIL."""
    for p in range(panels):
        bo = b_off + p * panel_step
        co = c_off + p * PANEL
        for e0 in range(0, k, _ROWS_CHUNK):
            kk = min(_ROWS_CHUNK, k - e0)
            more = 1 if e0 > 0 else 0
            tile_rows(c, co, ldc, a, a_off + e0, lda, m, b, bo + e0 * ldb, ldb, kk, more)


@njit(nogil=True, cache=True)
def gemm_panels(a, a_off, lda, m, k, bp, b_off, panels, c, c_off, ldc):
    """c[c_off + i ldc + j] = sum_e a[a_off + i lda + e] B[e, j] for i < m, j < panels PANEL, e < k: an m x k
    matrix of a (rows lda apart) times B given as `panels` packed panels from b_off on (bp[b_off + (p k + e) PANEL
    + t] = B[e, p PANEL + t]: mha._pack_keys' layout) into an m x (panels PANEL) block of c (rows ldc apart); a, bp
    and c flat float32 arrays. Panel by panel, the rows in tiles of 6 (then 4, 2, 1). Serial; releases the GIL."""
    gemm_tiles(a, a_off, lda, m, k, bp, b_off, k * PANEL, PANEL, panels, c, c_off, ldc)


@njit(nogil=True, cache=True)
def gemm_panels_by_chunk(a, a_off, lda, m, k, bp, b_off, panels, c, c_off, ldc):
    """gemm_panels' product with its loops the other way round: chunk by chunk of _ROWS_CHUNK steps of e, every
    panel over each chunk of A's rows, so that the chunk (m x _ROWS_CHUNK floats: a few hundred rows) stays in L2
    while the panels pass over it, where gemm_panels reads all of A again for each panel. For a long inner
    dimension and few panels (P V over thousands of keys on a head of 512: ~110 GFLOP/s against ~100 one thread,
    Zen 4). The same sums, added in the same order. Serial; releases the GIL."""
    for e0 in range(0, k, _ROWS_CHUNK):
        kk = min(_ROWS_CHUNK, k - e0)
        more = 1 if e0 > 0 else 0
        for p in range(panels):
            tile_rows(c, c_off + p * PANEL, ldc, a, a_off + e0, lda, m, bp, b_off + (p * k + e0) * PANEL, PANEL, kk,
                      more)


@njit(nogil=True, cache=True)
def gemm_rows(a, a_off, lda, m, k, b, b_off, c, c_off, ldc, n):
    """c[c_off + i ldc + j] = sum_e a[a_off + i lda + e] b[b_off + e n + j] for i < m, j < n, e < k, n one of
    ROW_WIDTHS: A (rows lda apart) times a contiguous k x n block of b, into c (rows ldc apart); flat float32
    arrays. In passes of _ROWS_CHUNK steps of e over all the rows (that many rows of B stay in L2), each pass's
    sums (in order of e) added to the last's, as BLAS adds its blocks of the inner dimension (one run over
    thousands of terms was ~3x further from float64). Serial; releases the GIL."""
    for e0 in range(0, k, _ROWS_CHUNK):
        kk = min(_ROWS_CHUNK, k - e0)
        more = 1 if e0 > 0 else 0
        ao = a_off + e0
        bo = b_off + e0 * n
        i = 0
        if n == 40:
            while i + 4 <= m:
                _W40(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 4
            while i < m:
                _W40_1(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 1
        elif n == 80:
            while i + 4 <= m:
                _W80(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 4
            while i < m:
                _W80_1(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 1
        else:
            while i + 6 <= m:
                _W64_6(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 6
            if i + 4 <= m:
                _W64_4(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 4
            if i + 2 <= m:
                _W64_2(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)
                i += 2
            if i < m:
                _W64_1(c, c_off + i * ldc, ldc, a, ao + i * lda, lda, b, bo, n, kk, more)


def flat(a: np.ndarray) -> np.ndarray:
    """A 1-D float32 view starting at a[0, ..., 0] and covering every element of the strided float32 array a, so
    that a[i, j, ...] = view[i a.strides[0] / 4 + j a.strides[1] / 4 + ...] (non-negative strides in whole
    elements)."""
    if a.dtype != np.float32 or min(a.strides, default=4) < 0 or any(s % 4 for s in a.strides):
        raise ValueError("flat: float32 with non-negative strides in whole elements")
    span = 1 + sum((n - 1) * s // 4 for n, s in zip(a.shape, a.strides)) if a.size else 0
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(4,))
