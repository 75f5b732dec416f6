"""sdgen.kernel_compiles: Numba's compilations counted and timed; a first run says so, a later one does not."""

import json
import os
import subprocess
import sys
import time

import numpy as np
from numba import njit

from sdgen import kernel_compiles


def test_compilations_are_counted_and_timed_once_each():
    """A new function's first call compiles it (and the function it calls, inside its own compilation): two
    functions, their time counted once, within the call's wall time; the notice comes once; a second call, and a
    call of the cached signature, compile nothing."""
    assert kernel_compiles.watch()

    @njit(cache=False)
    def inner(x):
        return x * 2.0 + 1.0

    @njit(cache=False)
    def outer(a):
        s = 0.0
        for v in a:
            s += inner(v)
        return s

    notices = []
    kernel_compiles.watch(lambda: notices.append(time.perf_counter()))
    before = dict(kernel_compiles.TOTALS)
    t0 = time.perf_counter()
    assert outer(np.arange(4.0)) == 2.0 * 6.0 + 4.0
    wall = time.perf_counter() - t0
    seconds, functions = kernel_compiles.since(before)
    assert functions == 2, functions  # outer and inner
    assert 0.0 < seconds <= wall, (seconds, wall)
    assert len(notices) == 1 and t0 <= notices[0]
    again = dict(kernel_compiles.TOTALS)
    outer(np.arange(5.0))
    assert kernel_compiles.since(again) == (0.0, 0)
    outer(np.arange(3, dtype=np.int64))  # a new signature compiles outer's again (inner's for int64 too)
    assert kernel_compiles.since(again)[1] == 2
    assert len(notices) == 1  # the notice was for the first compilation only
    kernel_compiles.watch()


def test_first_run_reports_its_compile_time_and_later_runs_compile_nothing(tmp_path):
    """The toy model's txt2img with an empty Numba cache (as on a new machine): the notice and the compiled
    functions on stderr, compile_s in `sdgen bench --json`; run again: nothing compiled, nothing said, the same
    image. (The first run takes ~30 s on 2 cores: this is what every user's first run does.)"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    cmd = [sys.executable, "-m", "sdgen.cli", "txt2img", "-m", "toy", "-p", "a red circle", "--seed", "0",
           "--threads", "2"]

    def run(args):
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    first = run(cmd + ["--output", str(tmp_path / "a.png")])
    assert first.returncode == 0, first.stderr
    assert "compiling the kernels for this CPU" in first.stderr, first.stderr
    assert "kernel functions in" in first.stderr, first.stderr
    second = run(cmd + ["--output", str(tmp_path / "b.png")])
    assert second.returncode == 0 and "compil" not in second.stderr, second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    bench = run([sys.executable, "-m", "sdgen.cli", "bench", "-m", "toy", "--threads", "2", "--json"])
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert report["compile_s"] == 0.0 and report["compiled_kernels"] == 0, report
