"""How long Numba spends compiling sdgen's kernels in this process.

The kernels are compiled for the machine's CPU on their first use ever and written to Numba's cache (``cache=True``);
later runs load them from it (a few ms each). A first run (a new machine, a new sdgen or Numba) therefore spends
most of its time compiling -- 25-30 s for the toy model -- which the stages' timings would otherwise hide. `watch`
listens to Numba's "numba:compile" events, raised for each function compiled (a cache miss; loads from the cache
raise none), and adds up the wall time of the outermost ones (compiling a kernel compiles the functions it calls,
inside its own event) into TOTALS. Numba compiles under one global lock, so the events never interleave.
"""

from __future__ import annotations

import time

TOTALS = {"seconds": 0.0, "kernels": 0}  # this process's compilations since watch() was first called

_state: dict = {"listener": None, "notice": None}


def _make_listener():
    from numba.core import event

    class CompileListener(event.Listener):
        def __init__(self):
            self.depth = 0
            self.t0 = 0.0

        def on_start(self, ev):
            if self.depth == 0:
                self.t0 = time.perf_counter()
                notice, _state["notice"] = _state["notice"], None
                if notice is not None:
                    notice()
            self.depth += 1
            TOTALS["kernels"] += 1

        def on_end(self, ev):
            self.depth -= 1
            if self.depth == 0:
                TOTALS["seconds"] += time.perf_counter() - self.t0

    return CompileListener()


def watch(notice=None) -> bool:
    """Count Numba's compilations from now on in TOTALS (once per process; later calls only set the notice).
    notice: called once, when the next compilation starts (e.g. to tell the user why the first run is slow).
    False where this Numba raises no compile events (nothing is counted then)."""
    if _state["listener"] is None:
        try:
            from numba.core import event

            listener = _make_listener()
            event.register("numba:compile", listener)
        except (ImportError, AttributeError, ValueError):
            return False
        _state["listener"] = listener
    _state["notice"] = notice
    return True


def since(before: dict) -> tuple[float, int]:
    """(seconds, functions) compiled since TOTALS was `before` (a copy of it)."""
    return TOTALS["seconds"] - before["seconds"], TOTALS["kernels"] - before["kernels"]
