"""Coarse-grained parallelism for the kernels that mix BLAS with Numba (convolutions, attention).

Alternating Numba's parallel loops with multithreaded BLAS calls block by block makes the two thread pools hand the
cores back and forth thousands of times per layer; each hand-off waits for a spinning or descheduled thread, and on
a busy machine the result was 10-20x slower than one thread (measured with scripts/bench_kernels.py). Instead,
these kernels split their work into a few large jobs that run on `workers()` Python threads, each job calling
serial Numba kernels (nogil) and single-threaded BLAS (numpy releases the GIL in both): one fork and one join per
phase, each thread keeping its own block in its own cache. The number of threads is Numba's setting, which
sdgen.threads.set_threads sets together with BLAS's.

BLAS is held to one thread while the workers run (`blas_single`). Where its thread count cannot be set (no OpenBLAS
found and no threadpoolctl), workers() is 1 and the kernels run their jobs in order with BLAS as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas = None  # (set_num_threads, get_num_threads) or False when none was found


def _find_blas():
    """ctypes entry points of the OpenBLAS that numpy loaded, else threadpoolctl's controller, else False."""
    try:
        with open("/proc/self/maps") as f:
            paths = []
            for line in f:
                p = line.split()[-1] if line.strip() else ""
                if "openblas" in os.path.basename(p).lower() and p not in paths:
                    paths.append(p)
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                set_fn = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                get_fn = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if set_fn is not None and get_fn is not None:
                    set_fn.argtypes = [ctypes.c_int]
                    set_fn.restype = None
                    get_fn.argtypes = []
                    get_fn.restype = ctypes.c_int
                    return (lambda n, f=set_fn: f(int(n)), lambda f=get_fn: int(f()))
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    ctl = ThreadpoolController().select(user_api="blas")
    if not ctl.lib_controllers:
        return False

    def set_n(n):
        for lc in ctl.lib_controllers:
            lc.set_num_threads(int(n))

    def get_n():
        return max(lc.num_threads for lc in ctl.lib_controllers)

    return (set_n, get_n)


def _blas_fns():
    global _blas
    if _blas is None:
        import numpy  # noqa: F401  (BLAS is loaded with numpy)

        _blas = _find_blas()
    return _blas


def workers() -> int:
    """Threads the kernels may use: Numba's current setting, or 1 where BLAS's threads cannot be limited."""
    if not _blas_fns():
        return 1
    return max(1, numba.get_num_threads())


@contextlib.contextmanager
def blas_single():
    """BLAS on one thread inside the block (the workers run their GEMMs side by side), as it was afterwards."""
    fns = _blas_fns()
    if not fns:
        yield
        return
    set_n, get_n = fns
    before = get_n()
    set_n(1)
    try:
        yield
    finally:
        set_n(before)


def run(fn, n: int) -> list:
    """fn(0), ..., fn(n - 1) on the worker threads (in this thread if n == 1), BLAS single-threaded meanwhile;
    returns the results in order. Exceptions propagate."""
    global _pool, _pool_size
    if n <= 1:
        return [fn(0)]
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sdgen-kernel")
            _pool_size = n
        pool = _pool
    with blas_single():
        futures = [pool.submit(fn, i) for i in range(1, n)]
        try:
            first = fn(0)  # the calling thread takes a share too
        finally:
            for f in futures:  # never leave with jobs still writing
                f.exception()
        return [first] + [f.result() for f in futures]
