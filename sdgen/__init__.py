"""sdgen: Stable Diffusion on the CPU, numpy + Numba, matching diffusers."""

__version__ = "0.1.0"
