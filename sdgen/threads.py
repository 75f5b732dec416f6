"""One setting for the CPU threads of both Numba kernels and BLAS, so the two never oversubscribe the cores."""

from __future__ import annotations

import os

_limits = None


def set_threads(n: int | None = None) -> int:
    """Use n threads (None: all cores) for Numba's parallel loops and for BLAS; returns the number set."""
    global _limits
    import numba
    from threadpoolctl import threadpool_limits

    n = n or os.cpu_count() or 1
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _limits = threadpool_limits(limits=n, user_api="blas")
    return n
