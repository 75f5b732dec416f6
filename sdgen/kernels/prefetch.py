"""Software prefetch for Numba kernels: ask for the cache lines of a span of an array ahead of its use.

The hardware prefetchers follow a stream only within a 4 KB page. A kernel that walks an image tile by tile reads
each of a window's rows as a run of a few KB that starts on a new page at nearly every tile (an NHWC row of 8
pixels x 128 channels is 4 KB), so every tile would wait for its rows from memory; prefetching the next tile's
rows while the current one is transformed hides that wait (winograd._prefetch_window). A prefetch never faults,
and changes no number.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes per cache line


@intrinsic
def _prefetch(typingctx, arr, index):
    """Prefetch into L2 the line holding the flat element `index` of arr (C-contiguous; of any other layout: nothing
    is asked for), to be read."""
    if not (isinstance(arr, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        if signature.args[0].layout != "C":  # no flat index to the element
            return context.get_dummy_value()
        av, i = args
        data = context.make_array(signature.args[0])(context, builder, av).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        at = builder.bitcast(builder.gep(data, [i]), i8p)
        # (address, read, locality 2: into L2 and the caches above it, data)
        builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@njit(inline="always")
def prefetch_span(arr, start, count):
    """Prefetch into L2 the lines of the flat elements start .. start + count - 1 of arr (C-contiguous, else
    nothing; none if count <= 0), to be read."""
    if count <= 0:
        return
    step = max(1, LINE // arr.itemsize)
    end = start + count
    for e in range(start, end, step):
        _prefetch(arr, e)
    _prefetch(arr, end - 1)  # the line of the last element, where the span does not start on a line
