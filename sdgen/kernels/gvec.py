"""The Winograd filter transform U = G g G^T of F(2,3), F(4,3) and F(6,3), LANES filters at a time in vector
registers: the 9 taps of LANES adjacent filters loaded once, both passes of G done in registers, the alpha^2
results stored once each.

weights._filters_flat makes the same numbers in two passes over memory (G to the taps' columns into a temporary,
then G to its rows): 9 + 3 alpha loads and 3 alpha + alpha^2 stores per filter; here 9 loads and alpha^2 stores.
The stores go to alpha^2 rows of u, ldu floats apart: where that distance is a multiple of 4 KB (Cin' x 64 floats,
as the filters of a block of 64 output channels lie) every row maps to the same L1 set and the lines are evicted
before they are filled; a few floats of padding between the rows avoids it (weights.filter_block_buffer). One
block's F(4,3) filters (1280 inputs x 64 outputs, one thread, Zen 4, medians of 40): 0.40-0.56 ms in two passes,
0.30-0.32 here into padded rows, 0.95 into unpadded ones. A step can make the points of some of the tile's rows
only (winograd.BLOCK_ROW_GROUPS: the filters then used while in cache); F(4,3)'s pairs of rows have steps compiled
for them, which skip the first pass's values those rows do not use: 0.93-0.94 of the time of a step that takes its
rows at run time (all three pairs of a block of 64 outputs from 256-1280 inputs, one thread, Zen 4, alternating
calls; the same numbers).

Numbers: each output is the expression of weights._g23 / _g43 / _g63 (G written out), in the same order of
operations, without contraction into fused multiply-adds: bit-identical to the two-pass transform.

Written in LLVM IR (a Numba intrinsic), as panels.py's tiles: 9 + 3 alpha live vectors in one loop body, with a
store into each of alpha^2 different rows, is a loop LLVM's vectoriser does not take from Numba (it stays scalar:
13 ms for the block above).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .panels import PANEL  # columns of a panel of filters

LANES = 16  # filters per step: a whole 64-byte line of each output row, stored at once


def apply_g(m: int, x0, x1, x2, add, sub, mul) -> list:
    """G (x0, x1, x2) of F(m,3) (alpha values), with add(x, y), sub(x, y) and mul(c, x) for a float constant c, in
    the order of operations of weights._g23 / _g43 / _g63."""
    if m == 2:
        s = add(x0, x2)
        return [x0, mul(0.5, add(s, x1)), mul(0.5, sub(s, x1)), x2]
    if m == 4:
        s = add(x0, x2)
        e = add(mul(1.0 / 24.0, x0), mul(1.0 / 6.0, x2))
        d = mul(1.0 / 12.0, x1)
        return [mul(0.25, x0), mul(-1.0 / 6.0, add(s, x1)), mul(-1.0 / 6.0, sub(s, x1)), add(e, d), sub(e, d), x2]
    if m == 6:
        s = add(x0, x2)
        e = add(mul(1.0 / 90.0, x0), mul(2.0 / 45.0, x2))
        d = mul(1.0 / 45.0, x1)
        f = add(mul(32.0 / 45.0, x0), mul(8.0 / 45.0, x2))
        q = mul(16.0 / 45.0, x1)
        return [x0, mul(-2.0 / 9.0, add(s, x1)), mul(-2.0 / 9.0, sub(s, x1)), add(e, d), sub(e, d), add(f, q),
                sub(f, q), x2]
    raise ValueError(f"no Winograd F({m},3)")


def _make_step(m: int, rows: tuple[int, int] | None = None):
    """The intrinsic for one step of F(m,3): step(g, g_off, ldg, u, u_off, ldu, r0, r1). rows: the tile's rows
    [r0, r1) fixed when it is compiled (r0 and r1 then ignored): only their points' values are computed (the first
    pass's values that no wanted row uses are dropped by LLVM); None: the rows asked for at each step, the first
    pass whole."""
    a = m + 2

    @intrinsic
    def step(typingctx, g, g_off, ldg, u, u_off, ldu, r0, r1):
        """u[u_off + (p - r0 alpha) ldu + j] = (G g_j G^T)[p] for the points p = r alpha + c of the tile's rows
        r0 <= r < r1, j < LANES, the taps g_j[3 k + l] = g[g_off + (3 k + l) ldg + j] (1-D C-contiguous float32
        arrays; no bounds check)."""
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 1 and t.layout == "C"
                   for t in (g, u)):
            return None
        sig = types.void(g, types.intp, types.intp, u, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            gv, go, lg, uv, uo, lu, rlo, rhi = args
            vec = ir.VectorType(ir.FloatType(), LANES)
            vptr = vec.as_pointer()
            i64 = go.type
            gp = context.make_array(signature.args[0])(context, builder, gv).data
            up = context.make_array(signature.args[3])(context, builder, uv).data

            def at(base, off, ld, i):
                return builder.bitcast(builder.gep(base, [builder.add(off, builder.mul(i, ld))]), vptr)

            def mul(c, x):  # the constant rounded to float32 first, as np.float32(c) in the two-pass transform
                return builder.fmul(ir.Constant(vec, [float(np.float32(c))] * LANES), x)

            def store_row(r, first):
                row = apply_g(m, cols[0][r], cols[1][r], cols[2][r], builder.fadd, builder.fsub, mul)
                for c, y in enumerate(row):
                    builder.store(y, at(up, uo, lu, builder.add(first, ir.Constant(i64, c))), align=4)

            x = [builder.load(at(gp, go, lg, ir.Constant(i64, t)), align=4) for t in range(9)]
            cols = [apply_g(m, x[l], x[3 + l], x[6 + l], builder.fadd, builder.fsub, mul) for l in range(3)]
            if rows is not None:
                for r in range(*rows):
                    store_row(r, ir.Constant(i64, (r - rows[0]) * a))
                return context.get_dummy_value()
            for r in range(a):  # each row in registers, if asked for (a branch the same way at every step)
                wanted = builder.and_(builder.icmp_signed("<=", rlo, ir.Constant(i64, r)),
                                      builder.icmp_signed(">", rhi, ir.Constant(i64, r)))
                with builder.if_then(wanted):
                    store_row(r, builder.mul(builder.sub(ir.Constant(i64, r), rlo), ir.Constant(i64, a)))
            return context.get_dummy_value()

        return sig, codegen

    return step


_STEP2, _STEP4, _STEP6 = (_make_step(m) for m in (2, 4, 6))
# F(4,3)'s filters made two rows of the tile at a time (winograd.BLOCK_ROW_GROUPS), each pair compiled for its rows
_STEP4_01, _STEP4_23, _STEP4_45 = (_make_step(4, (r, r + 2)) for r in (0, 2, 4))


@njit(nogil=True, cache=True)
def filters(g, ldg, n, m, u, ldu, rows, r0, r1, cols, panel_step):
    """u[(p - r0 alpha) ldu + e] = (G g_e G^T)[p] for the points p of the tile's rows [r0, r1) and e < n, where
    g_e's taps are g[t ldg + e] (t = 3 k + l); 0 for n <= e < rows (channel padding). Flat float32 arrays; n a
    multiple of LANES. With panel_step > 0, filter e = i cols + j (input i, output column j < cols, a multiple of
    PANEL) goes to column j % PANEL of row i of panel j // PANEL instead, panels panel_step floats apart, and rows
    from n / cols to rows / cols of each panel are 0. Serial; releases the GIL."""
    pair = r0 if m == 4 and r1 == r0 + 2 else -1  # F(4,3)'s rows r0, r0 + 1: the step compiled for them, if any
    for e in range(0, n, LANES):
        at = e
        if panel_step > 0:
            i = e // cols
            j = e - i * cols
            q = j // PANEL
            at = q * panel_step + i * PANEL + (j - q * PANEL)
        if m == 2:
            _STEP2(g, e, ldg, u, at, ldu, r0, r1)
        elif pair == 0:
            _STEP4_01(g, e, ldg, u, at, ldu, r0, r1)
        elif pair == 2:
            _STEP4_23(g, e, ldg, u, at, ldu, r0, r1)
        elif pair == 4:
            _STEP4_45(g, e, ldg, u, at, ldu, r0, r1)
        elif m == 4:
            _STEP4(g, e, ldg, u, at, ldu, r0, r1)
        else:
            _STEP6(g, e, ldg, u, at, ldu, r0, r1)
    for p in range((r1 - r0) * (m + 2)):
        if panel_step > 0:
            for q in range(cols // PANEL):
                row = u[p * ldu + q * panel_step + n // cols * PANEL:p * ldu + q * panel_step + rows // cols * PANEL]
                for e in range(row.size):
                    row[e] = np.float32(0.0)
        else:
            row = u[p * ldu + n:p * ldu + rows]  # indexed from 0 (Numba's wraparound otherwise)
            for e in range(rows - n):
                row[e] = np.float32(0.0)
