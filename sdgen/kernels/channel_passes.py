"""One-dimensional linear transforms applied across channels in vector registers: the passes of the Winograd input
and output transforms (winograd.py), as Numba intrinsics.

A pass reads `nin` rows of n floats (src[s_off + j s_ld + c], j < nin, c < n), applies a transform written as a
Python function of scalars (winograd._b8, _a6, ...: sums, differences and products by float32 constants) to each
channel c, and writes its `nout` results as rows (dst[d_off + i d_ld + c]). The function is evaluated once, at
compile time, on LLVM values instead of numbers: the same operations in the same order, each rounded as Numba's
scalar code rounds it (no fused multiply-adds), so the numbers are bit for bit those of the scalar loop; the
channels go LANES at a time, the last few one at a time.

Written in LLVM IR, as panels.py's tiles and gvec.py's filter transform: LLVM's vectoriser does not take these
loops from Numba -- 8 input rows and 6 or 8 output rows of arrays it cannot prove apart need more run-time checks
than it will make -- and left them scalar, at 90-180 cycles a channel of an 8 x 8 tile (Zen 4).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # floats per vector (512 bits)


class _Value:
    """An LLVM float (or vector of floats) value that Python's arithmetic operators build on: a + b, a - b and a * b,
    with numbers (float32 constants) on either side (all that the transforms' formulas use)."""

    __array_ufunc__ = None  # numpy scalars on the left defer to our reflected operators

    def __init__(self, builder: ir.IRBuilder, value, ty):
        self.builder, self.value, self.ty = builder, value, ty

    def _of(self, other):
        if isinstance(other, _Value):
            return other.value
        c = ir.Constant(ir.FloatType(), float(np.float32(other)))
        if isinstance(self.ty, ir.VectorType):
            return ir.Constant(self.ty, [c.constant] * self.ty.count)
        return c

    def _new(self, value) -> "_Value":
        return _Value(self.builder, value, self.ty)

    def __add__(self, other):
        return self._new(self.builder.fadd(self.value, self._of(other)))

    def __radd__(self, other):
        return self._new(self.builder.fadd(self._of(other), self.value))

    def __sub__(self, other):
        return self._new(self.builder.fsub(self.value, self._of(other)))

    def __rsub__(self, other):
        return self._new(self.builder.fsub(self._of(other), self.value))

    def __mul__(self, other):
        return self._new(self.builder.fmul(self.value, self._of(other)))

    def __rmul__(self, other):
        return self._new(self.builder.fmul(self._of(other), self.value))


def make_pass(fn, nin: int, nout: int):
    """The intrinsic pass(src, s_off, s_ld, dst, d_off, d_ld, n): for c < n, (y_0 .. y_{nout-1}) = fn(x_0 ..
    x_{nin-1}) with x_j = src[s_off + j s_ld + c], stored to dst[d_off + i d_ld + c]. src and dst: C-contiguous
    float32 arrays of any number of dimensions, addressed as flat (no bounds check); fn: a Python function of nin
    scalars returning nout values, using +, -, * and float32 constants only."""

    @intrinsic
    def vector_pass(typingctx, src, s_off, s_ld, dst, d_off, d_ld, n):
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C" for t in (src, dst)):
            return None
        sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            sv, so, sl, dv, do, dl, nv = args
            i64 = so.type
            sp = context.make_array(signature.args[0])(context, builder, sv).data
            dp = context.make_array(signature.args[3])(context, builder, dv).data

            def run(ty, start, count, width):  # count steps of `width` channels from channel start
                ptr = ty.as_pointer()
                with cgutils.for_range(builder, count) as loop:
                    c = builder.add(start, builder.mul(loop.index, ir.Constant(i64, width)))
                    xs = []
                    for j in range(nin):
                        at = builder.add(builder.add(so, builder.mul(ir.Constant(i64, j), sl)), c)
                        x = builder.load(builder.bitcast(builder.gep(sp, [at]), ptr), align=4)
                        xs.append(_Value(builder, x, ty))
                    ys = fn(*xs)
                    for i, y in enumerate(ys):
                        at = builder.add(builder.add(do, builder.mul(ir.Constant(i64, i), dl)), c)
                        builder.store(y.value, builder.bitcast(builder.gep(dp, [at]), ptr), align=4)

            full = builder.sdiv(nv, ir.Constant(i64, LANES))
            run(ir.VectorType(ir.FloatType(), LANES), ir.Constant(i64, 0), full, LANES)
            done = builder.mul(full, ir.Constant(i64, LANES))
            run(ir.FloatType(), done, builder.sub(nv, done), 1)
            return context.get_dummy_value()

        return sig, codegen

    vector_pass.__doc__ = f"{fn.__name__} across channels, {nin} rows in, {nout} out (channel_passes.make_pass)."
    return vector_pass
