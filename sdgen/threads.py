"""One thread setting for everything that computes: Numba's parallel loops and the BLAS under numpy.

set_threads(n) runs the kernels on n threads; None means all the cores this process may run on. Numba's parallel
loops get n threads. BLAS is set to ONE thread: every GEMM runs on the kernel workers (n threads, sdgen.kernels._pool),
each calling single-threaded BLAS on its share. BLAS's own threads are never used, because after each call they
spin, waiting for the next, for a while that outlasts the gap to the next kernel: measured on the SD1.5 UNet
(2 cores), OpenBLAS's idle thread burned ~10 s of CPU per 14 s forward, slowing the workers' attention ~1.8x.

BLAS is limited through threadpoolctl when it is installed; without it, through the OpenBLAS library that numpy
loaded (found in /proc/self/maps, its *_set_num_threads entry point called with ctypes).
"""

from __future__ import annotations

import ctypes
import os

_current: int | None = None
_limiter = None  # keeps threadpoolctl's limits object alive


def available_cores() -> int:
    """Cores this process may run on (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _openblas_libraries() -> list[str]:
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "openblas" in os.path.basename(parts[-1]).lower() and parts[-1] not in paths:
                    paths.append(parts[-1])
    except OSError:
        pass
    return paths


def _set_blas_threads_ctypes(n: int) -> bool:
    done = False
    for path in _openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn.restype = None
                fn(int(n))
                done = True
                break
    return done


def set_threads(n: int | None = None) -> int:
    """Use n threads (None: all available cores) for the kernels, BLAS single-threaded inside them; returns the
    number set (n, capped at Numba's pool size)."""
    global _current, _limiter
    import numba
    import numpy  # noqa: F401  (loads BLAS, so that it can be found and limited)

    if n is None:
        n = available_cores()
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)  # Numba's pool is sized at import (NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    try:
        import threadpoolctl
    except ImportError:
        _set_blas_threads_ctypes(1)
    else:
        _limiter = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    _current = n
    return n


def get_threads() -> int | None:
    """The last value set by set_threads (None if it was never called)."""
    return _current
