"""The fast kernels (sdgen.kernels) against their plain numpy twins (sdgen.kernels.reference), run in float64.

Error measure: relative error in the Frobenius norm, |y - ref| / |ref|, against the float64 twin. Every kernel is
held to 1e-5. Winograd F(4x4,3x3) is the loosest (its transforms multiply by up to 8 and divide by 24, so rounding
grows with the tile): measured here at about 1e-6 to 2e-6 for these sizes (about 4e-6 at Cin=1280), so 1e-5 holds
for it too.

Shapes are small and awkward (odd sizes, channel counts that are not multiples of the 64-channel blocks) so the
file stays fast; most of its time is the first compilation of the Numba kernels (cached afterwards).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdgen import kernels as K
from sdgen.kernels import reference as R
from sdgen.kernels import panels, winograd
from sdgen.kernels.conv import Conv2dPlan, choose_variant, conv2d
from sdgen.kernels.gemm import conv_im2col, conv_kn2row

TOL = 1e-5


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-300))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


# ------------------------------------------------------------------------------------------------ Winograd maths


@pytest.mark.parametrize("name, nin, nout", [("_b8", 8, 8), ("_b6", 6, 6), ("_b5", 5, 5), ("_b4", 4, 4),
                                             ("_a8", 8, 6), ("_a6", 6, 4), ("_a5", 5, 4), ("_a4", 4, 2)])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 64, 70])
def test_channel_passes_match_the_scalar_formulas(rng, name, nin, nout, n):
    """channel_passes.make_pass (vectors of 16 channels, then one at a time) gives, bit for bit, the numbers of the
    Winograd 1-D transform's scalar formula evaluated in float32 by numpy, from rows at an offset and a stride into
    rows at another; nothing else written."""
    from numba import njit

    from sdgen.kernels.channel_passes import make_pass

    fn = getattr(winograd, name).py_func
    vpass = make_pass(fn, nin, nout)

    @njit
    def run(src, s_off, s_ld, dst, d_off, d_ld, n):
        vpass(src, s_off, s_ld, dst, d_off, d_ld, n)

    s_ld, d_ld = n + 5, n + 3
    src = rng.standard_normal((nin + 1) * s_ld, dtype=np.float32).reshape(nin + 1, s_ld)
    dst = np.full((nout + 1) * d_ld, 7.0, dtype=np.float32)
    run(src, s_ld + 2, s_ld, dst, 1, d_ld, n)  # rows 1.. of src from column 2; rows of dst from element 1
    with np.errstate(all="ignore"):
        want = fn(*(src[1 + j, 2:2 + n] for j in range(nin)))
    got = dst[1:1 + nout * d_ld].reshape(nout, d_ld)
    for i in range(nout):
        assert np.array_equal(got[i, :n], np.asarray(want[i], dtype=np.float32))
        assert (got[i, n:] == 7).all()
    assert dst[0] == 7 and (dst[1 + nout * d_ld:] == 7).all()


@pytest.mark.parametrize("m", [2, 4, 6])
def test_winograd_matrices_compute_correlation(m):
    """A^T [(G g) * (B^T d)] is the valid 1-D correlation of d (m + 2 values) with g (3 taps), exactly."""
    bt, g, at = winograd.matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d = rng.standard_normal(m + 2)
        taps = rng.standard_normal(3)
        want = np.array([d[i : i + 3] @ taps for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ convolution

CONV_CASES = [  # n, h, w, cin, cout
    (1, 7, 9, 3, 5),
    (3, 13, 5, 33, 17),
    (1, 1, 1, 8, 8),
    (2, 6, 10, 70, 65),
]


@pytest.mark.parametrize("variant", ["f63", "f43", "f23", "im2col", "kn2row"])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv3x3_stride1_variants(rng, variant, case, padding, with_residual):
    n, h, w, cin, cout = case
    if padding == 0 and (h < 3 or w < 3):
        pytest.skip("input smaller than the kernel")
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=padding)
    res = rng.standard_normal(ref.shape, dtype=np.float32) if with_residual else None
    if res is not None:
        ref = ref + res
    y = conv2d(x, Conv2dPlan(wt, b, 1, padding, variant=variant), residual=res)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("variant", ["f63", "f43", "f23", "im2col", "kn2row", None])
@pytest.mark.parametrize("silu", [False, True])
def test_conv_applies_group_norm_as_it_reads(rng, variant, silu):
    """conv2d(x, pre=GroupNorm's statistics of x) convolves the normalized x (then SiLU): bit-identical to
    normalizing first, on every path (the Winograd ones apply it in their input transform: padding stays zero),
    batch 3, odd sizes, channels over one block (70: 64 + 6); and against float64 GroupNorm then convolution."""
    x = rng.standard_normal((3, 13, 9, 70), dtype=np.float32) * 2 + 0.5
    wt = rng.standard_normal((17, 70, 3, 3), dtype=np.float32)
    b = rng.standard_normal(17, dtype=np.float32)
    gamma, beta = rng.standard_normal(70, dtype=np.float32), rng.standard_normal(70, dtype=np.float32)
    norm = K.group_norm_stats(x, 10, gamma, beta, 1e-5, silu=silu)
    res = rng.standard_normal((3, 13, 9, 17), dtype=np.float32)
    plan = Conv2dPlan(wt, b, 1, 1, variant=variant, cache=variant is not None)
    y = conv2d(x, plan, residual=res, pre=norm)
    assert np.array_equal(y, conv2d(K.normalize(x, norm), plan, residual=res))
    assert np.array_equal(K.normalize(x, norm), K.group_norm(x, 10, gamma, beta, 1e-5, silu=silu))
    ref = R.conv2d(R.group_norm(x.astype(np.float64), 10, gamma, beta, 1e-5, silu=silu), *f64(wt, b), stride=1,
                   padding=1) + res
    assert rel_err(y, ref) < TOL
    with pytest.raises(ValueError):  # the statistics of another map (the transforms read them unchecked)
        conv2d(x[:2], plan, pre=norm)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("nworkers", [1, 2])
def test_winograd_blocks_and_streamed_apply_group_norm(rng, m, nworkers):
    """The filters made a block at a time (winograd_conv_blocks: one block of tiles shared by the workers) and whole
    in groups of output channels (winograd_conv_streamed, the input transformed again per group) apply pre as the
    tiles read x: bit-identical to normalizing first."""
    from sdgen.kernels.weights import oihw_blocks

    x = rng.standard_normal((2, 7, 11, 130), dtype=np.float32)
    wt = (rng.standard_normal((136, 130, 3, 3)) / math.sqrt(9 * 130)).astype(np.float32)
    b = rng.standard_normal(136, dtype=np.float32)
    norm = K.group_norm_stats(x, 2, np.ones(130, np.float32), np.zeros(130, np.float32), 1e-6, silu=True)
    xn = K.normalize(x, norm)
    src = winograd.FilterSource(None, m, oihw_blocks(wt, 64), 136)
    want = winograd.winograd_conv_blocks(xn, src, m, 1, b, 136, nworkers=nworkers)
    assert np.array_equal(winograd.winograd_conv_blocks(x, src, m, 1, b, 136, nworkers=nworkers, pre=norm), want)
    whole = winograd.FilterSource(wt.transpose(2, 3, 1, 0).copy(), m)
    old = winograd.STREAM_FILTER_BYTES
    try:
        winograd.STREAM_FILTER_BYTES = (m + 2) ** 2 * 192 * 64 * 4  # groups of 64 output channels
        want = winograd.winograd_conv_streamed(xn, whole, m, 1, b, 136, nworkers=nworkers)
        got = winograd.winograd_conv_streamed(x, whole, m, 1, b, 136, nworkers=nworkers, pre=norm)
    finally:
        winograd.STREAM_FILTER_BYTES = old
    assert np.array_equal(got, want)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_winograd_in_blocks_of_tiles(rng, m):
    """Several tile blocks (and a last, partial one) give the same result as one block."""
    x = rng.standard_normal((3, 11, 13, 20), dtype=np.float32)
    wt = rng.standard_normal((24, 20, 3, 3), dtype=np.float32)
    b = rng.standard_normal(24, dtype=np.float32)
    res = rng.standard_normal((3, 11, 13, 24), dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=1) + res
    u = winograd.filter_transform(wt, m)
    for block in (1, 7, 1000):
        y = winograd.winograd_conv(x, u, m, 1, b, 24, res, block_tiles=block)
        assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("nworkers", [1, 2, 3])
@pytest.mark.parametrize("block", [None, 5])
def test_winograd_worker_splits(rng, m, nworkers, block):
    """Whole blocks per worker (block=5: several blocks), or one block split by tiles then by output channels
    (block=None; Cout=130 gives 3 channel blocks of 64 for up to 3 workers)."""
    x = rng.standard_normal((2, 9, 7, 20), dtype=np.float32)
    wt = rng.standard_normal((130, 20, 3, 3), dtype=np.float32)
    b = rng.standard_normal(130, dtype=np.float32)
    res = rng.standard_normal((2, 9, 7, 130), dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=1) + res
    y = winograd.winograd_conv(x, winograd.filter_transform(wt, m), m, 1, b, 130, res, block_tiles=block,
                               nworkers=nworkers)
    assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("nworkers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_winograd_filters_made_by_blocks(rng, m, nworkers, dtype):
    """Filters made from weights stored in blocks of 64 output channels, a block at a time right before its
    product (Cin 130: padding rows; Cout 136: 3 blocks, the last one partly padding, shared by 1-3 workers)."""
    from sdgen.kernels.weights import oihw_blocks, to_storage, widen

    x = rng.standard_normal((3, 7, 9, 130), dtype=np.float32)
    wt = (rng.standard_normal((136, 130, 3, 3)) / math.sqrt(9 * 130)).astype(np.float32)
    stored = to_storage(wt, dtype)
    b = rng.standard_normal(136, dtype=np.float32)
    res = rng.standard_normal((3, 7, 9, 136), dtype=np.float32)
    ref = R.conv2d(*f64(x, widen(stored), b), stride=1, padding=1) + res
    src = winograd.FilterSource(None, m, oihw_blocks(stored, 64), 136)
    y = winograd.winograd_conv_blocks(x, src, m, 1, b, 136, res, nworkers=nworkers)
    assert rel_err(y, ref) < TOL


@pytest.mark.parametrize("m", [2, 4, 6])
def test_block_filters_by_rows_of_the_tile(rng, m):
    """gvec's filters (all of a step's 16 filters in registers), made for groups of the tile's rows into a buffer
    whose points lie further apart than their matrices (filter_block_buffer), are filter_transform's bit for bit
    (the same operations in the same order; the groups winograd_conv_blocks makes, whose steps are compiled for
    their rows, and others), with the channel padding rows zero (Cin 70 -> 128), laid out as rows
    or in panels of 32 columns (their panels and points further apart than their matrices); and they are within
    float32 rounding of G g G^T in float64. A block too narrow for gvec's 16-wide steps (8 channels of 3 inputs: 24
    filters) takes the two-pass transform (by rows: made whole, then copied), with the same numbers."""
    from sdgen.kernels.weights import block_outputs, fill_block_filters, filter_block_buffer, hwio

    a = m + 2
    g64 = winograd.matrices(m)[1]
    for cout, cin, ob in ((100, 70, 64), (8, 3, 8)):
        wt = (rng.standard_normal((cout, cin, 3, 3)) / math.sqrt(9 * cin)).astype(np.float32)
        kept = winograd.filter_transform(wt, m)  # (alpha^2, Cin', Cout')
        cinp = kept.shape[1]
        exact = np.einsum("pk,ockl,ql->pqco", g64, wt.astype(np.float64), g64).reshape(a * a, cin, cout)
        blocks = block_outputs(hwio(wt), ob)
        for j in range(blocks.shape[0]):
            whole = np.full((a * a, cinp, ob), np.nan, dtype=np.float32)
            fill_block_filters(blocks[j], m, whole)
            assert np.array_equal(whole, kept[:, :, j * ob:(j + 1) * ob])
            for groups in (((0, 1), (1, a - 2), (a - 2, a)), winograd.BLOCK_ROW_GROUPS[m]):
                made = np.full_like(whole, np.nan)
                for r0, r1 in groups:
                    u = filter_block_buffer((r1 - r0) * a, cinp, ob)
                    u[...] = np.nan
                    fill_block_filters(blocks[j], m, u, rows=(r0, r1))
                    made[r0 * a:r1 * a] = u
                assert np.array_equal(made, whole)
            if ob % 32 == 0:  # in panels of 32 output columns (as winograd_conv_blocks makes them): the same numbers
                for r0, r1 in ((0, 1), (1, a - 2), (a - 2, a)) + winograd.BLOCK_ROW_GROUPS[m]:
                    u = filter_block_buffer((r1 - r0) * a, cinp, ob, panels=True)
                    u[...] = np.nan
                    fill_block_filters(blocks[j], m, u, rows=(r0, r1))
                    assert u.shape == ((r1 - r0) * a, ob // 32, cinp, 32)
                    assert np.array_equal(u.transpose(0, 2, 1, 3).reshape(-1, cinp, ob), whole[r0 * a:r1 * a])
            real = min(cout, (j + 1) * ob) - j * ob
            assert not made[:, cin:].any()
            assert rel_err(made[:, :cin, :real], exact[:, :, j * ob:j * ob + real]) < 1e-6


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_winograd_filters_made_from_stored_weights(rng, m, dtype):
    """Filters made at each call from weights stored HWIO (float32, float16, bfloat16 bits) are filter_transform's
    of the widened weights, bit for bit (Cin 70, Cout 37: channel padding), and the convolution with them matches
    float64."""
    from sdgen.kernels.weights import hwio, to_storage, widen

    wt = (rng.standard_normal((37, 70, 3, 3)) / math.sqrt(9 * 70)).astype(np.float32)
    stored = to_storage(wt, dtype)
    full = widen(stored)
    kept = winograd.filter_transform(full, m)
    made = np.full_like(kept, np.nan)
    winograd.FilterSource(hwio(stored), m).fill(made, 0, kept.shape[2])
    assert np.array_equal(made, kept)
    x = rng.standard_normal((2, 13, 11, 70), dtype=np.float32)
    b = rng.standard_normal(37, dtype=np.float32)
    y = winograd.winograd_conv(x, winograd.FilterSource(hwio(stored), m), m, 1, b, 37)
    assert rel_err(y, R.conv2d(*f64(x, full, b), stride=1, padding=1)) < TOL


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_winograd_filters_in_panels(rng, monkeypatch, m, dtype):
    """Filters made in panels of PANEL output columns (winograd.filter_buffer: each point's panels contiguous, the
    points further apart) are filter_transform's bit for bit, whole (Cout 100 -> 128: the last panel partly
    padding, zero; from HWIO weights or from blocks of output channels) or from a group's first column on; the
    products and the convolution from them are those from filters as rows, bit for bit with the register tiles,
    whatever the workers, and within rounding by BLAS."""
    from sdgen.kernels.weights import hwio, oihw_blocks, release_scratch, to_storage, widen

    a2, P = (m + 2) ** 2, panels.PANEL
    wt = (rng.standard_normal((100, 70, 3, 3)) / math.sqrt(9 * 70)).astype(np.float32)
    stored = to_storage(wt, dtype)
    kept = winograd.filter_transform(widen(stored), m)  # rows: (alpha^2, 128, 128)
    as_rows = lambda u: u.transpose(0, 2, 1, 3).reshape(a2, u.shape[2], -1)  # noqa: E731
    monkeypatch.setattr(winograd, "packs_filters", lambda cols: cols % P == 0)  # panels whatever the CPU
    u = winograd.filter_buffer(a2, 128, 128)
    assert u.shape == (a2, 128 // P, 128, P) and not u.flags.c_contiguous  # points POINT_GAP apart
    group = winograd.filter_buffer(a2, 128, 64, slot="test-group")  # not u's shared "winograd" buffer
    # from HWIO weights panel by panel, or from blocks of 64 output channels
    for src in (winograd.FilterSource(hwio(stored), m), winograd.FilterSource(None, m, oihw_blocks(stored, 64), 100)):
        u[...] = np.nan
        src.fill(u, 0, 128)
        assert np.array_equal(as_rows(u), kept)
        group[...] = np.nan
        src.fill(group, 64, 128)
        assert np.array_equal(as_rows(group), kept[:, :, 64:])
    v = rng.standard_normal((a2, 40, 128), dtype=np.float32)
    x = rng.standard_normal((2, 13, 11, 70), dtype=np.float32)
    b = rng.standard_normal(100, dtype=np.float32)
    for available in (panels.AVAILABLE, False):
        monkeypatch.setattr(panels, "AVAILABLE", available)
        mm, want = (np.zeros((a2, 40, 128), dtype=np.float32) for _ in range(2))
        winograd.point_products(v[:, :37], u, mm[:, :37])
        winograd.point_products(v[:, :37], kept, want[:, :37])
        assert np.array_equal(mm, want) if available else rel_err(mm, want) < 1e-6
        for nworkers, block in ((1, None), (2, None), (3, None), (2, 5)):
            y = winograd.winograd_conv(x, u, m, 1, b, 100, block_tiles=block, nworkers=nworkers)
            ref = winograd.winograd_conv(x, kept, m, 1, b, 100, block_tiles=block, nworkers=nworkers)
            assert np.array_equal(y, ref) if available else rel_err(y, ref) < 1e-6
    release_scratch()  # the test's own slot


def test_variant_choice_without_cache(rng):
    """A plan without cache takes F(4,3) whatever the filters' size, F(2,3) with few F(4,3) tiles, and im2col on
    small maps unless its weights are stored in blocks (which make no (9 Cin, Cout) matrix)."""
    assert choose_variant(1280, 1280, 16, 16, 2, cache=False) == "f43"
    assert choose_variant(1280, 1280, 8, 8, 2, cache=False) == "f23"  # 8 F(4,3) tiles: too few
    assert Conv2dPlan(np.zeros((64, 64, 3, 3), np.float32), None, 1, 1, cache=False).variant_for(8, 8, 2) == "im2col"


def test_kept_filters_are_the_made_ones(rng):
    """keep_filters (--conv-filters keep): a blocked layer (640 channels) on maps of 8x8 to 32x32 takes F(4,3) with
    filters made at its first call and kept (36 x 640 x 640 floats), the numbers of F(4,3) with the filters made at
    each call bit for bit (the same filters, the same sums); on larger maps it makes them at each call, as without."""
    w = (rng.standard_normal((640, 640, 3, 3)) * 0.02).astype(np.float32)
    b = rng.standard_normal(640).astype(np.float32)
    keep = Conv2dPlan(w, b, 1, 1, cache=False, keep_filters=True)
    made = Conv2dPlan(w, b, 1, 1, cache=False, variant="f43")
    default = Conv2dPlan(w, b, 1, 1, cache=False)
    assert keep.blocks is not None and keep.keep_filters
    x = rng.standard_normal((2, 8, 8, 640)).astype(np.float32)
    assert default.variant_for(8, 8, 2) == "f23" and keep.variant_for(8, 8, 2) == "f43"
    y = conv2d(x, keep)
    assert np.array_equal(y, conv2d(x, made))
    kept = keep._prepared["f43"]
    assert keep.prepared_bytes() == 36 * 640 * 640 * 4
    assert np.array_equal(conv2d(x, keep), y) and keep._prepared["f43"] is kept  # made once
    big = rng.standard_normal((1, 40, 40, 640)).astype(np.float32)  # over KEEP_MAX_PIXELS: made at each call
    assert not keep.keeps(40, 40) and np.array_equal(conv2d(big, keep), conv2d(big, default))
    assert keep.prepared_bytes() == 36 * 640 * 640 * 4
    small = Conv2dPlan(w[:320, :320], b[:320], 1, 1, cache=False, keep_filters=True)  # not blocked: nothing kept
    assert not small.keep_filters and not small.keeps(8, 8)


@pytest.mark.parametrize("variant", ["f43", "f63"])
def test_winograd_error_against_float64_with_many_channels(rng, variant):
    """F(4,3) and F(6,3) on SD-like data (Cin 640, weights scaled as in a trained net) stay within tolerance of
    float64 (F(6,3) was measured at ~2x F(4,3)'s error: 4.5e-6 against 2.3e-6 relative with 256 channels)."""
    x = rng.standard_normal((1, 12, 12, 640), dtype=np.float32)
    wt = (rng.standard_normal((16, 640, 3, 3)) / math.sqrt(9 * 640)).astype(np.float32)
    b = rng.standard_normal(16, dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=1)
    y = conv2d(x, Conv2dPlan(wt, b, 1, 1, variant=variant))
    assert rel_err(y, ref) < TOL


def test_variant_choice_f63_without_cache():
    """Filters made at each call take F(6,3) on large maps whose filters fit the shared buffer and are no larger
    than the tiles (conv.f63_pays), F(4,3) otherwise."""
    assert choose_variant(320, 320, 64, 64, 2, cache=False) == "f63"  # filters 26 MB, tiles 40 MB
    assert choose_variant(320, 320, 64, 64, 1, cache=False) == "f43"  # tiles 20 MB
    assert choose_variant(128, 128, 512, 512, 1, cache=False) == "f63"
    assert choose_variant(512, 512, 128, 128, 1, cache=False) == "f63"  # filters 67 MB, tiles 127 MB
    assert choose_variant(512, 512, 64, 64, 1, cache=False) == "f43"  # tiles 32 MB
    assert choose_variant(640, 640, 64, 64, 2, cache=False) == "f43"  # filters 105 MB: over the shared buffer
    assert choose_variant(640, 640, 32, 32, 2, cache=False) == "f43"  # a small map
    assert choose_variant(320, 320, 64, 64, 2) == "f43"  # kept filters stay F(4,3)


def test_conv_without_bias(rng):
    x = rng.standard_normal((2, 9, 7, 12), dtype=np.float32)
    wt = rng.standard_normal((10, 12, 3, 3), dtype=np.float32)
    ref = R.conv2d(*f64(x, wt), None, stride=1, padding=1)
    for v in ("f63", "f43", "f23", "im2col"):
        assert rel_err(conv2d(x, Conv2dPlan(wt, None, 1, 1, variant=v)), ref) < TOL


@pytest.mark.parametrize("case", [(1, 7, 9, 3, 5), (3, 13, 5, 33, 17), (2, 8, 8, 16, 24)])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv3x3_stride2(rng, case, padding, with_residual):
    n, h, w, cin, cout = case
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=2, padding=padding)
    res = rng.standard_normal(ref.shape, dtype=np.float32) if with_residual else None
    if res is not None:
        ref = ref + res
    plan = Conv2dPlan(wt, b, 2, padding)
    assert plan.variant_for(h, w, n) == "im2col"
    assert rel_err(conv2d(x, plan, residual=res), ref) < TOL


def test_conv_stride2_asymmetric_padding_by_caller(rng):
    """VAE encoder downsampler: pad (0, 1, 0, 1) by the caller, then 3x3 stride 2 with padding 0."""
    x = rng.standard_normal((1, 10, 12, 7), dtype=np.float32)
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    wt = rng.standard_normal((9, 7, 3, 3), dtype=np.float32)
    b = rng.standard_normal(9, dtype=np.float32)
    y = conv2d(xp, Conv2dPlan(wt, b, stride=2, padding=0))
    assert y.shape == (1, 5, 6, 9)
    assert rel_err(y, R.conv2d(*f64(xp, wt, b), stride=2, padding=0)) < TOL


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv1x1(rng, n, with_bias, with_residual):
    x = rng.standard_normal((n, 7, 9, 33), dtype=np.float32)
    wt = rng.standard_normal((5, 33, 1, 1), dtype=np.float32)
    b = rng.standard_normal(5, dtype=np.float32) if with_bias else None
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=0)
    res = rng.standard_normal(ref.shape, dtype=np.float32) if with_residual else None
    if res is not None:
        ref = ref + res
    plan = Conv2dPlan(wt, b)
    assert plan.variant_for(7, 9, n) == "gemm1x1"
    assert rel_err(conv2d(x, plan, residual=res), ref) < TOL


def test_conv_other_kernel_sizes_fall_back_to_im2col(rng):
    x = rng.standard_normal((2, 11, 8, 6), dtype=np.float32)
    for kk, stride, pad in [(5, 1, 2), (1, 2, 0), (4, 3, 1)]:
        wt = rng.standard_normal((4, 6, kk, kk), dtype=np.float32)
        b = rng.standard_normal(4, dtype=np.float32)
        y = conv2d(x, Conv2dPlan(wt, b, stride, pad))
        assert rel_err(y, R.conv2d(*f64(x, wt, b), stride=stride, padding=pad)) < TOL


def test_im2col_in_row_blocks(rng):
    x = rng.standard_normal((2, 9, 11, 5), dtype=np.float32)
    wt = rng.standard_normal((6, 5, 3, 3), dtype=np.float32)
    b = rng.standard_normal(6, dtype=np.float32)
    res = rng.standard_normal((2, 5, 6, 6), dtype=np.float32)
    wmat = np.ascontiguousarray(wt.transpose(2, 3, 1, 0).reshape(-1, 6))
    y = conv_im2col(x, wmat, 3, 3, 2, 1, b, res, budget_bytes=1, min_rows=7)
    assert rel_err(y, R.conv2d(*f64(x, wt, b), stride=2, padding=1) + res) < TOL


@pytest.mark.parametrize("nworkers", [1, 2, 3])
@pytest.mark.parametrize("min_rows", [7, 10_000])
def test_im2col_worker_splits(rng, nworkers, min_rows):
    """Whole row blocks per worker (min_rows=7), or one block split by rows then by output columns."""
    x = rng.standard_normal((2, 9, 11, 5), dtype=np.float32)
    wt = rng.standard_normal((40, 5, 3, 3), dtype=np.float32)
    b = rng.standard_normal(40, dtype=np.float32)
    res = rng.standard_normal((2, 5, 6, 40), dtype=np.float32)
    wmat = np.ascontiguousarray(wt.transpose(2, 3, 1, 0).reshape(-1, 40))
    y = conv_im2col(x, wmat, 3, 3, 2, 1, b, res, budget_bytes=1, min_rows=min_rows, nworkers=nworkers)
    assert rel_err(y, R.conv2d(*f64(x, wt, b), stride=2, padding=1) + res) < TOL


@pytest.mark.parametrize("kk,pad", [(3, 1), (3, 0), (5, 2), (3, 3), (2, 1)])
@pytest.mark.parametrize("nworkers", [1, 2, 3])
@pytest.mark.parametrize("budget", [1, 8 << 20])
def test_kn2row_bands_and_workers(rng, kk, pad, nworkers, budget):
    """kn2row (one GEMM by all the taps, then shifted sums) against float64: kernel sizes and paddings up to
    bands that lie wholly in the padding (pad 3), bands of one output row (budget 1) or whole images, 1-3 workers."""
    x = rng.standard_normal((2, 5, 7, 20), dtype=np.float32)
    wt = rng.standard_normal((3, 20, kk, kk), dtype=np.float32)
    b = rng.standard_normal(3, dtype=np.float32)
    ref = R.conv2d(*f64(x, wt, b), stride=1, padding=pad)
    res = rng.standard_normal(ref.shape, dtype=np.float32)
    wk = np.ascontiguousarray(wt.transpose(1, 2, 3, 0).reshape(20, -1))
    y = conv_kn2row(x, wk, kk, kk, pad, b, res, budget_bytes=budget, nworkers=nworkers)
    assert rel_err(y, ref + res) < TOL
    y = conv_kn2row(x, wk, kk, kk, pad, None, None, budget_bytes=budget, nworkers=nworkers)
    assert rel_err(y, R.conv2d(*f64(x, wt), None, stride=1, padding=pad)) < TOL


@pytest.mark.parametrize("dtype,cache", [(np.float32, True), (np.float32, False), (np.float16, False),
                                         (np.uint16, False)])
def test_few_output_channels_take_kn2row(rng, dtype, cache):
    """The models' last convolutions (few outputs, many inputs, stride 1) take kn2row, from weights kept or
    stored in float32, float16 or bfloat16 bits; with few inputs, or stride 2, im2col as before."""
    from sdgen.kernels.weights import to_storage, widen

    wt = (rng.standard_normal((3, 32, 3, 3)) / math.sqrt(9 * 32)).astype(np.float32)
    stored = to_storage(wt, dtype)
    b = rng.standard_normal(3, dtype=np.float32)
    plan = Conv2dPlan(stored, b, 1, 1, cache=cache)
    assert plan.variant_for(9, 11, 2) == "kn2row"
    x = rng.standard_normal((2, 9, 11, 32), dtype=np.float32)
    assert rel_err(conv2d(x, plan), R.conv2d(*f64(x, widen(stored), b), stride=1, padding=1)) < TOL
    assert Conv2dPlan(np.zeros((3, 8, 3, 3), np.float32), None, 1, 1).variant_for(9, 11, 2) == "im2col"
    assert Conv2dPlan(np.zeros((3, 32, 3, 3), np.float32), None, 2, 1).variant_for(9, 11, 2) == "im2col"
    with pytest.raises(ValueError):
        Conv2dPlan(np.zeros((3, 32, 3, 3), np.float32), None, 2, 1, variant="kn2row").variant_for(9, 11, 2)


def test_conv_rejects_bad_shapes(rng):
    plan = Conv2dPlan(rng.standard_normal((4, 3, 3, 3), dtype=np.float32), None, 1, 1)
    with pytest.raises(ValueError):
        conv2d(np.zeros((1, 5, 5, 2), np.float32), plan)
    with pytest.raises(ValueError):
        conv2d(np.zeros((1, 5, 5, 3), np.float32), plan, residual=np.zeros((1, 5, 4, 4), np.float32))


def test_conv_accepts_noncontiguous_and_float64_input(rng):
    x = rng.standard_normal((1, 8, 3, 6)).transpose(0, 1, 3, 2)  # (1, 8, 6, 3), float64, strided
    wt = rng.standard_normal((4, 3, 3, 3), dtype=np.float32)
    y = conv2d(x, Conv2dPlan(wt, None, 1, 1, variant="f43"))
    assert rel_err(y, R.conv2d(*f64(x, wt), None, stride=1, padding=1)) < TOL


def test_variant_choice_and_plan_caching(rng):
    assert choose_variant(320, 320, 64, 64, 2) == "f43"
    assert choose_variant(1280, 1280, 16, 16, 2) == "f23"  # F(4,3) filters would take 236 MB
    assert choose_variant(4, 320, 64, 64, 1) == "im2col"
    assert choose_variant(320, 320, 2, 2, 1) == "im2col"
    plan = Conv2dPlan(rng.standard_normal((32, 32, 3, 3), dtype=np.float32), None, 1, 1)
    v = plan.prepare(64, 64, 1)
    before = plan.prepared_bytes()
    conv2d(rng.standard_normal((1, 64, 64, 32), dtype=np.float32), plan)
    assert plan.prepared_bytes() == before and v in plan._prepared  # transformed once, at prepare
    with pytest.raises(ValueError):
        Conv2dPlan(np.zeros((1, 1, 3, 3), np.float32), None, variant="nope")


# ------------------------------------------------------------------------------------------------ GEMM


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear(rng, with_bias, with_residual):
    x = rng.standard_normal((3, 7, 33), dtype=np.float32)
    w = rng.standard_normal((17, 33), dtype=np.float32)
    b = rng.standard_normal(17, dtype=np.float32) if with_bias else None
    ref = R.linear(*f64(x, w, b))
    res = rng.standard_normal(ref.shape, dtype=np.float32) if with_residual else None
    if res is not None:
        ref = ref + res
    y = K.linear(x, w, b, residual=res) if with_residual else K.linear(x, w, b)
    assert y.shape == (3, 7, 17) and y.dtype == np.float32
    assert rel_err(y, ref) < TOL


def test_linear_into_out_with_residual_after_the_bias(rng):
    """out= receives the result (and is returned); the residual is added after the bias, (x W^T + b) + r, as a
    residual connection after a linear layer rounds: bit-identical to adding it in float32 afterwards."""
    x = rng.standard_normal((2, 9, 40), dtype=np.float32)
    w = rng.standard_normal((24, 40), dtype=np.float32)
    b = rng.standard_normal(24, dtype=np.float32) * 100  # large: adding the bias rounds
    res = rng.standard_normal((2, 9, 24), dtype=np.float32)
    out = np.full((2, 9, 24), np.nan, np.float32)
    y = K.linear(x, w, b, residual=res, out=out)
    assert y is out
    assert np.array_equal(y, K.linear(x, w, b) + res)
    assert rel_err(y, R.linear(*f64(x, w, b)) + res) < TOL
    with pytest.raises(ValueError):
        K.linear(x, w, b, out=np.empty((2, 9, 48), np.float32)[..., ::2])


@pytest.mark.skipif(not panels.AVAILABLE, reason="register tiles need AVX-512VL")
@pytest.mark.parametrize("m, k, n", [(1, 16, 32), (5, 70, 96), (77, 300, 64), (259, 513, 288), (600, 200, 320),
                                     (0, 40, 64)])
@pytest.mark.parametrize("nworkers", [1, 2])
def test_linear_tiles(rng, m, k, n, nworkers):
    """Linear layers from weights packed in panels (linear_tiles): the first call packs W while it multiplies, later
    calls use the panels, and calls from W as it lies pack each chunk for its use only; all against float64, the
    same numbers (each sum in the same order: also whatever the workers), with the bias and the residual added
    after (bit-identical to adding the residual afterwards), into out. Shapes: inner dimensions over and not a
    multiple of KC (513: two equal passes of 257), rows over ROW_BLOCK (600) and in tiles of 6 with every
    remainder, fewer panels than GROUP and more (320 outputs: 10 panels), no rows (the call packs W and returns an
    empty result)."""
    from sdgen.kernels import linear_tiles

    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32) * 10
    res = rng.standard_normal((m, n), dtype=np.float32)
    ref = R.linear(*f64(x, w, b)) + res
    wp = linear_tiles.empty_panels(n, k)
    first = linear_tiles.linear(x, wp, b, res, weight=w, nworkers=nworkers)
    out = np.full((m, n), np.nan, np.float32)
    later = linear_tiles.linear(x, wp, b, res, out=out, nworkers=3 - nworkers)
    assert later is out and np.array_equal(first, later)
    assert np.array_equal(wp.transpose(0, 2, 1).reshape(n, k), w)  # panel p holds outputs 32 p .. 32 p + 31
    assert np.array_equal(later, linear_tiles.linear(x, wp, b) + res)
    # the tiles add the bias as they store the sums: as a pass adding it afterwards rounds
    assert np.array_equal(linear_tiles.linear(x, wp, b), linear_tiles.linear(x, wp, None) + b)
    # from W as it lies, each chunk packed for its use (8 x 8 blocks transposed in registers, the last inner steps
    # one by one): the same numbers
    assert np.array_equal(linear_tiles.linear(x, None, b, res, weight=w, nworkers=nworkers), later)
    if m:
        assert rel_err(later, ref) < TOL
    with pytest.raises(ValueError):
        linear_tiles.linear(x[:, :-1], wp, b)
    with pytest.raises(ValueError):  # a bias too short would be read past its end by the tiles
        linear_tiles.linear(x, wp, b[:-1])


@pytest.mark.skipif(not panels.AVAILABLE, reason="register tiles need AVX-512VL")
@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("m, k, sizes", [(600, 320, (320, 320, 320)), (77, 70, (64, 32, 96)), (5, 513, (32,))])
def test_linear_tiles_blocks_of_rows(rng, m, k, sizes, storage):
    """W given as blocks of its rows (a fused layer's q, k and v weights where they lie, never joined): the same
    numbers, bit for bit, as W joined, from the blocks as they lie and packed into panels (whatever the workers),
    with bias and residual; blocks of outputs that are not whole panels, or of two dtypes, are refused."""
    from sdgen.kernels import linear_tiles
    from sdgen.kernels.weights import STORAGE_DTYPES, to_storage

    x = rng.standard_normal((m, k), dtype=np.float32)
    dtype = STORAGE_DTYPES[storage]
    blocks = [to_storage(rng.standard_normal((n, k), dtype=np.float32), dtype) for n in sizes]
    w = np.concatenate(blocks)
    b = rng.standard_normal(w.shape[0], dtype=np.float32)
    res = rng.standard_normal((m, w.shape[0]), dtype=np.float32)
    want = linear_tiles.linear(x, None, b, res, weight=w)
    for nworkers in (1, 2):
        assert np.array_equal(linear_tiles.linear(x, None, b, res, weight=blocks, nworkers=nworkers), want)
        wp = linear_tiles.empty_panels(*w.shape, dtype=w.dtype)
        assert np.array_equal(linear_tiles.linear(x, wp, b, res, weight=blocks, nworkers=nworkers), want)
        assert np.array_equal(wp.transpose(0, 2, 1).reshape(w.shape), w)  # the blocks' panels one after another
    with pytest.raises(ValueError, match="fill panels"):
        linear_tiles.linear(x, None, None, weight=[w, np.zeros((40, k), w.dtype)])
    with pytest.raises(ValueError, match="fill panels"):
        linear_tiles.linear(x, None, None, weight=[w, w.astype(np.float32 if storage == "fp16" else np.float16)])


@pytest.mark.skipif(not panels.AVAILABLE, reason="register tiles need AVX-512VL")
@pytest.mark.parametrize("m, k, n", [(5, 70, 96), (600, 513, 320), (77, 300, 64)])
@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_linear_tiles_half_panels(rng, m, k, n, storage):
    """Half-precision weights packed in half-precision panels (each chunk widened into float32 as the tiles need
    it), or used as they lie (each chunk widened as it is packed for its use): the same numbers, bit for bit, as
    float32 panels of the widened weights, whatever the workers; the panels hold the weights' own bits; float32
    weights cannot fill half panels."""
    from sdgen.kernels import linear_tiles
    from sdgen.kernels.weights import STORAGE_DTYPES, to_storage, widen

    x = rng.standard_normal((m, k), dtype=np.float32)
    w = to_storage(rng.standard_normal((n, k), dtype=np.float32), STORAGE_DTYPES[storage])
    b = rng.standard_normal(n, dtype=np.float32)
    wide = linear_tiles.empty_panels(n, k)
    want = linear_tiles.linear(x, wide, b, weight=widen(w))
    wp = linear_tiles.empty_panels(n, k, w.dtype)
    assert wp.dtype == w.dtype and wp.nbytes == w.nbytes
    assert np.array_equal(linear_tiles.linear(x, wp, b, weight=w, nworkers=2), want)
    assert np.array_equal(linear_tiles.linear(x, wp, b, nworkers=1), want)
    assert np.array_equal(linear_tiles.linear(x, None, b, weight=w, nworkers=2), want)  # chunks widened as packed
    assert np.array_equal(wp.transpose(0, 2, 1).reshape(n, k), w)
    assert rel_err(want, R.linear(*f64(x, widen(w), b))) < TOL
    with pytest.raises(ValueError, match="weights for"):
        linear_tiles.linear(x, linear_tiles.empty_panels(n, k, w.dtype), b, weight=widen(w))


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_widen_run_every_bit_pattern(half):
    """weights.widen_run (by vectors of the CPU's conversion, the tail by table or shift) on all 65536 bit patterns,
    from and to odd offsets, a length not a multiple of the vector: every number exactly numpy's (float16) or the
    bits shifted (bfloat16); float16 NaNs stay NaN (signalling ones come out quiet, as from any conversion)."""
    from sdgen.kernels import weights as W

    if not W.HAS_F16C:
        pytest.skip("the vector conversion needs F16C")
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.full(65536 + 8, 7.0, np.float32)
    n = 65536 - 5
    kind = W.HALF_F16 if half == "fp16" else W.HALF_BF16
    W.widen_run(bits, 3, out, 5, n, kind, W.F16_TABLE)
    got = out[5:5 + n]
    want = (bits.view(np.float16).astype(np.float32) if half == "fp16"
            else (bits.astype(np.uint32) << np.uint32(16)).view(np.float32))[3:3 + n]
    nan = np.isnan(want)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all() and (half == "fp16" or np.array_equal(got.view(np.uint32), want.view(np.uint32)))
    assert (out[:5] == 7.0).all() and (out[5 + n:] == 7.0).all()  # nothing written outside


# cut along the longer side: rows (203 x 97), columns (37 x 161); more blocks of columns than workers, handed out
# one at a time (40 x 600: 4 blocks of columns with 2 workers)
@pytest.mark.parametrize("m, n", [(203, 97), (37, 161), (40, 600)])
@pytest.mark.parametrize("nworkers", [1, 2, 3])
def test_gemm_bias_on_the_workers(rng, m, n, nworkers):
    from sdgen.kernels.gemm import gemm_bias

    k = 801  # m * n * k above the size that runs on one thread (_PARALLEL_FLOPS)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((n, k), dtype=np.float32).T  # a weight as linear passes it: (out, in) transposed
    bias = rng.standard_normal(n, dtype=np.float32)
    res = rng.standard_normal((m, n), dtype=np.float32)
    y = gemm_bias(a, b, bias, res, nworkers=nworkers)
    ref = a.astype(np.float64) @ b.astype(np.float64) + bias + res
    assert y.shape == (m, n) and y.dtype == np.float32
    assert rel_err(y, ref) < TOL
    assert rel_err(gemm_bias(a, b, None, nworkers=nworkers), ref - bias - res) < TOL


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize(
    "b,lq,lk,c,heads",
    [(1, 77, 77, 64, 4), (3, 33, 77, 40, 8), (2, 50, 13, 30, 1), (1, 5, 200, 24, 3)],
)
@pytest.mark.parametrize("block_bytes", [4 << 20, 4 * 77 * 20])
def test_attention(rng, b, lq, lk, c, heads, block_bytes):
    q = rng.standard_normal((b, lq, c), dtype=np.float32)
    k = rng.standard_normal((b, lk, c), dtype=np.float32)
    v = rng.standard_normal((b, lk, c), dtype=np.float32)
    y = K.attention(q, k, v, heads, block_bytes=block_bytes)
    assert rel_err(y, R.attention(*f64(q, k, v), heads)) < TOL


@pytest.mark.parametrize("nworkers", [1, 3])
def test_attention_workers(rng, nworkers):
    q, k, v = (rng.standard_normal((2, 45, 24), dtype=np.float32) for _ in range(3))
    y = K.attention(q, k, v, 3, block_bytes=4 * 45 * 16, nworkers=nworkers)
    assert rel_err(y, R.attention(*f64(q, k, v), 3)) < TOL


@pytest.mark.parametrize("mask_shape", ["2d", "4d", "per_batch_keys"])
def test_attention_with_mask(rng, mask_shape):
    b, l, c, heads = 2, 77, 48, 4
    q, k, v = (rng.standard_normal((b, l, c), dtype=np.float32) for _ in range(3))
    if mask_shape == "2d":
        mask = np.triu(np.full((l, l), -np.inf, np.float32), 1)  # CLIP's causal mask
    elif mask_shape == "4d":
        mask = np.triu(np.full((l, l), -np.inf, np.float32), 1)[None, None]
    else:
        mask = np.zeros((b, 1, 1, l), np.float32)
        mask[0, ..., 60:] = -np.inf
        mask[1, ..., :3] = -1e4
    for block in (4 << 20, 4 * l * 10):
        y = K.attention(q, k, v, heads, mask, block_bytes=block)
        assert np.isfinite(y).all()
        assert rel_err(y, R.attention(*f64(q, k, v), heads, mask)) < TOL


@pytest.mark.parametrize(
    "b,lq,lk,c,heads",
    [(2, 300, 77, 40, 5), (1, 40, 13, 96, 6), (3, 20, 9, 16, 4), (1, 520, 8, 24, 3)],
)
def test_attention_head_groups_and_padded_keys(rng, b, lq, lk, c, heads):
    """Cross-attention-like shapes: several heads per job (a last, smaller group), keys padded to a multiple of 8."""
    q = rng.standard_normal((b, lq, c), dtype=np.float32)
    k = rng.standard_normal((b, lk, c), dtype=np.float32)
    v = rng.standard_normal((b, lk, c), dtype=np.float32)
    ref = R.attention(*f64(q, k, v), heads)
    for block in (4 << 20, 4 * 80 * 64):
        y = K.attention(q, k, v, heads, block_bytes=block)
        assert np.isfinite(y).all() and rel_err(y, ref) < TOL


def test_attention_partition():
    from sdgen.kernels.mha import _partition

    assert _partition(2, 4096, 4096, 8, 4 << 20) == (256, 1)  # self-attention: one head per job
    assert _partition(2, 4096, 80, 8, 4 << 20) == (256, 8)  # cross-attention: all heads of 256 rows
    assert _partition(2, 256, 80, 8, 4 << 20) == (256, 2)  # groups split to keep 8 jobs
    qb, hg = _partition(1, 77, 77, 12, 4 * 77 * 20)
    assert qb == 20 and hg >= 1 and hg * qb * 77 * 4 <= max(4 * 77 * 20, 4 * 77 * 16)


@pytest.mark.parametrize("lk", [77, 200, 9])  # 9 keys, fewer than the 16 per head: probabilities normalised
def test_attention_bit_identical_across_worker_counts(rng, lk):
    q = rng.standard_normal((2, 300, 64), dtype=np.float32)
    k, v = (rng.standard_normal((2, lk, 64), dtype=np.float32) for _ in range(2))
    ys = [K.attention(q, k, v, 4, block_bytes=4 * 256 * 64, nworkers=n) for n in (1, 2, 3)]
    assert all(np.array_equal(ys[0], y) for y in ys[1:])


@pytest.mark.parametrize("lk, heads", [(2048, 3), (2048, 1), (64, 3)])
def test_attention_keys_in_place_or_copied(rng, monkeypatch, lk, heads):
    """Keys and values copied contiguous per head (long keys, several heads) or read in place through strided views
    (short keys, or one head): against the float64 reference, and, with several heads, the same numbers the other
    way."""
    from sdgen.kernels import mha

    c = 24
    q = rng.standard_normal((2, 40, c), dtype=np.float32)
    k, v = (rng.standard_normal((2, lk, c), dtype=np.float32) for _ in range(2))
    y = K.attention(q, k, v, heads)
    assert rel_err(y, R.attention(*f64(q, k, v), heads)) < TOL
    if heads > 1:
        other = 1 << 30 if lk >= mha._COPY_MIN_KEYS else 1
        monkeypatch.setattr(mha, "_COPY_MIN_KEYS", other)
        monkeypatch.setattr(mha, "_PACK_MIN_KEYS", other)
        assert np.array_equal(y, K.attention(q, k, v, heads))


@pytest.mark.parametrize("lk, heads", [(2048, 3), (2048, 1), (64, 3)])
def test_attention_on_views_of_a_fused_projection(rng, lk, heads):
    """q, k and v as np.split's thirds of one (B, L, 3C) projection (tokens 3C apart) are read in place: the same
    numbers as from contiguous copies, on both key paths (copied per head, or read in place)."""
    c = 24
    qkv = rng.standard_normal((2, lk, 3 * c), dtype=np.float32)
    q, k, v = np.split(qkv, 3, axis=-1)
    assert not q.flags.c_contiguous
    y = K.attention(q, k, v, heads)
    assert np.array_equal(y, K.attention(*(np.ascontiguousarray(t) for t in (q, k, v)), heads))
    assert rel_err(y, R.attention(*f64(q, k, v), heads)) < TOL


def test_attention_large_scores_do_not_overflow(rng):
    q = rng.standard_normal((1, 16, 32), dtype=np.float32) * 30
    k = rng.standard_normal((1, 40, 32), dtype=np.float32) * 30
    v = rng.standard_normal((1, 40, 32), dtype=np.float32)
    y = K.attention(q, k, v, 2)
    assert np.isfinite(y).all() and rel_err(y, R.attention(*f64(q, k, v), 2)) < TOL


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax(rng, axis):
    x = rng.standard_normal((5, 7, 9), dtype=np.float32) * 5
    x_copy = x.copy()
    y = K.softmax(x, axis=axis)
    assert np.array_equal(x, x_copy)  # input untouched
    assert rel_err(y, R.softmax(x.astype(np.float64), axis=axis)) < TOL


# ------------------------------------------------------------------------------------------------ norms


@pytest.mark.parametrize("shape,groups",
                         [((1, 7, 9, 64), 32), ((3, 13, 5, 33), 3), ((2, 17, 19, 8), 4), ((1, 1, 1, 6), 2)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm(rng, shape, groups, silu):
    x = rng.standard_normal(shape, dtype=np.float32) * 3 + 0.5
    g = rng.standard_normal(shape[-1], dtype=np.float32)
    b = rng.standard_normal(shape[-1], dtype=np.float32)
    y = K.group_norm(x, groups, g, b, 1e-5, silu=silu)
    assert rel_err(y, R.group_norm(x.astype(np.float64), groups, g, b, 1e-5, silu=silu)) < TOL


def test_group_norm_large_mean(rng):
    """A mean 1e4 times the spread: shifted float64 sums keep the variance."""
    x = (rng.standard_normal((2, 9, 11, 16)) * 0.01 + 100.0).astype(np.float32)
    g = np.ones(16, np.float32)
    b = np.zeros(16, np.float32)
    y = K.group_norm(x, 4, g, b, 1e-6)
    assert rel_err(y, R.group_norm(x.astype(np.float64), 4, g, b, 1e-6)) < TOL


@pytest.mark.parametrize("shape", [(3, 77, 33), (5, 768), (2, 1, 7)])
def test_layer_norm(rng, shape):
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    g = rng.standard_normal(shape[-1], dtype=np.float32)
    b = rng.standard_normal(shape[-1], dtype=np.float32)
    assert rel_err(K.layer_norm(x, g, b, 1e-5), R.layer_norm(x.astype(np.float64), g, b, 1e-5)) < TOL


# ------------------------------------------------------------------------------------------------ activations


def _activation_inputs(rng):
    x = np.concatenate(
        [
            rng.standard_normal(2001) * 3,
            np.linspace(-20, 20, 801),
            [0.0, -0.0, 1e-8, -1e-8, 88.0, -88.0, 100.0, -100.0, -1e4, 1e4],
        ]
    ).astype(np.float32)
    return x.reshape(4, 19, 37)


@pytest.mark.parametrize("name", ["gelu", "quick_gelu", "silu"])
def test_activations_elementwise(rng, name):
    x = _activation_inputs(rng)
    y = getattr(K, name)(x)
    with np.errstate(over="ignore"):  # the twin's exp(-x) overflows to inf for x = -1e4, as it should
        twin = getattr(R, name)(x.astype(np.float64))
    assert y.shape == x.shape and y.dtype == np.float32
    assert rel_err(y, twin) < TOL
    if name == "gelu":  # the twin's 1 + erf loses the far negative tail; erfc keeps it, for the element-wise check
        x64 = x.astype(np.float64)
        twin = 0.5 * x64 * np.array([math.erfc(-t / math.sqrt(2.0)) for t in x64.ravel()]).reshape(x.shape)
    # element-wise, tails included: in the far negative tail the float32 rounding of exp's argument (x^2 / 2 for
    # gelu) costs a few 1e-6 relative, on values below 1e-8
    assert np.all(np.abs(y - twin) <= 1e-5 * np.abs(twin) + 1e-30)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 13), (2, 8, 9, 64)])
def test_upsample2x(rng, shape):
    """Nearest-neighbour upsampling by 2 moves values: exactly numpy's repeat (odd sizes, batch 3)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    assert np.array_equal(K.upsample2x(x), R.upsample2x(x))


def test_geglu(rng):
    x = rng.standard_normal((3, 5, 2 * 37), dtype=np.float32) * 2
    y = K.geglu(x)
    assert y.shape == (3, 5, 37)
    assert rel_err(y, R.geglu(x)) < TOL
    with pytest.raises(ValueError):
        K.geglu(np.zeros((2, 3), np.float32))


# ------------------------------------------------------------------------------------------------ threads


def test_set_threads():
    import numba

    from sdgen.threads import available_cores, get_threads, set_threads

    try:
        assert set_threads(1) == 1 and numba.get_num_threads() == 1 and get_threads() == 1
        x = np.ones((1, 6, 6, 4), np.float32)
        conv2d(x, Conv2dPlan(np.ones((4, 4, 3, 3), np.float32), None, 1, 1, variant="f43"))
    finally:
        n = set_threads(None)
    assert n == min(available_cores(), numba.config.NUMBA_NUM_THREADS) == numba.get_num_threads()
    with pytest.raises(ValueError):
        set_threads(0)


def test_counter_uniform_matches_splitmix64_whatever_the_threads():
    """kernels.counter_random against its numpy twin bit for bit (sizes across the 65536-element jobs, keys
    negative and past 2^64, which are taken modulo 2^64), the same values on 1 and 2 threads, and the twin against
    SplitMix64's published first output for seed 0 (0xE220A8397B1DCDAF: its top 24 bits, 0xE220A8)."""
    from sdgen.kernels import counter_random
    from sdgen.threads import set_threads

    assert R.counter_uniform((1,), 0, 0.0, 2.0 ** 24)[0] == 0xE220A8
    for shape, key in (((3, 70001), 0), ((5,), -3), ((2, 3, 4), (1 << 64) + 12345), ((131073,), 7 << 32)):
        assert np.array_equal(counter_random.uniform(shape, key, -0.3, 0.5), R.counter_uniform(shape, key, -0.3, 0.5))
    try:
        set_threads(1)
        one = counter_random.uniform((200000,), 99, -1.0, 1.0)
        set_threads(2)
        two = counter_random.uniform((200000,), 99, -1.0, 1.0)
    finally:
        set_threads(None)
    assert np.array_equal(one, two)


# ------------------------------------------------------------------------------------------------ upsample + conv


def test_upconv_f42_matrices_and_phases(rng):
    """F(4,2)'s matrices compute a 4-output correlation with 2 taps exactly (float64), and the four phases' 2x2
    taps give conv3x3(up2(x)) exactly."""
    from sdgen.kernels import upconv

    bt, g, at = upconv.matrices()
    d, k = rng.standard_normal(5), rng.standard_normal(2)
    assert np.allclose(at @ ((g @ k) * (bt @ d)), [k[0] * d[i] + k[1] * d[i + 1] for i in range(4)], atol=1e-13)
    x = rng.standard_normal((1, 5, 6, 3))
    w = rng.standard_normal((4, 3, 3, 3))
    ref = R.conv2d(R.upsample2x(x), w, None, padding=1)
    taps = upconv.phase_taps(w)  # (a, c, o, i, r, s)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for a in range(2):
        for c in range(2):
            y = sum(xp[:, a + r: a + r + 5, c + s: c + s + 6] @ taps[a, c, :, :, r, s].T
                    for r in range(2) for s in range(2))
            assert np.allclose(ref[:, a::2, c::2], y, atol=1e-12)


@pytest.mark.parametrize("n, h, w, cin, cout", [(1, 23, 21, 16, 24), (3, 9, 22, 40, 72), (1, 24, 20, 130, 70)])
@pytest.mark.parametrize("storage", ["cache", "fp32", "fp16", "fp16-blocks"])
def test_upsample_conv2d(rng, monkeypatch, n, h, w, cin, cout, storage):
    """Upsampling by 2 then a 3x3 convolution, computed as four F(4,2) phases on the small map: against float64
    upsample + conv, whatever holds the weights (float32 kept, or stored float32 / float16, in blocks or not)."""
    from sdgen.kernels import upconv

    monkeypatch.setattr(upconv, "MIN_TILES", 1)  # these maps are smaller than the models'
    if storage.endswith("blocks"):
        monkeypatch.setattr(winograd, "STREAM_FILTER_BYTES", 1)  # weights stored in blocks of output channels
    x = rng.standard_normal((n, h, w, cin), dtype=np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    if storage.startswith("fp16"):
        wt = wt.astype(np.float16)
    plan = Conv2dPlan(wt, b, 1, 1, cache=storage == "cache")
    assert (plan.blocks is not None) == storage.endswith("blocks")
    y = K.upsample_conv2d(x, plan)
    ref = R.conv2d(R.upsample2x(x.astype(np.float64)), wt.astype(np.float64), b, padding=1)
    assert y.shape == ref.shape and rel_err(y, ref) < TOL


@pytest.mark.parametrize("nworkers", [1, 2, 3])
def test_upsample_conv3x3_groups_and_workers(rng, nworkers):
    """Output channels in several filter groups (a last, partial one), blocks of tiles shared out to 1-3 workers."""
    from sdgen.kernels import upconv

    x = rng.standard_normal((2, 11, 13, 24), dtype=np.float32)
    wt = rng.standard_normal((150, 24, 3, 3), dtype=np.float32)
    b = rng.standard_normal(150, dtype=np.float32)
    plan = Conv2dPlan(wt, b, 1, 1, cache=False)
    ref = R.conv2d(R.upsample2x(x.astype(np.float64)), wt.astype(np.float64), b, padding=1)
    per_channel = upconv.A2 * winograd.padded_channels(24) * 4
    y = upconv.upsample_conv3x3(x, plan.output_blocks, 150, b, nworkers=nworkers, filter_bytes=64 * per_channel)
    assert rel_err(y, ref) < TOL


def test_upsample_conv2d_falls_back_on_small_maps(rng):
    """Too few tiles for the phases (the UNet's 8x8 and 16x16 maps): upsampled, then convolved as before."""
    from sdgen.kernels import upconv

    x = rng.standard_normal((1, 8, 8, 32), dtype=np.float32)
    assert not upconv.worth_it(1, 8, 8)
    plan = Conv2dPlan(rng.standard_normal((32, 32, 3, 3), dtype=np.float32), None, 1, 1, cache=False)
    assert np.array_equal(K.upsample_conv2d(x, plan), conv2d(K.upsample2x(x), plan))


# ------------------------------------------------------------------------------------------------ packed panels


@pytest.mark.parametrize("m, k, n", [(1, 40, 32), (5, 3, 64), (13, 64, 96), (256, 40, 128), (7, 80, 32),
                                     (11, 1100, 64)])
def test_gemm_panels(rng, m, k, n):
    """panels.gemm_panels (register tiles of 6, 4, 2 and 1 rows) on rows of A that lie apart (lda > k) and from an
    offset, into a block of C at an offset, against float64; nothing outside the block is written. And
    gemm_panels_by_chunk (its loops the other way round): the same numbers, bit for bit (k = 1100: three passes of
    _ROWS_CHUNK steps, the last one partial)."""
    from sdgen.kernels import panels

    a_full = rng.standard_normal((m + 2, k + 5), dtype=np.float32)
    b = rng.standard_normal((k, n + 32), dtype=np.float32)
    # columns 32 .. 32 + n of b in panels: bp[p, e, t] = b[e, 32 + p PANEL + t]
    bp = np.ascontiguousarray(b[:, 32:32 + n].reshape(k, n // panels.PANEL, panels.PANEL).transpose(1, 0, 2))
    want = a_full[1:m + 1, 2:2 + k].astype(np.float64) @ b[:, 32:32 + n].astype(np.float64)
    a_off = (k + 5) + 2  # A = a_full[1:, 2:2 + k]
    outs = []
    for gemm in (panels.gemm_panels, panels.gemm_panels_by_chunk):
        c = np.full((m + 1, n + 8), 7.0, dtype=np.float32)
        gemm(a_full.reshape(-1), a_off, k + 5, m, k, bp.reshape(-1), 0, n // panels.PANEL,
             c.reshape(-1), (n + 8) + 4, n + 8)  # into c[1:, 4:4 + n]
        assert rel_err(c[1:, 4:4 + n], want) < TOL
        assert (c[0] == 7).all() and (c[:, :4] == 7).all() and (c[:, 4 + n:] == 7).all()
        outs.append(c)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("m", [1, 5, 6, 11, 259])
@pytest.mark.parametrize("lines", [0, 1, 7, 300, 5000])
def test_tiles_prefetching_compute_the_same(rng, m, lines):
    """panels.tile_rows_then prefetching a stream of lines while it multiplies (as the linear layers fetch the next
    weights to pack): the same numbers, bit for bit, as without, whether the stream has fewer lines than the tiles
    (some tiles prefetch none), more than their steps (each prefetches one line a step and stops) or none; and the
    sums against float64. Lines anywhere in memory: a prefetch never faults."""
    from sdgen.kernels import panels

    k = 37
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, panels.PANEL), dtype=np.float32)
    stream = np.zeros(4096, dtype=np.uint8)

    def product(n_lines: int) -> np.ndarray:
        c = np.zeros((m, panels.PANEL), dtype=np.float32)
        panels.tile_rows_then(c.reshape(-1), 0, panels.PANEL, a.reshape(-1), 0, k, m, b.reshape(-1), 0, panels.PANEL,
                              k, 0, panels.NOTHING, 0, panels.NOTHING, 0, 0, stream, 64, 1000, 3, n_lines)
        return c

    plain = product(0)
    assert np.array_equal(product(lines), plain)
    assert rel_err(plain, a.astype(np.float64) @ b.astype(np.float64)) < TOL


@pytest.mark.parametrize("m, k, n", [(1, 40, 32), (13, 600, 64), (32, 1300, 96), (7, 512, 32)])
def test_gemm_tiles(rng, m, k, n):
    """panels.gemm_tiles: B's rows where they lie (ldb > n, from an offset), or B in panels further apart than
    their k x PANEL floats; the inner dimension in passes of _ROWS_CHUNK (k 600, 1300: partial passes), rows of A
    apart, into a block of C at an offset; against float64, nothing outside the block written, and the two
    layouts of B the same numbers."""
    from sdgen.kernels import panels

    P = panels.PANEL
    a_full = rng.standard_normal((m + 2, k + 5), dtype=np.float32)
    b = rng.standard_normal((k + 1, n + 40), dtype=np.float32)
    bp = np.zeros((n // P, k * P + 24), dtype=np.float32)  # panel j: B[:, j P:(j + 1) P], rows of P, 24 floats apart
    bp[:, :k * P] = b[1:, 8:8 + n].reshape(k, n // P, P).transpose(1, 0, 2).reshape(n // P, k * P)
    want = a_full[1:m + 1, 2:2 + k].astype(np.float64) @ b[1:, 8:8 + n].astype(np.float64)
    cs = []
    for bf, b_off, panel_step, ldb in ((b, (n + 40) + 8, P, n + 40), (bp, 0, k * P + 24, P)):
        c = np.full((m + 1, n + 8), 7.0, dtype=np.float32)
        panels.gemm_tiles(a_full.reshape(-1), (k + 5) + 2, k + 5, m, k, bf.reshape(-1), b_off, panel_step, ldb,
                          n // P, c.reshape(-1), (n + 8) + 4, n + 8)  # A = a_full[1:, 2:2 + k], into c[1:, 4:4 + n]
        assert rel_err(c[1:, 4:4 + n], want) < TOL
        assert (c[0] == 7).all() and (c[:, :4] == 7).all() and (c[:, 4 + n:] == 7).all()
        cs.append(c)
    assert np.array_equal(cs[0], cs[1])


@pytest.mark.parametrize("n", [64, 40])
def test_winograd_point_products(rng, monkeypatch, n):
    """winograd.point_products on views as the convolutions pass them (a block of tiles, a block of output
    columns): register tiles where the columns fill whole panels (n 64), BLAS otherwise (n 40) or without
    AVX-512VL; each against float64, and the two paths within rounding of each other."""
    from sdgen.kernels import panels

    v = rng.standard_normal((16, 40, 300), dtype=np.float32)
    u = rng.standard_normal((16, 300, n), dtype=np.float32)
    want = v[:, :37].astype(np.float64) @ u.astype(np.float64)
    outs = []
    for available in (panels.AVAILABLE, False):
        monkeypatch.setattr(panels, "AVAILABLE", available)
        mm = np.full((16, 40, n + 64), 7.0, dtype=np.float32)
        winograd.point_products(v[:, :37], u, mm[:, :37, 32:32 + n])
        assert rel_err(mm[:, :37, 32:32 + n], want) < TOL
        assert (mm[:, 37:] == 7).all() and (mm[:, :, :32] == 7).all() and (mm[:, :, 32 + n:] == 7).all()
        outs.append(mm)
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


@pytest.mark.parametrize("d, lq, lk", [(40, 300, 2080), (64, 7, 2080), (64, 131, 1024), (24, 256, 2080),
                                      (80, 50, 1056)])
def test_attention_scores_from_packed_keys(rng, monkeypatch, d, lq, lk):
    """Long keys copied per head go into panels and Q K^T takes panels.gemm_panels (heads up to _PANEL_MAX_D wide,
    keys a multiple of PANEL; from _PACK_MIN_KEYS keys on), and P V panels.gemm_rows on heads of 40, 64, 80: against
    float64, the same whatever the workers, and as the BLAS path to 1e-6."""
    from sdgen.kernels import mha, panels

    if not panels.AVAILABLE:
        pytest.skip("no AVX-512VL: attention takes BLAS's path")
    heads = 3
    q = rng.standard_normal((2, lq, heads * d), dtype=np.float32)
    k, v = (rng.standard_normal((2, lk, heads * d), dtype=np.float32) for _ in range(2))
    calls = []
    real = mha._scores_panels
    monkeypatch.setattr(mha, "_scores_panels", lambda *a: calls.append(1) or real(*a))
    ys = [K.attention(q, k, v, heads, nworkers=n) for n in (1, 2, 3)]
    assert calls and all(np.array_equal(ys[0], y) for y in ys[1:])
    assert rel_err(ys[0], R.attention(*f64(q, k, v), heads)) < TOL
    monkeypatch.setattr(mha, "_PANEL_MAX_D", 0)
    n_calls = len(calls)
    blas = K.attention(q, k, v, heads)
    assert len(calls) == n_calls and rel_err(ys[0], blas) < 1e-6


@pytest.mark.parametrize("d, heads, lq, lk", [(512, 1, 300, 2048), (96, 1, 37, 2080), (96, 3, 50, 1056),
                                             (64, 1, 20, 2112)])
def test_attention_values_in_panels(rng, monkeypatch, d, heads, lq, lk):
    """A single head filling whole panels (the VAE's of 512; from _COPY_MIN_KEYS keys on) takes Q K^T from its keys
    in panels like narrow heads, and heads that fill panels but are none of panels.ROW_WIDTHS take P V from their
    values in panels (mha._values_panels; a head of 64 keeps gemm_rows): against float64, the same whatever the
    workers, and as the BLAS path (keys read in place) to 1e-6."""
    from sdgen.kernels import mha, panels

    if not panels.AVAILABLE:
        pytest.skip("no AVX-512VL: attention takes BLAS's path")
    q = rng.standard_normal((2, lq, heads * d), dtype=np.float32)
    k, v = (rng.standard_normal((2, lk, heads * d), dtype=np.float32) for _ in range(2))
    calls = {"scores": 0, "values": 0}
    real_s, real_v = mha._scores_panels, mha._values_panels

    def scores(*a):
        calls["scores"] += 1
        return real_s(*a)

    def values(*a):
        calls["values"] += 1
        return real_v(*a)

    monkeypatch.setattr(mha, "_scores_panels", scores)
    monkeypatch.setattr(mha, "_values_panels", values)
    ys = [K.attention(q, k, v, heads, nworkers=n) for n in (1, 2, 3)]
    assert calls["scores"] and bool(calls["values"]) == (d not in panels.ROW_WIDTHS)
    assert all(np.array_equal(ys[0], y) for y in ys[1:])
    assert rel_err(ys[0], R.attention(*f64(q, k, v), heads)) < TOL
    monkeypatch.setattr(mha, "_PACK_MIN_KEYS", 1 << 30)  # keys read in place: BLAS
    monkeypatch.setattr(mha, "_COPY_MIN_KEYS", 1 << 30)
    before = dict(calls)
    blas = K.attention(q, k, v, heads)
    assert calls == before and rel_err(ys[0], blas) < 1e-6


@pytest.mark.parametrize("m, k", [(1, 3), (7, 40), (15, 600), (256, 1100)])
@pytest.mark.parametrize("n", [40, 64, 80])
def test_gemm_rows(rng, m, k, n):
    """panels.gemm_rows (rows of 40 and 80: tiles of 4 rows and of 1; of 64: tiles of 6, 4, 2, 1 rows, each remainder;
    passes of _ROWS_CHUNK steps, the last one partial) on rows of A that lie apart, from offsets, against float64
    (and as close as BLAS on the long sum); nothing else written."""
    from sdgen.kernels import panels

    assert n in panels.ROW_WIDTHS
    a_full = rng.random((m + 1, k + 3), dtype=np.float32)
    b = rng.standard_normal((k + 2, n), dtype=np.float32)
    c = np.full((m, n + 6), 7.0, dtype=np.float32)
    panels.gemm_rows(a_full.reshape(-1), k + 3 + 1, k + 3, m, k, b.reshape(-1), 2 * n, c.reshape(-1), 3, n + 6, n)
    a, bb = a_full[1:, 1:1 + k], b[2:]
    want = a.astype(np.float64) @ bb.astype(np.float64)
    assert rel_err(c[:, 3:3 + n], want) < max(TOL / 10, 2 * rel_err(a @ bb, want))
    assert (c[:, :3] == 7).all() and (c[:, 3 + n:] == 7).all()
