"""Weights held at a storage precision and widened to float32 when a layer runs, and the scratch buffers that
receive them.

Storage dtypes (what a layer keeps, the only copy of a weight):
  float32   used as it is,
  float16   widened exactly by the CPU's conversion, 16 at a time (widen_run: F16C, 6.7 G elements/s a core from
            memory), else through a 65536-entry table (1.7; numpy's own float16 conversion is ~25x slower),
  uint16    the bits of bfloat16 numbers (numpy has no bfloat16), widened by a shift.
Weights are narrowed to a half-precision storage dtype once, at load (narrow: float16 by the CPU's conversion,
bfloat16 by a vectorised rounding loop; 2-4 G elements/s where numpy took 0.37 and 0.085).

Kernels that need a weight in another layout (Winograd filters, im2col matrices, float32 copies of half-precision
matrices) build it at each call into a scratch buffer that is kept between calls and shared by every layer: the
model holds one copy of each weight plus a few bounded buffers, never a second, transformed copy per layer.
Widening is exact, so half-precision weights give the same results whether widened once or at every call.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _pool, gvec
from .panels import flat
from .winograd import filter_shape

# float16 bits -> float32 value (exact, including subnormals, infinities and NaN payloads)
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

STORAGE_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16)}
_PARALLEL_MIN = 1 << 20  # elements: below this a single thread widens (the pool's overhead would dominate)


def storage_name(dtype) -> str:
    """"fp32", "fp16" or "bf16" for a storage dtype."""
    dtype = np.dtype(dtype)
    for name, d in STORAGE_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"not a weight storage dtype: {dtype}")


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as PyTorch's .to(torch.bfloat16); NaN stays NaN
    (made quiet)."""
    return narrow(np.asarray(a, dtype=np.float32), np.uint16)


def to_storage(a: np.ndarray, dtype) -> np.ndarray:
    """A float array (float32, float16, or bfloat16 bits as uint16 with ``stored_bf16``) converted once to the
    storage dtype, C-contiguous; returned as it is when nothing needs converting (e.g. a memory-mapped view)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return np.ascontiguousarray(a)
    if dtype == np.float32:
        return widen(a)
    if dtype in (np.float16, np.uint16):
        return narrow(widen(a) if a.dtype != np.float32 else a, dtype)
    raise ValueError(f"not a weight storage dtype: {dtype}")


@njit(nogil=True, cache=True)
def _widen_f16(src, dst, table, lo, hi):
    """dst[i] = table[src[i]] for i in [lo, hi) (1-D, float16 bits -> float32)."""
    for i in range(lo, hi):
        dst[i] = table[src[i]]


@njit(nogil=True, cache=True)
def _widen_bf16(src, dst, lo, hi):
    """dst[i] = src[i] << 16 for i in [lo, hi) (1-D, bfloat16 bits -> float32 bits)."""
    for i in range(lo, hi):
        dst[i] = np.uint32(src[i]) << np.uint32(16)


HALF_F16, HALF_BF16 = 1, 2  # what 16-bit weight bits are, for widen_run


def _has_f16c() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:  # noqa: BLE001 (any failure to tell: the table)
        return False


# whether widen_run may be compiled: it widens float16 by the CPU's vcvtph2ps (F16C, which every CPU with AVX-512
# has); without it LLVM would call a helper that Numba does not link
HAS_F16C = _has_f16c()
WIDEN_LANES = 16


def widen_bits_ir(builder, raw, half: int):
    """LLVM IR: a vector of 16-bit weight bits (<L x i16>) as float32 (<L x float>): float16 by fpext (vcvtph2ps
    with F16C), bfloat16 by a shift into the high half (the intrinsics here and in linear_tiles)."""
    lanes = raw.type.count
    vec = ir.VectorType(ir.FloatType(), lanes)
    if half == HALF_F16:
        return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), lanes)), vec)
    wide = builder.zext(raw, ir.VectorType(ir.IntType(32), lanes))
    return builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [16] * lanes)), vec)


@njit(inline="always")
def widen_one(v, half, table):
    """One weight's 16-bit bits v (uint16) as float32: float16 through table (F16_TABLE) where half is HALF_F16,
    else bfloat16 (a shift)."""
    if half == HALF_F16:
        return table[v]
    return np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)


@intrinsic
def _widen_vector(typingctx, dst, d_off, src, s_off, f16):
    """dst[d_off + j] = src[s_off + j] widened to float32 for j < WIDEN_LANES: float16 bits (vcvtph2ps) where f16
    is non-zero, else bfloat16 bits (shifted into the high half); dst float32, src uint16, 1-D with unit strides
    (C-contiguous, or slices of such rows); no bounds check."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == types.float32
            and src.dtype == types.uint16 and dst.ndim == src.ndim == 1 and {dst.layout, src.layout} <= {"C", "A"}):
        return None
    sig = types.void(dst, types.intp, src, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        dv, do, sv, so, is_f16 = args
        lanes = WIDEN_LANES
        dp = context.make_array(signature.args[0])(context, builder, dv).data
        sp = context.make_array(signature.args[2])(context, builder, sv).data
        vec = ir.VectorType(ir.FloatType(), lanes)
        raw = builder.load(builder.bitcast(builder.gep(sp, [so]), ir.VectorType(ir.IntType(16), lanes).as_pointer()),
                           align=2)
        target = builder.bitcast(builder.gep(dp, [do]), vec.as_pointer())
        with builder.if_else(is_f16) as (f16, bf16):
            with f16:
                builder.store(widen_bits_ir(builder, raw, HALF_F16), target, align=4)
            with bf16:
                builder.store(widen_bits_ir(builder, raw, HALF_BF16), target, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def widen_run(src, s_off, dst, d_off, n, half, table):
    """dst[d_off + i] = src[s_off + i] widened to float32 for i < n: float16 bits where half is HALF_F16, bfloat16
    bits where HALF_BF16 (src uint16, dst float32, 1-D, unit strides). By vectors of WIDEN_LANES (to be compiled
    only where HAS_F16C), the last few by F16_TABLE (table) or a shift. Exact (float16's signalling NaNs come out
    quiet, as from any CPU's conversion); serial."""
    f16 = half == HALF_F16
    i = 0
    while i + WIDEN_LANES <= n:
        _widen_vector(dst, d_off + i, src, s_off + i, f16)
        i += WIDEN_LANES
    for j in range(i, n):
        dst[d_off + j] = widen_one(src[s_off + j], half, table)


@intrinsic
def _narrow_f16_vector(typingctx, dst, d_off, src, s_off):
    """dst[d_off + j] = the float16 bits of src[s_off + j] rounded to nearest even (vcvtps2ph: numpy's astype,
    subnormals, overflow to infinity and all) for j < WIDEN_LANES; dst uint16, src float32, 1-D with unit strides;
    no bounds check."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == types.uint16
            and src.dtype == types.float32 and dst.ndim == src.ndim == 1 and {dst.layout, src.layout} <= {"C", "A"}):
        return None
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):
        dv, do, sv, so = args
        lanes = WIDEN_LANES
        dp = context.make_array(signature.args[0])(context, builder, dv).data
        sp = context.make_array(signature.args[2])(context, builder, sv).data
        x = builder.load(builder.bitcast(builder.gep(sp, [so]), ir.VectorType(ir.FloatType(), lanes).as_pointer()),
                         align=4)
        h = builder.fptrunc(x, ir.VectorType(ir.HalfType(), lanes))
        builder.store(builder.bitcast(h, ir.VectorType(ir.IntType(16), lanes)),
                      builder.bitcast(builder.gep(dp, [do]), ir.VectorType(ir.IntType(16), lanes).as_pointer()),
                      align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _narrow_f16(src, dst, lo, hi):
    """dst[i] = float16 bits of src[i] for i in [lo, hi): by vectors of WIDEN_LANES (only where HAS_F16C), the
    last few as numpy would (a vector of the tail padded with zeros)."""
    i = lo
    while i + WIDEN_LANES <= hi:
        _narrow_f16_vector(dst, i, src, i)
        i += WIDEN_LANES
    if i < hi:
        tmp = np.zeros(WIDEN_LANES, dtype=np.float32)
        out = np.empty(WIDEN_LANES, dtype=np.uint16)
        for j in range(i, hi):
            tmp[j - i] = src[j]
        _narrow_f16_vector(out, 0, tmp, 0)
        for j in range(i, hi):
            dst[j] = out[j - i]


@njit(nogil=True, cache=True)
def _narrow_bf16(src, dst, lo, hi):
    """dst[i] = bfloat16 bits of the float32 bits src[i] (uint32) for i in [lo, hi): rounded to nearest even, NaN
    kept NaN (made quiet: its high half with the quiet bit set). Through slices indexed from 0 (indexed from lo,
    Numba's negative-index wraparound kept the loop scalar: 0.65 against 4.2 G elements/s)."""
    s = src[lo:hi]
    d = dst[lo:hi]
    for i in range(hi - lo):
        u = s[i]
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet = (u >> np.uint32(16)) | np.uint32(0x40)
        d[i] = np.uint16(quiet) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else np.uint16(rounded)


def narrow(a: np.ndarray, dtype) -> np.ndarray:
    """float32 -> float16 (numpy's astype, by the CPU's conversion where it has F16C) or bfloat16 bits (uint16,
    f32_to_bf16's rounding), a new C-contiguous array of a's shape; large arrays on the kernel workers. numpy's own
    conversions ran at 0.37 (float16) and 0.085 (bfloat16) G elements/s: seconds of loading for fp16 weights from
    fp32 files."""
    dtype = np.dtype(dtype)
    src = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == np.float16 and not HAS_F16C:
        return src.astype(np.float16)
    if dtype not in (np.float16, np.uint16):
        raise ValueError(f"narrow: to float16 or uint16 (bfloat16 bits), not {dtype}")
    out = np.empty(src.shape, dtype=dtype)
    flat_src, flat_out = src.reshape(-1), out.reshape(-1).view(np.uint16)
    n = flat_src.size
    nw = _pool.workers() if n >= _PARALLEL_MIN else 1

    def part(i: int) -> None:
        lo, hi = n * i // nw, n * (i + 1) // nw
        if dtype == np.float16:
            _narrow_f16(flat_src, flat_out, lo, hi)
        else:
            _narrow_bf16(flat_src.view(np.uint32), flat_out, lo, hi)

    _pool.run(part, nw)
    return out


def widen(w: np.ndarray, out: np.ndarray | None = None, parallel: bool = True) -> np.ndarray:
    """float32 copy of a stored weight (float32, float16 or bfloat16 bits), into ``out`` (C-contiguous float32 of
    w's size) when given. Large weights are widened on the kernel workers, unless parallel is False (a caller that
    is itself one of the workers)."""
    w = np.ascontiguousarray(w)
    if out is None:
        out = np.empty(w.shape, dtype=np.float32)
    out = out.reshape(w.shape)
    if w.dtype == np.float32:
        np.copyto(out, w)
        return out
    if w.dtype not in (np.float16, np.uint16):
        np.copyto(out, w, casting="unsafe")
        return out
    src = w.reshape(-1).view(np.uint16)
    flat = out.reshape(-1)
    n = src.size
    nw = _pool.workers() if parallel and n >= _PARALLEL_MIN else 1

    def part(i: int) -> None:
        lo, hi = n * i // nw, n * (i + 1) // nw
        if w.dtype == np.float16 and HAS_F16C:
            widen_run(src, lo, flat, lo, hi - lo, HALF_F16, F16_TABLE)
        elif w.dtype == np.float16:
            _widen_f16(src, flat, F16_TABLE, lo, hi)
        else:
            _widen_bf16(src, flat.view(np.uint32), lo, hi)

    _pool.run(part, nw)
    return out


def as_float32(w: np.ndarray, slot: str = "weights") -> np.ndarray:
    """w as float32: w itself when it is float32, else widened into the shared scratch buffer ``slot`` (valid
    until the next call using that slot)."""
    if w.dtype == np.float32:
        return w
    return widen(w, scratch(slot, w.size))


# ---------------------------------------------------------------- scratch buffers

_scratch: dict[str, np.ndarray] = {}
_scratch_lock = threading.Lock()


def scratch(slot: str, size: int) -> np.ndarray:
    """A float32 buffer of ``size`` elements (1-D, contents undefined), kept in ``slot`` and reused by later calls:
    it grows to the largest size asked for and never shrinks until ``release_scratch``."""
    with _scratch_lock:
        buf = _scratch.get(slot)
        if buf is None or buf.size < size:
            _scratch.pop(slot, None)
            buf = np.empty(size, dtype=np.float32)
            _scratch[slot] = buf
    return buf[:size]


def scratch_bytes() -> int:
    """Memory held by the scratch buffers."""
    return sum(b.nbytes for b in _scratch.values())


def release_scratch() -> None:
    """Free every scratch buffer (they are made again when next needed)."""
    with _scratch_lock:
        _scratch.clear()


# ---------------------------------------------------------------- Winograd filters from stored weights


_OB = 512  # output channels per row piece in the filter transforms (their temporaries stay in L1/L2)


# The filter transform U = G g G^T, applied as G to the columns of g, then to the rows of the result. Each step is
# G applied to three rows (x0, x1, x2) of output channels, giving alpha rows; the channel index t is innermost,
# every row a separate 1-D array, so that LLVM vectorises the loops (float32, as the convolution's arithmetic).
# G of F(2,3): (x0, (x0+x1+x2)/2, (x0-x1+x2)/2, x2); of F(4,3): (x0/4, -(x0+x1+x2)/6, -(x0-x1+x2)/6,
# x0/24 + x1/12 + x2/6, x0/24 - x1/12 + x2/6, x2); of F(6,3): (x0, -2(x0+x1+x2)/9, -2(x0-x1+x2)/9,
# x0/90 + x1/45 + 2x2/45, x0/90 - x1/45 + 2x2/45, 32x0/45 + 16x1/45 + 8x2/45, 32x0/45 - 16x1/45 + 8x2/45, x2) -- the
# rows of winograd.matrices(m)[1].


@njit(inline="always")
def _g23(x0r, x1r, x2r, y0, y1, y2, y3, nb):
    h = np.float32(0.5)
    for t in range(nb):
        x0 = x0r[t]
        x1 = x1r[t]
        x2 = x2r[t]
        s = x0 + x2
        y0[t] = x0
        y1[t] = h * (s + x1)
        y2[t] = h * (s - x1)
        y3[t] = x2


@njit(inline="always")
def _g43(x0r, x1r, x2r, y0, y1, y2, y3, y4, y5, nb):
    q = np.float32(0.25)
    s6 = np.float32(1.0 / 6.0)
    s12 = np.float32(1.0 / 12.0)
    s24 = np.float32(1.0 / 24.0)
    for t in range(nb):
        x0 = x0r[t]
        x1 = x1r[t]
        x2 = x2r[t]
        s = x0 + x2
        e = s24 * x0 + s6 * x2
        d = s12 * x1
        y0[t] = q * x0
        y1[t] = -s6 * (s + x1)
        y2[t] = -s6 * (s - x1)
        y3[t] = e + d
        y4[t] = e - d
        y5[t] = x2


@njit(inline="always")
def _g63(x0r, x1r, x2r, y0, y1, y2, y3, y4, y5, y6, y7, nb):
    n29 = np.float32(-2.0 / 9.0)
    s90 = np.float32(1.0 / 90.0)
    s45 = np.float32(1.0 / 45.0)
    t45 = np.float32(2.0 / 45.0)
    a45 = np.float32(32.0 / 45.0)
    b45 = np.float32(16.0 / 45.0)
    c45 = np.float32(8.0 / 45.0)
    for t in range(nb):
        x0 = x0r[t]
        x1 = x1r[t]
        x2 = x2r[t]
        s = x0 + x2
        e = s90 * x0 + t45 * x2
        d = s45 * x1
        f = a45 * x0 + c45 * x2
        q = b45 * x1
        y0[t] = x0
        y1[t] = n29 * (s + x1)
        y2[t] = n29 * (s - x1)
        y3[t] = e + d
        y4[t] = e - d
        y5[t] = f + q
        y6[t] = f - q
        y7[t] = x2


@njit(nogil=True, cache=True)
def _filter_piece(g, m, t3, u, i, col, nb):
    """u[p, i, col + t] for t < nb from the taps g[3k + l][t] (float32 rows) of nb output channels: G to the
    columns (into t3, (alpha, 3, >= nb)), then to the rows of t3."""
    a = m + 2
    for l in range(3):
        if m == 2:
            _g23(g[l], g[3 + l], g[6 + l], t3[0, l], t3[1, l], t3[2, l], t3[3, l], nb)
        elif m == 4:
            _g43(g[l], g[3 + l], g[6 + l], t3[0, l], t3[1, l], t3[2, l], t3[3, l], t3[4, l], t3[5, l], nb)
        else:
            _g63(g[l], g[3 + l], g[6 + l], t3[0, l], t3[1, l], t3[2, l], t3[3, l], t3[4, l], t3[5, l], t3[6, l],
                 t3[7, l], nb)
    for r in range(a):
        p = r * a
        e = col + nb
        if m == 2:
            _g23(t3[r, 0], t3[r, 1], t3[r, 2], u[p, i, col:e], u[p + 1, i, col:e], u[p + 2, i, col:e],
                 u[p + 3, i, col:e], nb)
        elif m == 4:
            _g43(t3[r, 0], t3[r, 1], t3[r, 2], u[p, i, col:e], u[p + 1, i, col:e], u[p + 2, i, col:e],
                 u[p + 3, i, col:e], u[p + 4, i, col:e], u[p + 5, i, col:e], nb)
        else:
            _g63(t3[r, 0], t3[r, 1], t3[r, 2], u[p, i, col:e], u[p + 1, i, col:e], u[p + 2, i, col:e],
                 u[p + 3, i, col:e], u[p + 4, i, col:e], u[p + 5, i, col:e], u[p + 6, i, col:e], u[p + 7, i, col:e],
                 nb)


@njit(nogil=True, cache=True)
def _zero_rows(u, cin, c_lo, c_hi):
    """u[:, cin:, c_lo:c_hi] = 0 (the channel padding of the filters must read as zero)."""
    for p in range(u.shape[0]):
        for i in range(cin, u.shape[1]):
            for o in range(c_lo, c_hi):
                u[p, i, o] = np.float32(0.0)


@njit(nogil=True, cache=True)
def _filters_f32(w, m, u, o_lo, o_hi, c_off):
    """Winograd F(m,3) filters of output channels [o_lo, o_hi) of float32 3x3 weights w stored (9, Cin, Cout)
    (HWIO) into the columns (o - c_off) of u (alpha^2, Cin', cols); rows from Cin on are zeroed."""
    cin = w.shape[1]
    t3 = np.empty((m + 2, 3, _OB), dtype=np.float32)
    g = np.empty((9, _OB), dtype=np.float32)
    for i in range(cin):
        for o0 in range(o_lo, o_hi, _OB):
            nb = min(_OB, o_hi - o0)
            for kl in range(9):
                src = w[kl, i, o0:o0 + nb]  # indexed from 0: src[o0 + t] stayed scalar (Numba's wraparound)
                dst = g[kl]
                for t in range(nb):
                    dst[t] = src[t]
            _filter_piece(g, m, t3, u, i, o0 - c_off, nb)
    _zero_rows(u, cin, o_lo - c_off, o_hi - c_off)


@njit(nogil=True, cache=True)
def _filters_u16(w, bf16, table, m, u, o_lo, o_hi, c_off):
    """_filters_f32 for float16 (bf16=False: their bits, widened through table) or bfloat16 (bf16=True) weights."""
    cin = w.shape[1]
    t3 = np.empty((m + 2, 3, _OB), dtype=np.float32)
    g = np.empty((9, _OB), dtype=np.float32)
    gbits = g.view(np.uint32)
    for i in range(cin):
        for o0 in range(o_lo, o_hi, _OB):
            nb = min(_OB, o_hi - o0)
            for kl in range(9):
                src = w[kl, i, o0:o0 + nb]
                if bf16:
                    dbits = gbits[kl]
                    for t in range(nb):
                        dbits[t] = np.uint32(src[t]) << np.uint32(16)
                else:
                    dst = g[kl]
                    for t in range(nb):
                        dst[t] = table[src[t]]
            _filter_piece(g, m, t3, u, i, o0 - c_off, nb)
    _zero_rows(u, cin, o_lo - c_off, o_hi - c_off)


def fill_filters(w: np.ndarray, m: int, u: np.ndarray, o_lo: int, o_hi: int, c_off: int = 0,
                 parallel: bool = True) -> None:
    """Winograd F(m,3) filters of output channels [o_lo, o_hi) of 3x3 weights stored HWIO, (3, 3, Cin, Cout) --
    float32, float16 or bfloat16 bits -- into u's columns o_lo - c_off .. o_hi - c_off; u is (alpha^2, Cin', cols)
    float32, or in panels of P columns, (alpha^2, cols / P, Cin', P), each point's panels contiguous
    (winograd.filter_buffer; o_lo - c_off on a panel's bound, the rest of the last panel zeroed); its rows from Cin
    on are zeroed there (winograd.filter_transform makes its filters with it too)."""
    if m not in (2, 4, 6):
        raise ValueError(f"no Winograd F({m},3)")
    w = w.reshape(9, w.shape[2], w.shape[3])
    if u.ndim == 4:
        _fill_panels(w, m, u, o_lo, o_hi, c_off, parallel)
        return
    if w.dtype == np.float32:
        kernel = lambda lo, hi: _filters_f32(w, m, u, lo, hi, c_off)  # noqa: E731
    else:
        bf16 = w.dtype == np.uint16
        w16 = w.view(np.uint16)
        kernel = lambda lo, hi: _filters_u16(w16, bf16, F16_TABLE, m, u, lo, hi, c_off)  # noqa: E731
    n = o_hi - o_lo
    nw = _pool.workers() if parallel and n * w.shape[1] >= 4096 else 1
    nw = max(1, min(nw, n // 16 or 1))

    def part(i: int) -> None:
        lo = o_lo + (n * i // nw) // 16 * 16
        hi = o_hi if i == nw - 1 else o_lo + (n * (i + 1) // nw) // 16 * 16
        if hi > lo:
            kernel(lo, hi)

    _pool.run(part, nw)


@njit(nogil=True, cache=True)
def _panel_taps_f32(w, o0, nb, p, g):
    """g[kl, i p + t] = w[kl, i, o0 + t] for t < nb, 0 for t in [nb, p) and for the rows i from Cin to g's end: the
    float32 taps (9, Cin, Cout) of one panel of p output channels, as the flat filter transform takes them."""
    cin = w.shape[1]
    for kl in range(9):
        dst = g[kl]
        for i in range(cin):
            src = w[kl, i, o0:o0 + nb]
            row = dst[i * p:(i + 1) * p]
            for t in range(nb):
                row[t] = src[t]
            for t in range(nb, p):
                row[t] = np.float32(0.0)
        for e in range(cin * p, g.shape[1]):
            dst[e] = np.float32(0.0)


@njit(nogil=True, cache=True)
def _panel_taps_u16(w, bf16, table, o0, nb, p, g):
    """_panel_taps_f32 from float16 (bf16=False: their bits, widened through table) or bfloat16 bits."""
    cin = w.shape[1]
    gbits = g.view(np.uint32)
    for kl in range(9):
        dst = g[kl]
        dbits = gbits[kl]
        for i in range(cin):
            src = w[kl, i, o0:o0 + nb]
            if bf16:
                row = dbits[i * p:(i + 1) * p]
                for t in range(nb):
                    row[t] = np.uint32(src[t]) << np.uint32(16)
            else:  # (gvec: AVX-512 CPUs, which have F16C)
                widen_run(src, 0, dst, i * p, nb, HALF_F16, table)
            for t in range(nb, p):
                dst[i * p + t] = np.float32(0.0)
        for e in range(cin * p, g.shape[1]):
            dst[e] = np.float32(0.0)


def _fill_panels(w: np.ndarray, m: int, u: np.ndarray, o_lo: int, o_hi: int, c_off: int, parallel: bool) -> None:
    """fill_filters into filters in panels, u (alpha^2, cols / P, Cin', P), each point's panels contiguous (points
    may lie further apart: winograd.filter_buffer): panel by panel, its taps gathered (_panel_taps_*: Cin' x P of
    each of the 9) and transformed by gvec.filters as one flat row per point, the panels shared out to the workers.
    Made from the rows of taps in pieces of 32 channels (as fill_filters makes filters laid out as rows) they took
    2.5-4x as long: a Numba array per slice of 32 floats."""
    a2, npan, cinp, p = u.shape
    L = cinp * p
    if u.strides[1:] != (4 * L, 4 * p, 4) or u.strides[0] % 4 or (o_lo - c_off) % p or L % gvec.LANES:
        raise ValueError(f"fill_filters: filters in panels {u.shape}, strides {u.strides}, from column {o_lo - c_off}")
    uf, ldu = flat(u), u.strides[0] // 4
    qs = list(range((o_lo - c_off) // p, -(-(o_hi - c_off) // p)))
    nw = _pool.workers() if parallel and (o_hi - o_lo) * w.shape[1] >= 4096 else 1
    nw = max(1, min(nw, len(qs)))
    half = w.dtype != np.float32

    def part(i: int) -> None:
        g = np.empty((9, L), dtype=np.float32)
        for q in qs[i::nw]:
            o0 = c_off + q * p
            nb = min(p, o_hi - o0)
            if half:
                _panel_taps_u16(w.view(np.uint16), w.dtype == np.uint16, F16_TABLE, o0, nb, p, g)
            else:
                _panel_taps_f32(w, o0, nb, p, g)
            gvec.filters(g.reshape(-1), L, L, m, uf[q * L:], ldu, L, 0, m + 2, p, 0)

    _pool.run(part, nw)


# Weights stored in blocks of output channels, (blocks, 3, 3, Cin, ob), for the convolutions whose Winograd filters
# are never made whole (winograd.winograd_conv_blocks): each block's taps are contiguous, so its filters are made
# as one flat transform, in cache, right before the product that uses them. From HWIO's strided rows the same
# filters took a third of those convolutions' time (SD1.5's 1280-channel 16x16 layers: 57 -> 44 ms per call).


def block_outputs(w_hwio: np.ndarray, ob: int) -> np.ndarray:
    """HWIO weights (3, 3, Cin, Cout), any storage dtype, as (ceil(Cout / ob), 3, 3, Cin, ob), zeros past Cout."""
    kh, kw, cin, cout = w_hwio.shape
    nb = -(-cout // ob)
    out = np.zeros((nb, kh, kw, cin, ob), dtype=w_hwio.dtype)
    for j in range(nb):
        c1 = min(cout, (j + 1) * ob)
        out[j, ..., : c1 - j * ob] = w_hwio[..., j * ob : c1]
    return out


def unblock_outputs(blocks: np.ndarray, cout: int) -> np.ndarray:
    """block_outputs undone: (3, 3, Cin, Cout) in the blocks' dtype (a new array)."""
    nb, kh, kw, cin, ob = blocks.shape
    return np.ascontiguousarray(blocks.transpose(1, 2, 3, 0, 4).reshape(kh, kw, cin, nb * ob)[..., :cout])


_FLAT_PIECE = 1024  # elements per piece of the flat filter transform (its temporaries stay in L1)


@njit(nogil=True, cache=True)
def _filters_flat(g, m, u):
    """u[p, e] = (G g G^T)[p] of the taps g[t, e] (t = 3 k + l) for e < g.shape[1], 0 for the rest of u's row:
    flat (9, L) float32 taps, (alpha^2, >= L) filters."""
    a = m + 2
    n_all = g.shape[1]
    t3 = np.empty((a, 3, _FLAT_PIECE), dtype=np.float32)
    for s in range(0, n_all, _FLAT_PIECE):
        e = min(n_all, s + _FLAT_PIECE)
        n = e - s
        for l in range(3):
            if m == 2:
                _g23(g[l, s:e], g[3 + l, s:e], g[6 + l, s:e], t3[0, l], t3[1, l], t3[2, l], t3[3, l], n)
            elif m == 4:
                _g43(g[l, s:e], g[3 + l, s:e], g[6 + l, s:e], t3[0, l], t3[1, l], t3[2, l], t3[3, l], t3[4, l],
                     t3[5, l], n)
            else:
                _g63(g[l, s:e], g[3 + l, s:e], g[6 + l, s:e], t3[0, l], t3[1, l], t3[2, l], t3[3, l], t3[4, l],
                     t3[5, l], t3[6, l], t3[7, l], n)
        for r in range(a):
            p = r * a
            if m == 2:
                _g23(t3[r, 0], t3[r, 1], t3[r, 2], u[p, s:e], u[p + 1, s:e], u[p + 2, s:e], u[p + 3, s:e], n)
            elif m == 4:
                _g43(t3[r, 0], t3[r, 1], t3[r, 2], u[p, s:e], u[p + 1, s:e], u[p + 2, s:e], u[p + 3, s:e],
                     u[p + 4, s:e], u[p + 5, s:e], n)
            else:
                _g63(t3[r, 0], t3[r, 1], t3[r, 2], u[p, s:e], u[p + 1, s:e], u[p + 2, s:e], u[p + 3, s:e],
                     u[p + 4, s:e], u[p + 5, s:e], u[p + 6, s:e], u[p + 7, s:e], n)
    for p in range(u.shape[0]):
        for e in range(n_all, u.shape[1]):
            u[p, e] = np.float32(0.0)


# Floats between the points' filters in filter_block_buffer: the rows of a block's filters are otherwise a multiple
# of 4 KB apart (Cin' x 64 floats), all in one L1 set (gvec.py). And between the panels of a point's filters (Cin'
# x 32 floats, also a multiple of 4 KB): a block's filters from 1280-2560 inputs made in 0.87-0.91 of the time.
POINT_GAP = 16
PANEL_GAP = 16


def filter_block_buffer(a2: int, cinp: int, ob: int, panels: bool = False) -> np.ndarray:
    """An (a2, cinp, ob) float32 array for fill_block_filters, each point's (cinp, ob) matrix contiguous and the
    points POINT_GAP floats further apart than that (winograd.point_products takes it as it is); panels: the
    filters in panels of gvec.PANEL output columns instead, (a2, ob / PANEL, cinp, PANEL), each panel's rows
    contiguous, the panels PANEL_GAP floats further apart than that and the points POINT_GAP."""
    if not panels:
        return np.empty((a2, cinp * ob + POINT_GAP), dtype=np.float32)[:, :cinp * ob].reshape(a2, cinp, ob)
    npan, size = ob // gvec.PANEL, cinp * gvec.PANEL
    step = size + PANEL_GAP
    u = np.empty((a2, npan * step + POINT_GAP), dtype=np.float32)[:, :npan * step]
    return u.reshape(a2, npan, step)[:, :, :size].reshape(a2, npan, cinp, gvec.PANEL)


def fill_block_filters(block: np.ndarray, m: int, u: np.ndarray, taps: np.ndarray | None = None,
                       rows: tuple[int, int] | None = None) -> None:
    """The Winograd F(m,3) filters of one block of output channels (block_outputs' (3, 3, Cin, ob), float32,
    float16 or bfloat16 bits) into u (alpha^2, Cin', ob) float32 (each point's matrix contiguous; best from
    filter_block_buffer), or into u in panels ((alpha^2, ob / 32, Cin', 32), each panel's rows contiguous:
    filter_block_buffer(panels=True)), rows from Cin on zero; the same numbers as fill_filters. taps: a float32
    buffer of at least 9 Cin ob elements for half weights. Serial. By gvec.filters (all 16 filters of a step in
    registers) where the block's size allows (always in panels), else in two passes (_filters_flat)."""
    if m not in (2, 4, 6):
        raise ValueError(f"no Winograd F({m},3)")
    kh, kw, cin, ob = block.shape
    a2, cinp, cols = filter_shape(u)  # u as rows (a2, Cin', ob) or in panels (a2, ob / PANEL, Cin', PANEL)
    if block.dtype != np.float32:
        block = widen(block, taps[: block.size], parallel=False)
    n = cin * ob
    r0, r1 = (0, m + 2) if rows is None else rows
    if not (0 <= r0 < r1 <= m + 2) or a2 != (r1 - r0) * (m + 2) or cinp < cin or cols != ob:
        raise ValueError(f"fill_block_filters: u {u.shape} for rows {r0}..{r1} of F({m},3) filters, Cin {cin}, {ob}")
    if u.ndim == 4:  # in panels
        if (n % gvec.LANES or u.shape[3] != gvec.PANEL or u.strides[2:] != (4 * gvec.PANEL, 4) or u.strides[0] % 4
                or u.strides[1] % 4):
            raise ValueError(f"fill_block_filters: filters in panels {u.shape}, strides {u.strides}")
        gvec.filters(block.reshape(-1), n, n, m, flat(u), u.strides[0] // 4, cinp * ob, r0, r1, ob, u.strides[1] // 4)
    elif n % gvec.LANES == 0 and u.strides[2] == 4 and u.strides[1] == 4 * ob and u.strides[0] % 4 == 0:
        gvec.filters(block.reshape(-1), n, n, m, flat(u), u.strides[0] // 4, cinp * ob, r0, r1, ob, 0)
    elif rows is None:
        _filters_flat(block.reshape(9, n), m, u.reshape(a2, -1))
    else:
        whole = np.empty(((m + 2) ** 2, cinp * ob), dtype=np.float32)
        _filters_flat(block.reshape(9, n), m, whole)
        u[...] = whole[r0 * (m + 2):r1 * (m + 2)].reshape(u.shape)


_T_BLOCK = 64  # output and input channels per tile of the OIHW -> HWIO re-layout


@njit(parallel=True, cache=True)
def _oihw_to_blocks(w, out):
    """out[o // ob, a, b, i, o % ob] = w[o, i, a, b] for out (blocks, kh, kw, Cin, ob), ob a multiple of _T_BLOCK
    or the only block (HWIO), in tiles of _T_BLOCK output x _T_BLOCK input channels: each tile read as _T_BLOCK
    contiguous runs of w (the taps of _T_BLOCK inputs for one output), written as runs of _T_BLOCK outputs, while
    it is in cache. Any dtype (float32, float16, bfloat16 bits); out's padding past Cout is left as it is."""
    cout, cin, kh, kw = w.shape
    ob = out.shape[4]
    nob = -(-cout // _T_BLOCK)
    nib = -(-cin // _T_BLOCK)
    for job in prange(nob * nib):
        tb = job // nib
        o0 = tb * _T_BLOCK
        i0 = (job - tb * nib) * _T_BLOCK
        o1 = min(cout, o0 + _T_BLOCK)
        i1 = min(cin, i0 + _T_BLOCK)
        j = o0 // ob
        # the tile through views indexed from 0 (an index such as o - j ob gets Numba's negative-index wraparound
        # on every element: 3-5 GB/s instead of 4-9 here)
        src = w[o0:o1, i0:i1]
        dst = out[j, :, :, i0:i1, o0 - j * ob:o1 - j * ob]
        for a in range(kh):
            for b in range(kw):
                for i in range(i1 - i0):
                    row = dst[a, b, i]
                    for o in range(o1 - o0):
                        row[o] = src[o, i, a, b]


def _relayout(w: np.ndarray, ob: int | None) -> np.ndarray:
    """OIHW -> (blocks, kh, kw, Cin, ob) (ob None: one block, HWIO, returned without its leading axis). What it
    makes is kept on disk between runs (sdgen.relaid_cache): a change to it must raise LAYOUT_VERSION there."""
    w = np.asarray(w)
    cout, cin, kh, kw = w.shape
    blocked = ob is not None
    ob = cout if ob is None else ob
    nb = -(-cout // ob)
    if w.dtype not in (np.float32, np.float16, np.uint16) or w.size < (1 << 16) or (blocked and ob % _T_BLOCK):
        t = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        return block_outputs(t, ob) if blocked else t
    src = np.ascontiguousarray(w)
    if src.dtype == np.float16:  # Numba has no float16: the same bits as uint16
        src = src.view(np.uint16)
    out = (np.zeros if nb * ob > cout else np.empty)((nb, kh, kw, cin, ob), dtype=src.dtype)
    _oihw_to_blocks(src, out)
    out = out.view(w.dtype)
    return out if blocked else out[0]


def hwio(w: np.ndarray) -> np.ndarray:
    """OIHW weights (as PyTorch stores them) re-laid (kh, kw, Cin, Cout), C-contiguous, dtype kept: the layout from
    which the 1x1 and im2col paths multiply directly and the Winograd filters are made with contiguous loads.
    Tiled and parallel (numpy's strided copy took 3.7 of the 4.2 s of loading SD1.5's models from the page cache)."""
    return _relayout(w, None)


def oihw_blocks(w: np.ndarray, ob: int) -> np.ndarray:
    """OIHW weights re-laid in blocks of ob output channels, as block_outputs(hwio(w), ob), in one pass."""
    return _relayout(w, ob)
