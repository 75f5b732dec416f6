"""Checks sdgen.rng's 8-lane Box-Muller against the torch on this machine for every possible float uniform.

torch.randn turns blocks of 16 uniforms u = k / 2**24 into normals; this crafts generator states whose outputs are
chosen k, so that torch transforms (1) every u1 with u2 = 0 (the radius alone: cos 0 = 1, sin 0 = 0) and (2) every
u2 with the u1 whose radius is exactly 1.0 (cos and sin alone), and compares each float bit for bit with the
transform that sdgen picks for this CPU. About 10 s.

    python scripts/check_randn_exhaustive.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_rng import _torch_randn_from_outputs  # noqa: E402

from sdgen import rng  # noqa: E402

TOP = 1 << 24
RADIUS_ONE_U1 = 6601320  # u1 = 1 - k / 2**24 with sqrt(-2 log u1) == 1.0 in float32


def mismatches(u1: np.ndarray, u2: np.ndarray) -> tuple[int, int]:
    blocks = np.empty((TOP // 8, 16), np.uint64)
    blocks[:, :8] = u1.reshape(-1, 8)
    blocks[:, 8:] = u2.reshape(-1, 8)
    outputs = blocks.reshape(-1)
    outputs = np.concatenate([outputs, np.zeros((-outputs.size) % 608, np.uint64)])  # whole crafted states
    ref = _torch_randn_from_outputs(outputs)
    ours = (outputs & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
    path = rng.TorchGenerator(0)._path
    rng._BOX_MULLER[path](ours, 0, ours.size - 15)
    return int(np.count_nonzero(ours.view(np.uint32) != ref.view(np.uint32))), ours.size


def main() -> int:
    k = np.arange(TOP, dtype=np.uint64)
    print(f"torch capability {torch.backends.cpu.get_cpu_capability()}, sdgen's {rng.detect_cpu_capability()}")
    bad = 0
    for what, u1, u2 in (("every u1, u2 = 0 (radius)", k, np.zeros(TOP, np.uint64)),
                         ("every u2, radius 1 (cos, sin)", np.full(TOP, RADIUS_ONE_U1, np.uint64), k)):
        n_bad, n = mismatches(u1, u2)
        print(f"{what}: {n_bad} of {n} floats differ")
        bad += n_bad
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
