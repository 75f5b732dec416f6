"""A bit-exact re-implementation of PyTorch's CPU random generator (``torch.Generator("cpu")``).

diffusers draws the initial latents (and the noise of stochastic schedulers) with
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``.  To reproduce its images number
for number without PyTorch, :class:`TorchGenerator` reproduces that stream exactly: same engine, same
consumption of engine outputs, same float32 arithmetic, and the same state carried from one call to the next.

What is mirrored (torch 2.13.0, files under ``aten/src/ATen``):

* **Engine** - ``core/MT19937RNGEngine.h`` (``at::mt19937``): the classic MT19937 (Matsumoto & Nishimura,
  ``init_genrand``) seeded with the low 32 bits of the 64-bit seed.  ``CPUGeneratorImpl::random()`` is one
  engine output; ``random64()`` is two outputs, the first one in the high half.
  ``Generator.manual_seed`` accepts any int in ``[-2**63, 2**64)``; a negative seed is taken modulo 2**64.
  Seeding also clears the cached normal sample (``CPUGeneratorImpl::set_current_seed``).
* **Uniforms** - ``core/TransformationHelper.h`` ``uniform_real``: a float is ``(random() & (2**24-1)) * 2**-24``;
  a double is ``(random64() & (2**53-1)) * 2**-53``.  ``torch.rand`` (``uniform_kernel`` in
  ``native/cpu/DistributionTemplates.h``) is the float formula, one engine output per element, in order.
* **torch.randn, >= 16 elements** (contiguous float32) - ``normal_fill`` in
  ``native/cpu/DistributionTemplates.h``: first *all* ``n`` float uniforms are written to the output, then
  each block of 16 is turned into normals in place by Box-Muller pairing element ``j`` with ``j + 8``
  (``u1 = 1 - d[j]``, ``u2 = d[j + 8]``; ``d[j] = r cos(2 pi u2)``, ``d[j + 8] = r sin(2 pi u2)``,
  ``r = sqrt(-2 log u1)``).  When ``n`` is not a multiple of 16 the *last 16* elements are then refilled with
  16 fresh uniforms and transformed again (overwriting part of the last full block).
  The block transform ``NormalFill16<float>`` depends on the CPU capability ATen dispatched to:

  - ``AVX2`` and ``AVX512``: ``log256_ps`` and ``sincos256_ps`` of ``native/cpu/avx_mathfun.h``
    (Cephes-derived float32 polynomials by J. Pommier / G. Garberoglio).  They are reproduced here lane by
    lane in float32, operation by operation.  The wheel is compiled by GCC with ``-mavx2 -mfma`` and GCC's
    default ``-ffp-contract=fast``: GCC contracts every ``mul`` whose result only feeds an ``add``/``sub`` into
    one fused multiply-add, and these helpers are written with plain ``(__v8sf)a * b`` intrinsics, so they
    are *fused*.  Which pairs are fused (see :func:`_log256` / :func:`_sincos256`) follows GCC's rule and was
    checked exhaustively against torch 2.13.0: all 2**24 possible ``u1`` (radius) and all 2**24 possible
    ``u2`` (sin and cos, with a radius of exactly 1.0) give bit-identical results.  The AVX512 kernels are
    the same source compiled with ``-mavx512f`` (which implies ``__AVX2__``), so they take this same 8-lane
    transform with the same contractions: checked exhaustively the same way on an AVX-512 CPU (Zen 4), where
    torch dispatched to AVX512 (``python scripts/check_randn_exhaustive.py``).  Without the contraction
    about 1% of the normals would be 1-2 ulp off.  Like ``_mm256_fmadd_ps(n, std=1, mean=0)``, the final
    ``+ 0`` turns the ``-0`` produced for ``u1 == 1`` into ``+0``.
  - ``DEFAULT`` / non-x86: the scalar template - float32 ``std::log``, ``std::cos``,
    ``std::sin`` from libm, ``theta`` computed in double then rounded, ``std::fma`` for ``* std + mean``.
    Reproduced with the process's libm ``logf``/``cosf``/``sinf`` through Numba (checked exhaustively against
    torch run with ``ATEN_CPU_CAPABILITY=default``).

* **torch.randn, < 16 elements** - the ``TensorIterator`` branch of ``normal_kernel``: one
  ``at::normal_distribution<double>`` sample per element (``core/DistributionsHelper.h``): two double uniforms
  ``u1, u2``, ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``; it returns ``r cos(theta)`` and *caches*
  ``r sin(theta)`` in the generator (``next_double_normal_sample``).  The next small-path element - in this
  call or in any later call, with any number of large calls or ``rand`` calls in between - consumes the cache
  first.  Each double is rounded to float32 at the end.

All loops over the engine run in Numba (``cache=True``), no PyTorch at runtime.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Iterable

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["TorchGenerator", "detect_cpu_capability", "MATH_PATHS"]

# --------------------------------------------------------------------------------------------------------------
# MT19937 constants (core/MT19937RNGEngine.h)
# --------------------------------------------------------------------------------------------------------------
_MT_N = 624
_MT_M = 397
_MATRIX_A = 0x9908B0DF
_UMASK = 0x80000000
_LMASK = 0x7FFFFFFF

# --------------------------------------------------------------------------------------------------------------
# float32 constants of avx_mathfun.h (each is the C conversion of the double literal to float)
# --------------------------------------------------------------------------------------------------------------
_F = np.float32
_ONE = _F(1.0)
_HALF = _F(0.5)
_ZERO = _F(0.0)
_MINUS_TWO = _F(-2.0)
_TWO_PI = _F(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>): computed in double, then rounded
_INV_2_24 = _F(2.0**-24)
_MIN_NORM_POS = _F(np.frombuffer(np.int32(0x00800000).tobytes(), np.float32)[0])

_SQRTHF = _F(0.707106781186547524)
_LOG_P0 = _F(7.0376836292e-2)
_LOG_P1 = _F(-1.1514610310e-1)
_LOG_P2 = _F(1.1676998740e-1)
_LOG_P3 = _F(-1.2420140846e-1)
_LOG_P4 = _F(1.4249322787e-1)
_LOG_P5 = _F(-1.6668057665e-1)
_LOG_P6 = _F(2.0000714765e-1)
_LOG_P7 = _F(-2.4999993993e-1)
_LOG_P8 = _F(3.3333331174e-1)
_LOG_Q1 = _F(-2.12194440e-4)
_LOG_Q2 = _F(0.693359375)

_MINUS_DP1 = _F(-0.78515625)
_MINUS_DP2 = _F(-2.4187564849853515625e-4)
_MINUS_DP3 = _F(-3.77489497744594108e-8)
_SINCOF_P0 = _F(-1.9515295891e-4)
_SINCOF_P1 = _F(8.3321608736e-3)
_SINCOF_P2 = _F(-1.6666654611e-1)
_COSCOF_P0 = _F(2.443315711809948e-005)
_COSCOF_P1 = _F(-1.388731625493765e-003)
_COSCOF_P2 = _F(4.166664568298827e-002)
_FOPI = _F(1.27323954473516)  # 4 / pi

# Double constants of the small-size path (DistributionsHelper.h normal_distribution<double>)
_INV_2_53 = 2.0**-53
_MASK53 = (1 << 53) - 1
_TWO_PI_D = 2.0 * math.pi  # static_cast<double>(2.0) * c10::pi<double>

# Selectable Box-Muller block transforms.
MATH_PATH_AVX2 = 0  # avx_mathfun.h log256_ps / sincos256_ps, FMA-contracted as GCC builds them (AVX2 and AVX512)
MATH_PATH_LIBM = 1  # generic NormalFill16 with float libm logf/cosf/sinf (ATen DEFAULT capability, non-x86)
MATH_PATH_AVX2_NOFMA = 2  # avx_mathfun.h without any contraction (what a non-contracting compiler would give)
MATH_PATHS = {"avx2": MATH_PATH_AVX2, "default": MATH_PATH_LIBM, "avx512": MATH_PATH_AVX2,
              "libm": MATH_PATH_LIBM, "avx2-nofma": MATH_PATH_AVX2_NOFMA}


# --------------------------------------------------------------------------------------------------------------
# Low-level float32 helpers
# --------------------------------------------------------------------------------------------------------------
@intrinsic
def _fmaf(typingctx, a, b, c):
    """Single-rounding float32 fused multiply-add (``llvm.fma.f32``: vfmadd on x86, libm ``fmaf`` otherwise)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@nb.njit(inline="always")
def _madd(a, b, c, fused):
    """``a * b + c`` in float32: one rounding if ``fused`` (GCC-contracted), else two."""
    if fused:
        return _fmaf(a, b, c)
    return a * b + c


@nb.njit(inline="always")
def _f2i(x):
    """Bits of a float32 as an int64 in [0, 2**32)."""
    return np.int64(np.float32(x).view(np.uint32))


@nb.njit(inline="always")
def _i2f(i):
    """float32 whose bits are the low 32 bits of ``i``."""
    return np.uint32(i & 0xFFFFFFFF).view(np.float32)


# --------------------------------------------------------------------------------------------------------------
# MT19937 (at::mt19937)
# --------------------------------------------------------------------------------------------------------------
def _mt_seed_state(seed: int) -> np.ndarray:
    """``mt19937_engine::init_with_uint32``: the classic ``init_genrand`` on the low 32 bits of the seed."""
    state = np.empty(_MT_N, dtype=np.int64)
    x = seed & 0xFFFFFFFF
    state[0] = x
    for j in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        state[j] = x
    return state


@nb.njit(cache=True)
def _mt_next_state(mt):
    """``mt19937_engine::next_state``: regenerate the 624 words (the standard MT19937 twist)."""
    for k in range(_MT_N):
        y = (mt[k] & _UMASK) | (mt[(k + 1) % _MT_N] & _LMASK)
        v = mt[(k + _MT_M) % _MT_N] ^ (y >> 1)
        if y & 1:
            v ^= _MATRIX_A
        mt[k] = v


@nb.njit(inline="always")
def _mt_next(mt, pos):
    """One 32-bit output of ``mt19937_engine::operator()`` (tempered); ``pos[0]`` is the next word index."""
    i = pos[0]
    if i >= _MT_N:
        _mt_next_state(mt)
        i = 0
    y = mt[i]
    pos[0] = i + 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y


@nb.njit(cache=True)
def _mt_fill_u32(mt, pos, out):
    """``CPUGeneratorImpl::random()`` for each element of ``out`` (int64 array), in order."""
    for k in range(out.size):
        out[k] = _mt_next(mt, pos)


@nb.njit(inline="always")
def _uniform_f32(mt, pos):
    """``uniform_real_distribution<float>(0, 1)``: ``(random() & 0xFFFFFF) * 2**-24`` (exact in float32)."""
    return np.float32(_mt_next(mt, pos) & 0xFFFFFF) * _INV_2_24


@nb.njit(inline="always")
def _uniform_f64(mt, pos):
    """``uniform_real_distribution<double>(0, 1)``: ``(random64() & (2**53-1)) * 2**-53``, random64 = hi:lo."""
    hi = _mt_next(mt, pos)
    lo = _mt_next(mt, pos)
    return np.float64(((hi << 32) | lo) & _MASK53) * _INV_2_53


# --------------------------------------------------------------------------------------------------------------
# avx_mathfun.h, one lane at a time
# --------------------------------------------------------------------------------------------------------------
@nb.njit(inline="always")
def _log256(x, fused):
    """One lane of ``log256_ps`` (avx_mathfun.h), for x > 0 (here x = 1 - u is in [2**-24, 1]).

    Statement order is the header's.  With ``fused`` the multiply-adds GCC contracts are single-rounding:
    the 9-term Horner chain ``y = y*x + p_k``, then ``y = (y*x)*z + (e*q1)`` (the ``y*z`` product is fused,
    ``e*q1`` is rounded first because GCC converts the earlier multiplication), ``y = y - z*0.5`` and
    ``x = (x + y) + e*q2``.
    """
    x = max(x, _MIN_NORM_POS)  # _mm256_max_ps: cut off denormals
    bits = _f2i(x)
    imm0 = (bits >> 23) - 0x7F  # srli_epi32 then sub_epi32 (x > 0: no sign bit)
    x = _i2f((bits & 0x807FFFFF) | 0x3F000000)  # keep the mantissa, force exponent of 0.5
    e = np.float32(imm0) + _ONE
    if x < _SQRTHF:  # mask = x < SQRTHF; tmp = x & mask
        tmp = x
        m1 = _ONE
    else:
        tmp = _ZERO
        m1 = _ZERO
    x = x - _ONE
    e = e - m1
    x = x + tmp
    z = x * x
    y = _madd(_LOG_P0, x, _LOG_P1, fused)
    y = _madd(y, x, _LOG_P2, fused)
    y = _madd(y, x, _LOG_P3, fused)
    y = _madd(y, x, _LOG_P4, fused)
    y = _madd(y, x, _LOG_P5, fused)
    y = _madd(y, x, _LOG_P6, fused)
    y = _madd(y, x, _LOG_P7, fused)
    y = _madd(y, x, _LOG_P8, fused)
    y = y * x
    tmp = e * _LOG_Q1
    y = _madd(y, z, tmp, fused)
    y = _madd(-z, _HALF, y, fused)  # y - z*0.5
    x = x + y
    x = _madd(e, _LOG_Q2, x, fused)
    return x


@nb.njit(inline="always")
def _sincos256(x, fused):
    """One lane of ``sincos256_ps`` (avx_mathfun.h) for x >= 0; returns ``(sin, cos)``.

    Fused (as GCC contracts them): the three Cody-Waite reduction steps ``x = x + y*(-DP_k)``, the first two
    Horner steps of each polynomial, ``y = (y*z)*z - z*0.5`` (the ``*z`` is fused, ``z*0.5`` rounded first)
    and ``y2 = (y2*z)*x + x``.
    """
    # sign_bit_sin = sign of the input: theta = 2 pi u >= 0 here, so the sign is 0 and |x| = x.
    sign_sin = _f2i(x) & 0x80000000
    x = _i2f(_f2i(x) & 0x7FFFFFFF)
    y = x * _FOPI
    j = np.int64(np.int32(y))  # cvttps_epi32 (truncation; y < 8 here)
    j = (j + 1) & ~np.int64(1)
    y = np.float32(j)
    swap_sign_sin = (j & 4) << 29
    poly_sin_is_y2 = (j & 2) == 0  # poly_mask
    x = _madd(y, _MINUS_DP1, x, fused)
    x = _madd(y, _MINUS_DP2, x, fused)
    x = _madd(y, _MINUS_DP3, x, fused)
    sign_cos = (~(j - 2) & 4) << 29
    sign_sin = sign_sin ^ swap_sign_sin

    z = x * x
    y = _madd(_COSCOF_P0, z, _COSCOF_P1, fused)
    y = _madd(y, z, _COSCOF_P2, fused)
    y = y * z
    tmp = z * _HALF
    y = _madd(y, z, -tmp, fused)  # y*z - tmp
    y = y + _ONE

    y2 = _madd(_SINCOF_P0, z, _SINCOF_P1, fused)
    y2 = _madd(y2, z, _SINCOF_P2, fused)
    y2 = y2 * z
    y2 = _madd(y2, x, x, fused)

    if poly_sin_is_y2:  # ysin2 = y2 & mask, ysin1 = y & ~mask
        ysin2 = y2
        ysin1 = _ZERO
    else:
        ysin2 = _ZERO
        ysin1 = y
    y2 = y2 - ysin2
    y = y - ysin1
    s = ysin1 + ysin2
    c = y + y2
    s = _i2f(_f2i(s) ^ sign_sin)
    c = _i2f(_f2i(c) ^ sign_cos)
    return s, c


@nb.njit(inline="always")
def _normal16_avx2(d, i, fused):
    """``NormalFill16<float>`` for CPU_CAPABILITY_AVX2 on ``d[i:i+16]`` (mean 0, std 1), lane by lane."""
    for j in range(8):
        u1 = _ONE - d[i + j]
        u2 = d[i + j + 8]
        radius = np.sqrt(_MINUS_TWO * _log256(u1, fused))  # _mm256_sqrt_ps: correctly rounded
        theta = _TWO_PI * u2
        s, c = _sincos256(theta, fused)
        # _mm256_fmadd_ps(n, std=1, mean=0): n exactly, except that -0 becomes +0 (u1 == 1 gives radius -0)
        d[i + j] = (radius * c) + _ZERO
        d[i + j + 8] = (radius * s) + _ZERO


@nb.njit(inline="always")
def _normal16_libm(d, i):
    """The generic ``NormalFill16<float>`` (DEFAULT capability) on ``d[i:i+16]`` (mean 0, std 1)."""
    for j in range(8):
        u1 = _ONE - d[i + j]
        u2 = d[i + j + 8]
        radius = np.sqrt(_MINUS_TWO * np.log(u1))  # std::sqrt(-2 * std::log(float))
        theta = np.float32(_TWO_PI_D * np.float64(u2))  # 2.0f * pi<double> * u2 in double, stored as float
        # std::fma(radius * std::cos(theta), std=1, mean=0): the product, with -0 turned into +0
        d[i + j] = (radius * np.cos(theta)) + _ZERO
        d[i + j + 8] = (radius * np.sin(theta)) + _ZERO


# One compiled Box-Muller kernel per math path (``fused`` is a constant in each, so only the code of the
# path in use is compiled, and only when first used).
@nb.njit(cache=True)
def _box_muller_avx2(d, start, stop):
    """``NormalFill16`` (AVX2, FMA-contracted) in place on ``d[i:i+16]``, ``i`` in ``range(start, stop, 16)``."""
    for i in range(start, stop, 16):
        _normal16_avx2(d, i, True)


@nb.njit(cache=True)
def _box_muller_avx2_nofma(d, start, stop):
    """Like :func:`_box_muller_avx2` without FMA contraction (diagnostics: shows that contraction matters)."""
    for i in range(start, stop, 16):
        _normal16_avx2(d, i, False)


@nb.njit(cache=True)
def _box_muller_libm(d, start, stop):
    """The generic ``NormalFill16`` (libm float functions) in place, like :func:`_box_muller_avx2`."""
    for i in range(start, stop, 16):
        _normal16_libm(d, i)


_BOX_MULLER = {MATH_PATH_AVX2: _box_muller_avx2, MATH_PATH_AVX2_NOFMA: _box_muller_avx2_nofma,
               MATH_PATH_LIBM: _box_muller_libm}


def _randn_fill_large(mt, pos, d, path):
    """``normal_fill<float>`` (DistributionTemplates.h) for ``d.size >= 16``: all uniforms first, then blocks."""
    box_muller = _BOX_MULLER[path]
    n = d.size
    _rand_fill(mt, pos, d)
    box_muller(d, 0, n - 15)  # for (i = 0; i < size - 15; i += 16)
    if n % 16 != 0:
        # Recompute the last 16 values from 16 fresh uniforms.
        tail = d[n - 16:]
        _rand_fill(mt, pos, tail)
        box_muller(tail, 0, 1)


@nb.njit(cache=True)
def _randn_fill_small(mt, pos, cache, d):
    """The ``< 16`` elements branch: ``normal_distribution<double>`` per element with the cached second normal.

    ``cache[0]`` is 1.0 when a cached sample is held in ``cache[1]`` (``next_double_normal_sample_``).
    """
    for k in range(d.size):
        if cache[0] != 0.0:
            cache[0] = 0.0
            v = cache[1]
        else:
            u1 = _uniform_f64(mt, pos)
            u2 = _uniform_f64(mt, pos)
            r = math.sqrt(-2.0 * math.log1p(-u2))
            theta = _TWO_PI_D * u1
            cache[1] = r * math.sin(theta)
            cache[0] = 1.0
            v = r * math.cos(theta)
        # transformation::normal: v * std + mean with std 1, mean 0 (turns -0 into +0); then static_cast<float>
        d[k] = np.float32(v * 1.0 + 0.0)


@nb.njit(cache=True)
def _rand_fill(mt, pos, d):
    """``uniform_kernel`` for float32 on [0, 1): one engine output per element, in order."""
    for k in range(d.size):
        d[k] = _uniform_f32(mt, pos)


# --------------------------------------------------------------------------------------------------------------
# CPU capability
# --------------------------------------------------------------------------------------------------------------
def detect_cpu_capability() -> str:
    """The ATen CPU capability torch would dispatch to here: ``"avx512"``, ``"avx2"`` or ``"default"``.

    Mirrors ``ATen/native/DispatchStub.cpp``: ``ATEN_CPU_CAPABILITY`` overrides; otherwise AVX-512
    (F, BW, VL, DQ) wins over AVX2 (+FMA).  Only x86-64 Linux flags are inspected; anything else is
    ``"default"``, which selects the generic libm Box-Muller (``"avx512"`` selects the AVX2 one).
    """
    env = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if env in ("default", "avx2", "avx512"):
        return env
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def _shape_tuple(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (operator.index(shape),)
    dims = tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims


# --------------------------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------------------------
class TorchGenerator:
    """Drop-in for ``torch.Generator("cpu").manual_seed(seed)`` as used by diffusers, in numpy.

    >>> g = TorchGenerator(42)
    >>> latents = g.randn((1, 4, 64, 64))   # == torch.randn((1,4,64,64), generator=g_torch).numpy()
    >>> noise = g.randn((1, 4, 64, 64))     # the state continues exactly like torch's

    ``capability`` picks the Box-Muller block transform of the ``>= 16`` elements path: ``"auto"`` (the capability
    torch would use on this CPU, see :func:`detect_cpu_capability`), ``"avx2"`` or ``"default"``
    (``"avx512"`` is the same as ``"avx2"``: torch's AVX512 build runs the same 8-lane normal fill).
    """

    def __init__(self, seed: int = 67280421310721, capability: str = "auto"):
        # 67280421310721 is c10::default_rng_seed_val, the seed of a fresh torch.Generator().
        if capability == "auto":
            capability = detect_cpu_capability()
        try:
            self._path = MATH_PATHS[capability]
        except KeyError:
            raise ValueError(
                f"unknown capability {capability!r}; expected 'auto' or one of {sorted(MATH_PATHS)}") from None
        self.capability = capability
        self.manual_seed(seed)

    # -- seeding / state ----------------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> "TorchGenerator":
        """``Generator.manual_seed``: any int in ``[-2**63, 2**64)``; negatives wrap modulo 2**64."""
        if isinstance(seed, bool):
            seed = int(seed)
        try:
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed must be an int, not {type(seed).__name__}") from None
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed {seed} out of range: torch accepts [-2**63, 2**64)")
        self._seed = seed % 2**64
        self._mt = _mt_seed_state(self._seed)
        self._pos = np.array([_MT_N], dtype=np.int64)  # left_ = 1: the first draw twists
        self._cache = np.zeros(2, dtype=np.float64)  # [has next_double_normal_sample, value]
        return self

    def initial_seed(self) -> int:
        """The seed as torch reports it (``Generator.initial_seed``), in ``[0, 2**64)``."""
        return self._seed

    def clone(self) -> "TorchGenerator":
        """An independent copy with the same state (same future stream)."""
        other = object.__new__(TorchGenerator)
        other._path, other.capability, other._seed = self._path, self.capability, self._seed
        other._mt, other._pos, other._cache = self._mt.copy(), self._pos.copy(), self._cache.copy()
        return other

    # -- draws ----------------------------------------------------------------------------------------------------
    def randn(self, shape: int | Iterable[int]) -> np.ndarray:
        """``torch.randn(shape, generator=g, dtype=torch.float32)``, bit for bit; advances the state like torch."""
        dims = _shape_tuple(shape)
        out = np.empty(dims, dtype=np.float32)
        flat = out.reshape(-1)
        if flat.size >= 16:
            _randn_fill_large(self._mt, self._pos, flat, self._path)
        elif flat.size > 0:
            _randn_fill_small(self._mt, self._pos, self._cache, flat)
        return out

    def rand(self, shape: int | Iterable[int]) -> np.ndarray:
        """``torch.rand(shape, generator=g)`` (float32 in [0, 1)), bit for bit."""
        dims = _shape_tuple(shape)
        out = np.empty(dims, dtype=np.float32)
        if out.size:
            _rand_fill(self._mt, self._pos, out.reshape(-1))
        return out

    def random_u32(self, n: int) -> np.ndarray:
        """The next ``n`` raw engine outputs (``CPUGeneratorImpl::random()``) as uint32."""
        out = np.empty(operator.index(n), dtype=np.int64)
        if out.size:
            _mt_fill_u32(self._mt, self._pos, out)
        return out.astype(np.uint32)

    def __repr__(self) -> str:
        return f"TorchGenerator(seed={self._seed}, capability={self.capability!r})"
