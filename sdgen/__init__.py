"""sdgen: Stable Diffusion on the CPU, numpy + Numba, matching diffusers."""

import os as _os

# Numba's parallel loops run on OpenMP threads, which by default spin for a while after each loop, waiting for the
# next. Between two of sdgen's loops come phases run on its own kernel workers (sdgen.kernels._pool), and a spinning
# OpenMP thread takes a core from them: measured on the SD1.5 UNet (2 cores), ~1.3 s of CPU per forward, ~0.5 s of
# wall time. Passive waiting (sleep at once) is set before Numba loads OpenMP, unless the user chose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
