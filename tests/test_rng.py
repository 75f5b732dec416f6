"""sdgen.rng.TorchGenerator against the installed torch (2.13.0 CPU): every float must be bit-identical.

Run: ``python -m pytest tests/test_rng.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdgen.rng as rng  # noqa: E402
from sdgen.rng import TorchGenerator, detect_cpu_capability  # noqa: E402

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 + 12345, 2**64 - 1, -7, 1234567890123456789]
SHAPES = [1, 7, 15, 16, 17, 31, 100, 1000, (), (3, 5, 7), (1, 4, 8, 8), (1, 4, 64, 64), (2, 4, 96, 64),
          (1, 4, 128, 128)]
TORCH_CAPABILITY = torch.backends.cpu.get_cpu_capability().lower()


def _torch_gen(seed: int):
    return torch.Generator("cpu").manual_seed(seed)


def _assert_bits_equal(ours: np.ndarray, ref, what: str = "") -> None:
    ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
    assert ours.dtype == np.float32 and ref.dtype == np.float32, what
    assert ours.shape == ref.shape, what
    a, b = ours.reshape(-1).view(np.uint32), ref.reshape(-1).view(np.uint32)
    if not np.array_equal(a, b):
        bad = np.nonzero(a != b)[0]
        pytest.fail(f"{what}: {bad.size} of {a.size} floats differ, first at {bad[:5]}: "
                    f"ours {ours.reshape(-1)[bad[:5]]} torch {ref.reshape(-1)[bad[:5]]}")


def _torch_state(gen) -> tuple[np.ndarray, int, int]:
    """(MT words, next_, left_) from torch's CPU generator state (CPUGeneratorImplStateLegacy layout)."""
    raw = gen.get_state().numpy()
    left = int(raw[8:12].view(np.int32)[0])
    nxt = int(raw[16:24].view(np.uint64)[0])
    words = raw[24:24 + 624 * 8].view(np.uint64).astype(np.int64)
    return words, nxt, left


# ---------------------------------------------------------------------------------------------------------------
def test_capability_matches_torch():
    expected = TORCH_CAPABILITY if TORCH_CAPABILITY in ("avx2", "avx512") else "default"
    assert detect_cpu_capability() == expected
    assert TorchGenerator(0).capability == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_engine_state_matches_torch(seed):
    ours, ref = TorchGenerator(seed), _torch_gen(seed)
    words, _, _ = _torch_state(ref)
    assert np.array_equal(ours._mt, words)
    assert ours.initial_seed() == ref.initial_seed()
    ours.randn((1, 4, 8, 8))
    ours.rand(1001)
    torch.randn((1, 4, 8, 8), generator=ref)
    torch.rand(1001, generator=ref)
    words, nxt, left = _torch_state(ref)
    assert np.array_equal(ours._mt, words)
    assert ours._pos[0] == nxt and left == 625 - nxt  # next_state() sets left_ = 624 after the decrement


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_randn_matches_torch(seed, shape):
    ours, ref = TorchGenerator(seed), _torch_gen(seed)
    for call in range(2):  # the second call checks that the state continues like torch's
        _assert_bits_equal(ours.randn(shape), torch.randn(shape, generator=ref, dtype=torch.float32),
                           f"seed {seed} shape {shape} call {call}")


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_rand_matches_torch(seed):
    ours, ref = TorchGenerator(seed), _torch_gen(seed)
    for shape in [1, 15, 16, 1000, (2, 4, 8, 8)]:
        _assert_bits_equal(ours.rand(shape), torch.rand(shape, generator=ref), f"rand seed {seed} shape {shape}")


def test_mixed_sequence_matches_torch():
    """Small (cached-normal) and large (16-block) randn calls, rand and empty draws, in one stream."""
    calls = [("n", 3), ("n", (1, 4, 64, 64)), ("n", 1), ("n", 17), ("n", 5), ("u", 10), ("n", 1), ("n", 15),
             ("n", 0), ("n", (2, 0, 3)), ("n", 1000), ("n", 1), ("u", 3), ("n", 1), ("n", 2), ("n", 16), ("n", 9)]
    for seed in (42, 2**32 + 5):
        ours, ref = TorchGenerator(seed), _torch_gen(seed)
        for i, (kind, shape) in enumerate(calls):
            if kind == "n":
                _assert_bits_equal(ours.randn(shape), torch.randn(shape, generator=ref), f"call {i} randn {shape}")
            else:
                _assert_bits_equal(ours.rand(shape), torch.rand(shape, generator=ref), f"call {i} rand {shape}")


def test_random_sequences_match_torch():
    """A few hundred calls of random kind and size; sizes < 16 dominate to stress the normal cache."""
    pick = np.random.default_rng(1234)
    for seed in (0, 2**63 + 12345):
        ours, ref = TorchGenerator(seed), _torch_gen(seed)
        for i in range(300):
            r = pick.random()
            n = int(pick.integers(1, 16)) if r < 0.8 else int(pick.integers(16, 700))
            if pick.random() < 0.1:
                _assert_bits_equal(ours.rand(n), torch.rand(n, generator=ref), f"call {i} rand {n}")
            else:
                _assert_bits_equal(ours.randn(n), torch.randn(n, generator=ref), f"call {i} randn {n}")


def test_normal_cache_semantics():
    # One Box-Muller pair serves two consecutive single draws, across calls and across large calls.
    a = TorchGenerator(7)
    pair = TorchGenerator(7).randn(2)
    first = a.randn(1)
    a.randn(64)  # the 16-block path neither uses nor clears the cached sample ...
    a.rand(5)
    second = a.randn(1)  # ... so this is the cached sin-half of the first pair
    assert np.array_equal(np.concatenate([first, second]).view(np.uint32), pair.view(np.uint32))
    # manual_seed drops the cached sample (CPUGeneratorImpl::set_current_seed).
    a.randn(1)
    a.manual_seed(7)
    assert np.array_equal(a.randn(2).view(np.uint32), pair.view(np.uint32))


def test_seed_handling():
    assert np.array_equal(TorchGenerator(-1).randn(20), TorchGenerator(2**64 - 1).randn(20))
    assert TorchGenerator(-1).initial_seed() == 2**64 - 1
    assert TorchGenerator(np.int64(42)).randn(20).tobytes() == TorchGenerator(42).randn(20).tobytes()
    with pytest.raises(ValueError):
        TorchGenerator(2**64)
    with pytest.raises(ValueError):
        TorchGenerator(-(2**63) - 1)
    with pytest.raises(TypeError):
        TorchGenerator(1.5)
    with pytest.raises(ValueError):
        TorchGenerator(0, capability="sse9")
    g = TorchGenerator(3)
    g.randn(5)
    c = g.clone()
    assert np.array_equal(g.randn(33), c.randn(33)) and np.array_equal(g.randn(3), c.randn(3))


# ---------------------------------------------------------------------------------------------------------------
# The Box-Muller block on chosen uniforms, including the extremes, through crafted engine states.
def _untemper(y: np.ndarray) -> np.ndarray:
    """Inverse of the MT19937 output tempering (so that a crafted state word yields a chosen output)."""
    y = y.astype(np.uint64) & 0xFFFFFFFF
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    x = y.copy()
    for _ in range(5):
        x = y ^ ((x << 7) & 0x9D2C5680)
    y = x & 0xFFFFFFFF
    x = y.copy()
    for _ in range(3):
        x = y ^ (x >> 11)
    return x & 0xFFFFFFFF


def _torch_randn_from_outputs(outputs: np.ndarray) -> np.ndarray:
    """torch.randn over blocks whose engine outputs are exactly ``outputs`` (608 per crafted state, no twist)."""
    per = 608
    gen = _torch_gen(0)
    state = gen.get_state().numpy().copy()
    state[8:12] = np.frombuffer(np.int32(624).tobytes(), np.uint8)  # left_ = 624: no twist for 623 draws
    state[16:24] = 0  # next_ = 0
    words = state[24:24 + 624 * 8].view(np.uint64)
    untempered = _untemper(outputs)
    res = np.empty(outputs.size, np.float32)
    for c in range(outputs.size // per):
        words[:per] = untempered[c * per:(c + 1) * per]
        gen.set_state(torch.from_numpy(state))
        res[c * per:(c + 1) * per] = torch.randn(per, generator=gen).numpy()
    return res


def test_box_muller_on_extreme_and_sampled_uniforms():
    pick = np.random.default_rng(5)
    top = 1 << 24
    # u = k / 2**24: 0 and 1 - 2**-24 are the ends (u1 = 1 - u gives log(1) = 0 and the largest radius); the
    # quarter points are where sincos256_ps switches octant; 6601320 / 14506667 give radius 1.0 / 2.0.
    edges = np.array([0, 1, 2, 3, top - 1, top - 2, top // 2, top // 2 - 1, top // 2 + 1, top // 4, top // 4 + 1,
                      3 * top // 4, 3 * top // 4 - 1, top // 8, 6601320, 14506667], dtype=np.uint64)
    n_lanes = 8 * 608 * 4  # 2 draws per lane: 64 crafted states of 608 draws
    u1 = np.concatenate([edges, pick.integers(0, top, n_lanes - edges.size).astype(np.uint64)])
    u2 = np.concatenate([edges[::-1], pick.integers(0, top, n_lanes - edges.size).astype(np.uint64)])
    u1[-edges.size:] = edges  # every edge u1 also meets every other kind of u2 ...
    u2[edges.size:2 * edges.size] = edges  # ... and vice versa
    upper = pick.integers(0, 256, 2 * n_lanes).astype(np.uint64) << 24  # bits that the uniform discards
    blocks = np.empty((n_lanes // 8, 16), np.uint64)
    blocks[:, :8] = u1.reshape(-1, 8)
    blocks[:, 8:] = u2.reshape(-1, 8)
    outputs = blocks.reshape(-1) | upper
    ref = _torch_randn_from_outputs(outputs)
    d = (outputs & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
    rng._BOX_MULLER[TorchGenerator(0)._path](d, 0, d.size - 15)
    _assert_bits_equal(d, ref, "crafted uniforms")


def test_fma_contraction_matters():
    """Without the FMA contraction GCC applies inside avx_mathfun.h, about 1% of the floats are 1-2 ulp off."""
    if TORCH_CAPABILITY not in ("avx2", "avx512"):
        pytest.skip("torch does not use the AVX2 path here")
    ref = torch.randn(1 << 16, generator=_torch_gen(9)).numpy()
    plain = TorchGenerator(9, capability="avx2-nofma").randn(1 << 16)
    ulps = np.abs(plain.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert 0 < np.count_nonzero(ulps) < ref.size // 20 and ulps.max() <= 4


def test_default_capability_path_matches_torch(tmp_path):
    """The libm path, against torch forced to the DEFAULT capability (what non-x86 CPUs also use)."""
    out = tmp_path / "ref.npz"
    code = textwrap.dedent(f"""
        import numpy as np, torch
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
        res = {{}}
        for seed in (0, 42, 2**32 + 5):
            g = torch.Generator().manual_seed(seed)
            res[f"a{{seed}}"] = torch.randn((1, 4, 64, 64), generator=g).numpy()
            res[f"b{{seed}}"] = torch.randn(1001, generator=g).numpy()
            res[f"c{{seed}}"] = torch.randn(5, generator=g).numpy()
        np.savez({str(out)!r}, **res)
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"torch could not be run with ATEN_CPU_CAPABILITY=default: {proc.stderr[-300:]}")
    ref = np.load(out)
    for seed in (0, 42, 2**32 + 5):
        ours = TorchGenerator(seed, capability="default")
        _assert_bits_equal(ours.randn((1, 4, 64, 64)), ref[f"a{seed}"], f"default seed {seed} latents")
        _assert_bits_equal(ours.randn(1001), ref[f"b{seed}"], f"default seed {seed} 1001")
        _assert_bits_equal(ours.randn(5), ref[f"c{seed}"], f"default seed {seed} 5")


