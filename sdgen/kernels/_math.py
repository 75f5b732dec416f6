"""Scalar float32 math for Numba kernels, written so that loops calling it vectorise (AVX2: 8 lanes).

libm's exp/erf are scalar calls that LLVM cannot vectorise (Numba has no SVML here), so exp and erfc are
polynomials:

exp(x):  x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 split in a high and a low part so n ln2 is
         exact); exp(r) by its Taylor polynomial to degree 6 (truncation error < 1.2e-7 relative), times 2^n built
         in the exponent bits. Relative error about 2.5e-7 over the float32 range; 0 below -87.3 (where exp is
         denormal), x clamped at 88 above.
erfc(z), z >= 0:  erfc(z) = exp(-z^2) R(t), t = 1 / (1 + z/2), R a degree-9 polynomial in t fitted for this
         project (weighted least squares by Lawson's iteration on z in [0, 10], in float64 against
         scipy.special.erfc): relative error of R below 3.3e-8, 2.6e-7 once evaluated in float32. Keeps relative
         accuracy in the tail, which 1 - erf(z) would not (but exp(-z^2) with z^2 rounded to float32 costs a few
         1e-6 relative for z > 3, on values below 1e-4).

Numba's on-disk cache only watches the file of each cached kernel, not this one, whose functions get inlined into
them: after editing this file, delete sdgen/kernels/__pycache__ (or touch the kernel modules).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 to 16 bits: n * _LN2_HI is exact for |n| < 256
_LN2_LO = np.float32(1.4286068203094172e-06)  # ln 2 - _LN2_HI
_EXP_LO = np.float32(-87.33)
_EXP_HI = np.float32(88.0)
_C2 = np.float32(1.0 / 2.0)
_C3 = np.float32(1.0 / 6.0)
_C4 = np.float32(1.0 / 24.0)
_C5 = np.float32(1.0 / 120.0)
_C6 = np.float32(1.0 / 720.0)

# 2^r = exp(r ln 2) by its Taylor polynomial to degree 6, |r| <= 1/2: truncation error < 1.2e-7 relative, as exp's
_P2 = tuple(np.float32(math.log(2.0) ** k / math.factorial(k)) for k in range(7))
_E0 = np.float32(-6.0094708244e-06)
_E1 = np.float32(2.8222131763e-01)
_E2 = np.float32(2.8109916458e-01)
_E3 = np.float32(2.4978871549e-01)
_E4 = np.float32(1.8126826489e-01)
_E5 = np.float32(1.7033903930e-02)
_E6 = np.float32(2.2125615280e-01)
_E7 = np.float32(-4.4153668122e-01)
_E8 = np.float32(2.6393278666e-01)
_E9 = np.float32(-5.5057647890e-02)

_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))
_ERFC_ZMAX = np.float32(9.3)  # erfc(9.3) ~ 1e-39: from there on erfc is 0 in float32


@njit(inline="always")
def fexp(x):
    """exp(x) for float32 x, vectorisable (see the module docstring for accuracy)."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.float32(1.0) + r * (np.float32(1.0) + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * _C6)))))
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    v = p * scale
    return v if x > _EXP_LO else np.float32(0.0)


@njit(inline="always")
def ferfc_pos(z):
    """erfc(z) for float32 z >= 0, vectorisable, relative error about 3e-7."""
    zc = min(z, _ERFC_ZMAX)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * zc)
    r = _E9
    r = r * t + _E8
    r = r * t + _E7
    r = r * t + _E6
    r = r * t + _E5
    r = r * t + _E4
    r = r * t + _E3
    r = r * t + _E2
    r = r * t + _E1
    r = r * t + _E0
    v = fexp(-zc * zc) * r
    return v if z < _ERFC_ZMAX else np.float32(0.0)


@njit(inline="always")
def fgelu(x):
    """Exact (erf) GELU x * Phi(x) for float32 x: Phi(x) = erfc(-x / sqrt 2) / 2, relative accuracy kept for x < 0."""
    e = ferfc_pos(abs(x) * _INV_SQRT2)
    phi = np.float32(0.5) * e if x < np.float32(0.0) else np.float32(1.0) - np.float32(0.5) * e
    return x * phi


@njit(inline="always")
def fsilu(x):
    """x * sigmoid(x) for float32 x (0 where exp(-x) would overflow)."""
    v = x / (np.float32(1.0) + fexp(-x))
    return v if x > -_EXP_HI else np.float32(0.0)


@njit(inline="always")
def fquick_gelu(x):
    """CLIP's x * sigmoid(1.702 x) for float32 x (0 where exp would overflow)."""
    t = np.float32(1.702) * x
    v = x / (np.float32(1.0) + fexp(-t))
    return v if t > -_EXP_HI else np.float32(0.0)


@njit(fastmath={"reassoc"})
def sum64(a, n):
    """Sum of a[0:n] (float32) accumulated in float64; reassociation allowed so LLVM vectorises it. Not inlined
    by Numba on purpose: Numba-level inlining would compile it under the caller's fastmath flags."""
    s = 0.0
    for i in range(n):
        s += np.float64(a[i])
    return s


@njit(inline="always")
def max32(a, n):
    """max of a[0:n] (n >= 1) with 8 independent running maxima, which the SLP vectoriser packs into one register."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    i = 0
    while i + 8 <= n:
        m0 = max(m0, a[i])
        m1 = max(m1, a[i + 1])
        m2 = max(m2, a[i + 2])
        m3 = max(m3, a[i + 3])
        m4 = max(m4, a[i + 4])
        m5 = max(m5, a[i + 5])
        m6 = max(m6, a[i + 6])
        m7 = max(m7, a[i + 7])
        i += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while i < n:
        m = max(m, a[i])
        i += 1
    return m


@njit(fastmath={"reassoc"})
def sumsq_dev64(a, n, mean):
    """Sum of (a[i] - mean)^2 over a[0:n] (float32) in float64, vectorised like sum64."""
    s = 0.0
    for i in range(n):
        d = np.float64(a[i]) - mean
        s += d * d
    return s
