"""This machine's float32 multiply-add peak, and how near to it the linear products run.

    python scripts/fp32_peak.py --threads 2

The peak: each thread runs chains of a * x + b on independent float32 accumulators (enough of them to cover the
multiply-add latency), compiled by Numba with contraction to FMA; no memory traffic, so this is what the cores can
do at all, not what a real product reaches. Then SD's linear layer shapes (sdgen.kernels.linear_tiles from the
weights as they lie, the models' default; PyTorch's F.linear too where torch is installed), as GFLOP/s (multiply-adds
x 2 / time, best of --repeat) and as a fraction of that peak.

What it tells: a product at a fraction f of the peak can get at most 1 / f times faster on this CPU in float32. If
PyTorch runs a shape at fraction f_t, sdgen's time on it is at least f_t of PyTorch's, whatever its kernel does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange
from profile_split import best_of  # scripts/ is on the path when this runs as a script

SHAPES = (  # (rows M, inputs K, outputs N): SD 1.5's feed-forward and projections, SDXL's 256-token layers
    (8192, 320, 2560),
    (8192, 1280, 320),
    (2048, 640, 5120),
    (256, 1280, 10240),
    (256, 5120, 1280),
)
CHAINS = 256  # accumulators per thread: 16 AVX-512 (32 AVX2) vectors, more than the FMA latency x throughput


@njit(parallel=True, fastmath={"contract"}, cache=True)  # FMA, no reassociation (which could fold steps)
def _fma_chains(threads: int, steps: int) -> np.ndarray:
    out = np.zeros(threads * CHAINS, dtype=np.float32)
    for t in prange(threads):
        acc = np.zeros(CHAINS, dtype=np.float32)
        for _ in range(steps):
            for j in range(CHAINS):
                acc[j] = acc[j] * np.float32(0.9999999) + np.float32(1e-7)
        out[t * CHAINS:(t + 1) * CHAINS] = acc
    return out


def fma_peak(threads: int, seconds: float = 0.5, repeat: int = 5) -> float:
    """GFLOP/s of `threads` threads doing nothing but float32 multiply-adds (best of repeat runs)."""
    _fma_chains(threads, 10)  # compile (or load from the cache)
    steps = 1 << 16
    while True:  # size a run to about `seconds`
        t0 = time.perf_counter()
        _fma_chains(threads, steps)
        dt = time.perf_counter() - t0
        if dt > seconds / 4:
            break
        steps *= 4
    steps = max(1, int(steps * seconds / dt))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _fma_chains(threads, steps)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * threads * CHAINS * steps / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from sdgen.kernels import linear_tiles
    from sdgen.kernels.panels import AVAILABLE
    from sdgen.memory import fresh_memory_settings
    from sdgen.threads import set_threads

    # as the sdgen command does: freed blocks reused, not fresh pages at each call (without, each call's output,
    # 84 MB for 8192 x 2560, was new memory whose first touch cost a fifth to a quarter of the product's
    # time, on both sides)
    fresh_memory_settings()
    set_threads(args.threads)
    peak = fma_peak(args.threads)
    print(f"threads {args.threads}: float32 multiply-add peak {peak:.0f} GFLOP/s")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
    head = f"{'M':>6} {'K':>6} {'N':>6}  {'sdgen GFLOP/s':>14} {'of peak':>8}"
    print(head + (f"  {'torch GFLOP/s':>14} {'of peak':>8}" if torch is not None else ""))
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32)
        flop = 2.0 * m * k * n
        if AVAILABLE:
            ours = flop / best_of(lambda: linear_tiles.linear(x, None, None, weight=w), args.repeat) / 1e9
        else:  # no AVX-512 registers for the tiles: the models multiply by BLAS
            ours = flop / best_of(lambda: x @ w.T, args.repeat) / 1e9
        line = f"{m:>6} {k:>6} {n:>6}  {ours:>14.0f} {ours / peak:>8.2f}"
        if torch is not None:
            tx, tw = torch.from_numpy(x), torch.from_numpy(w)
            with torch.no_grad():
                theirs = flop / best_of(lambda: torch.nn.functional.linear(tx, tw), args.repeat) / 1e9
            line += f"  {theirs:>14.0f} {theirs / peak:>8.2f}"
        print(line)


if __name__ == "__main__":
    main()
