"""Memory features on tiny models: VAE tiling (== diffusers' enable_tiling) and slicing, attention slicing, weights
held in fp16/bf16, convolutions that keep no transformed weights, one-shot pipelines that release their models,
memory-mapped weights released once copied, and the memory estimate / check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdgen import memory
from sdgen.errors import OutOfMemoryError
from sdgen.image import to_uint8
from sdgen.kernels import Conv2dPlan, attention, conv2d
from sdgen.kernels import panels
from sdgen.kernels import weights as W
from sdgen.models.layers import set_attention_slicing, set_linear_panels, weights_dtype
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from tiny_models import SD1_UNET, SD1_VAE, build_sd_folder, make_unet, make_vae, state_dict_numpy

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny_vae():
    ref = make_vae(SD1_VAE, seed=1)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)), state_dict_numpy(ref))
    return ref, ours


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("sd1"), "sd1")


# ----------------------------------------------------------------------------------------- VAE tiling, slicing


def test_tiled_decode_matches_diffusers_tiling(tiny_vae):
    """Tiles of sample_size / 8 latents overlapping by a quarter, blended as diffusers' blend_v / blend_h: the same
    image as diffusers' AutoencoderKL with enable_tiling()."""
    ref, ours = tiny_vae
    z = RNG.standard_normal((2, 4, 20, 27), dtype=np.float32)  # 2.5 x 3.4 tiles of 8 latents: edge tiles too
    with torch.no_grad():
        ref.enable_tiling()
        want = ref.decode(torch.from_numpy(z)).sample.numpy()
        ref.disable_tiling()
    got = ours.decode(z, tiling=True)
    assert got.shape == want.shape == (2, 3, 160, 216)
    assert np.abs(got - want).max() < 1e-4
    assert np.array_equal(to_uint8(got), to_uint8(want)) or np.abs(
        to_uint8(got).astype(int) - to_uint8(want).astype(int)).max() <= 1


def test_tiling_only_above_a_tile(tiny_vae):
    """Latents no larger than a tile decode untiled (as diffusers), whatever the option says."""
    _, ours = tiny_vae
    z = RNG.standard_normal((1, 4, 8, 8), dtype=np.float32)
    assert np.array_equal(ours.decode(z, tiling=True), ours.decode(z))


def test_tiled_vs_untiled_tolerance(tiny_vae):
    """Tiled and untiled decodes differ (each tile has its own GroupNorm statistics, as in diffusers), by a few
    grey levels on average on this random tiny VAE (64-pixel tiles; far less on real VAEs and their 512-pixel
    tiles); the stated tolerance: mean difference within 12 grey levels, and no larger than 1.5x the mean
    difference away from the seams (no visible seams)."""
    _, ours = tiny_vae
    z = RNG.standard_normal((1, 4, 20, 27), dtype=np.float32)
    tiled = to_uint8(ours.decode(z, tiling=True)).astype(int)
    plain = to_uint8(ours.decode(z)).astype(int)
    d = np.abs(tiled - plain).max(axis=-1)[0]
    near = np.zeros(d.shape, bool)
    for k in range(48, max(d.shape), 48):  # tiles start every 48 pixels; blending over their first 16
        near[max(0, k - 8): k + 24, :] = True
        near[:, max(0, k - 8): k + 24] = True
    assert d.mean() <= 12
    assert d[near].mean() <= 1.5 * d[~near].mean()


def test_vae_slicing_same_images(tiny_vae):
    """Decoding a batch one image at a time gives the same images (within rounding: the convolution path may
    depend on the batch size)."""
    _, ours = tiny_vae
    z = RNG.standard_normal((3, 4, 12, 10), dtype=np.float32)
    sliced, whole = ours.decode(z, slicing=True), ours.decode(z)
    assert np.abs(sliced - whole).max() < 1e-4
    assert np.abs(to_uint8(sliced).astype(int) - to_uint8(whole).astype(int)).max() <= 1


# ----------------------------------------------------------------------------------------- attention slicing


@pytest.mark.parametrize("slices", [1, 3])
def test_attention_slicing_kernel_same_numbers(slices):
    q = RNG.standard_normal((2, 300, 64), dtype=np.float32)
    k = RNG.standard_normal((2, 300, 64), dtype=np.float32)
    v = RNG.standard_normal((2, 300, 64), dtype=np.float32)
    full = attention(q, k, v, 4)
    sliced = attention(q, k, v, 4, max_slices=slices)
    assert np.abs(full - sliced).max() < 1e-6


@pytest.mark.parametrize("value", ["auto", "max", 2])
def test_attention_slicing_unet_matches_diffusers_sliced(value):
    """The UNet with --attention-slicing equals diffusers' UNet with set_attention_slice(value)."""
    ref = make_unet(SD1_UNET, seed=3)
    ours = UNet(UNetConfig.from_dict(dict(ref.config)), state_dict_numpy(ref))
    x = RNG.standard_normal((2, 4, 8, 8), dtype=np.float32)
    ctx = RNG.standard_normal((2, 7, 32), dtype=np.float32)
    with torch.no_grad():
        ref.set_attention_slice(value)
        want = ref(torch.from_numpy(x), 500, encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    plain = ours(x, 500, ctx)
    set_attention_slicing(value)
    try:
        got = ours(x, 500, ctx)
    finally:
        set_attention_slicing(None)
    assert np.abs(got - plain).max() < 1e-5
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


# ----------------------------------------------------------------------------------------- weights dtype


@pytest.mark.parametrize("dtype", [np.float16, np.uint16])
def test_widen_exact(dtype):
    a = (RNG.standard_normal(5000) * 10.0 ** RNG.integers(-8, 4, 5000)).astype(np.float32)
    stored = W.to_storage(a, dtype)
    want = a.astype(np.float16).astype(np.float32) if dtype == np.float16 else torch.from_numpy(a).to(
        torch.bfloat16).float().numpy()
    assert np.array_equal(W.widen(stored), want)


@pytest.mark.parametrize("dtype", [np.float16, np.uint16])
def test_narrow_rounds_as_numpy_and_torch(dtype):
    """weights.narrow (float32 -> float16 by the CPU's conversion, -> bfloat16 bits by a vectorised loop; on the
    kernel workers above a million elements) gives numpy's astype(float16) / PyTorch's .to(bfloat16) bit for bit:
    random magnitudes from 1e-12 to 1e7, halfway cases, subnormal results, overflow to infinity, signed zeros,
    infinities, every bfloat16 bit pattern; NaN stays NaN. An odd length, so the last elements take the tail path."""
    a = (RNG.standard_normal(1 << 20) * 10.0 ** RNG.integers(-12, 8, 1 << 20)).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, -65520, 2.0 ** -24, 2.0 ** -25,
                        2.0 ** -25 * 1.0001, 2.0 ** -14, 6e-8, 1e-45, 3.4e38, -3.4e38, 1 + 2.0 ** -11,
                        1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)
    patterns = (np.arange(65536, dtype=np.uint32) << np.uint32(16)).view(np.float32)
    a = np.concatenate([a, special, patterns])[:-3]
    got = W.narrow(a, dtype)
    with np.errstate(over="ignore"):
        want = a.astype(np.float16) if dtype == np.float16 else \
            torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(a)
    assert got.dtype == dtype and got.shape == a.shape
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(W.widen(got[nan])).all()
    assert np.array_equal(W.to_storage(a[:1000], dtype).view(np.uint16), got[:1000].view(np.uint16))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_weights_are_the_rounded_model(name):
    """A UNet held in fp16/bf16 computes exactly what the fp32 UNet of the rounded weights computes (weights are
    widened exactly), and holds about half the bytes; with its linear layers in panels too (half-precision panels
    against float32 ones)."""
    ref = make_unet(SD1_UNET, seed=3)
    tensors = state_dict_numpy(ref)
    dtype = memory.weights_dtype(name)
    # matrices and convolution kernels are held at the dtype; biases and norms stay float32
    rounded = {k: W.widen(W.to_storage(v, dtype)) if v.ndim >= 2 else v for k, v in tensors.items()}
    with weights_dtype(dtype):
        half = UNet(UNetConfig.from_dict(dict(ref.config)), tensors)
    full = UNet(UNetConfig.from_dict(dict(ref.config)), rounded)
    x = RNG.standard_normal((2, 4, 8, 8), dtype=np.float32)
    ctx = RNG.standard_normal((2, 7, 32), dtype=np.float32)
    assert np.abs(half(x, 500, ctx) - full(x, 500, ctx)).max() < 1e-5
    assert half.conv_in.plan.hwio.dtype == dtype and half.time_linear_1.weight.dtype == dtype
    set_linear_panels(True)
    try:
        assert np.abs(half(x, 500, ctx) - full(x, 500, ctx)).max() < 1e-5
    finally:
        set_linear_panels(None)
    ff = half.down_blocks[0].attentions[0].blocks[0].ff_in
    assert ff.panels is None or (ff.panels.dtype == dtype and ff.panels.nbytes == ff.panels.size * 2)
    assert (ff.panels is not None) == panels.AVAILABLE


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("shape", [(130, 70, 3, 3), (300, 260, 1, 1), (64, 200, 1, 1), (7, 5, 3, 3)])
def test_hwio_relayout(dtype, shape):
    """The tiled OIHW -> HWIO re-layout (partial tiles on both channel axes; below its size threshold, numpy's), and
    the one into blocks of output channels, move every weight's bits to where numpy's transpose puts them."""
    w = RNG.standard_normal(shape).astype(np.float32)
    w = W.to_storage(w, dtype)
    got = W.hwio(w)
    want = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    assert got.dtype == w.dtype and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    blocks = W.oihw_blocks(w, 64)  # in blocks of 64 output channels, the last one padded with zeros
    assert blocks.dtype == w.dtype and blocks.shape == (-(-shape[0] // 64), shape[2], shape[3], shape[1], 64)
    assert np.array_equal(blocks.view(np.uint8), W.block_outputs(want, 64).view(np.uint8))
    assert np.array_equal(W.unblock_outputs(blocks, shape[0]).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("variant", [None, "f43", "f23", "im2col"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_conv_without_cache_matches_cached(variant, dtype):
    """A plan keeping only the stored weights (the models' convolutions) computes what a plan keeping each path's
    transformed weights does, for each weight precision, and holds nothing beside the weights."""
    for cin, cout, h, n in ((24, 40, 12, 1), (64, 64, 9, 2), (130, 70, 16, 1)):
        x = RNG.standard_normal((n, h, h, cin), dtype=np.float32)
        w = (RNG.standard_normal((cout, cin, 3, 3), dtype=np.float32) / np.sqrt(9 * cin)).astype(np.float32)
        b = RNG.standard_normal(cout, dtype=np.float32)
        res = RNG.standard_normal((n, h, h, cout), dtype=np.float32)
        stored = W.to_storage(w, dtype)
        lean = Conv2dPlan(stored, b, 1, 1, variant=variant, cache=False)
        cached = Conv2dPlan(W.widen(stored), b, 1, 1, variant=variant or lean.variant_for(h, h, n))
        got, want = conv2d(x, lean, residual=res), conv2d(x, cached, residual=res)
        assert np.abs(got - want).max() < 1e-4, (cin, cout, h, n)
        assert lean.prepared_bytes() == 0 and lean.stored_bytes() == stored.nbytes + b.nbytes


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_weights_in_blocks_of_outputs(dtype, monkeypatch):
    """Weights whose filters would not fit the shared buffer are stored in blocks of 64 output channels (the
    shared buffer made small here: 136 -> 3 blocks, the last one partly padding) and compute what a plan keeping
    its filters does: the block path on small maps (F(2,3) and F(4,3), 1 to 3 workers), the groups path on a
    large one, and a forced im2col; the blocks hold the weights and (padding aside) nothing more."""
    from sdgen.kernels import winograd

    monkeypatch.setattr(winograd, "STREAM_FILTER_BYTES", 36 * 72 * 64 * 4)
    cin, cout = 72, 136
    w = (RNG.standard_normal((cout, cin, 3, 3), dtype=np.float32) / np.sqrt(9 * cin)).astype(np.float32)
    b = RNG.standard_normal(cout, dtype=np.float32)
    stored = W.to_storage(w, dtype)
    calls = []
    real = winograd.winograd_conv_blocks
    monkeypatch.setattr(winograd, "winograd_conv_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    for variant in ("f23", "f43", "im2col"):
        lean = Conv2dPlan(stored, b, 1, 1, variant=variant, cache=False)
        assert lean.blocks is not None and lean.blocks.shape == (3, 3, 3, cin, 64) and lean.hwio is None
        assert lean.stored_bytes() == stored.nbytes * 192 // 136 + b.nbytes
        cached = Conv2dPlan(W.widen(stored), b, 1, 1, variant=variant)
        for n, h, blocks in ((2, 5, True), (1, 8, True), (1, 40, False)):
            x = RNG.standard_normal((n, h, h + 1, cin), dtype=np.float32)
            res = RNG.standard_normal((n, h, h + 1, cout), dtype=np.float32)
            want = conv2d(x, cached, residual=res)
            for nw in (1, 2, 3):
                calls.clear()
                m = {"f23": 2, "f43": 4}.get(variant)
                if m is None:
                    got = conv2d(x, lean, residual=res)
                else:
                    got = winograd.winograd_conv(x, lean.weights_for(variant), m, 1, b, cout, res, nworkers=nw)
                assert np.abs(got - want).max() < 1e-4, (variant, n, h, nw)
                assert bool(calls) == (blocks and m is not None), (variant, n, h, nw)
    auto = Conv2dPlan(stored, b, 1, 1, cache=False)
    assert auto.variant_for(2, 2, 1) == "f23"  # never im2col: the blocks make no (9 Cin, Cout) matrix


@pytest.mark.parametrize("m", [4, 6])
def test_streamed_filters_in_groups(monkeypatch, m):
    """Filters larger than the shared buffer are made and used a group of output channels at a time."""
    from sdgen.kernels import winograd

    from sdgen.kernels import reference as R

    a2 = (m + 2) ** 2
    x = RNG.standard_normal((1, 10, 10, 96), dtype=np.float32)
    w = RNG.standard_normal((200, 96, 3, 3), dtype=np.float32) / np.float32(30)
    b = RNG.standard_normal(200, dtype=np.float32)
    ref = R.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1)
    whole = winograd.winograd_conv(x, winograd.filter_transform(w, m), m, 1, b, 200)
    monkeypatch.setattr(winograd, "STREAM_FILTER_BYTES", a2 * 96 * 64 * 4)
    assert a2 * 96 * 64 * 4 <= winograd.whole_filter_bytes(m) < a2 * 96 * 128 * 4  # one 64-channel group at a time
    sizes = []
    real_fill = winograd.FilterSource.fill
    monkeypatch.setattr(winograd.FilterSource, "fill", lambda self, u, lo, hi, *a: sizes.append(hi - lo)
                        or real_fill(self, u, lo, hi, *a))
    got = winograd.winograd_conv(x, winograd.FilterSource(W.hwio(w), m), m, 1, b, 200)
    assert sizes == [64, 64, 64, 8]  # 200 channels: 3 groups of 64, then the last 8
    # Each against float64, by test_kernels.py's measure and bound (F(4,3) in fp32: ~1e-6 to 4e-6). Not against
    # each other bit for bit: BLAS sums a group's GEMM in another order than the whole one's (AVX-512 OpenBLAS:
    # up to 2e-5 apart on values of ~2).
    for y in (whole, got):
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


# ----------------------------------------------------------------------------------------- pipelines


def test_one_shot_pipeline_releases_and_matches(sd1_folder):
    """A one-shot pipeline (a run of one batch) builds each model at its first use, releases the text encoder after
    encoding and the UNet after denoising, and makes the same image as an ordinary pipeline."""
    from sdgen.pipeline import Pipeline

    normal = Pipeline.load(sd1_folder)
    want = normal.txt2img("a red circle", seed=3, steps=3)
    lean = Pipeline.load(sd1_folder, one_shot=True)
    assert not lean.unet.built and not lean.vae.built and not lean.text_encoders[0].built
    got = lean.txt2img("a red circle", seed=3, steps=3)
    assert np.array_equal(got, want)
    assert not lean.text_encoders[0].built and not lean.unet.built and lean.vae.built
    again = lean.txt2img("a red circle", seed=3, steps=3)  # released models are built again when used
    assert np.array_equal(again, want)


def test_weights_dtype_pipeline(sd1_folder):
    """fp16 weights give an image within a few grey levels of the fp32 one; the weights are stored in half."""
    from sdgen.pipeline import Pipeline

    full = Pipeline.load(sd1_folder).txt2img("a red circle", seed=3, steps=3).astype(int)
    half = Pipeline.load(sd1_folder, weights_dtype="fp16")
    img = half.txt2img("a red circle", seed=3, steps=3).astype(int)
    assert np.abs(img - full).mean() < 3
    assert half.unet.conv_in.plan.hwio.dtype == np.float16


def test_mapped_weights_kept_as_stored_and_released(tmp_path):
    """Weights load as memory-mapped views in their stored dtype; a tensor a model copies can be released (its
    pages dropped) and still reads correctly afterwards."""
    from safetensors.numpy import save_file

    from sdgen.checkpoint import load_weights

    a = RNG.standard_normal((64, 1024), dtype=np.float32).astype(np.float16)
    b = RNG.standard_normal((3, 5), dtype=np.float32)
    save_file({"a": a, "b": b}, str(tmp_path / "w.safetensors"))
    t = load_weights(tmp_path / "w.safetensors", dtype=None)
    assert t["a"].dtype == np.float16 and not t["a"].flags.writeable and np.array_equal(t["a"], a)
    t.releaser("a")()
    assert np.array_equal(t["a"], a) and np.array_equal(t["b"], b)


# ----------------------------------------------------------------------------------------- estimate and check


def _configs(name: str) -> dict:
    from sdgen.bench import CONFIGS

    root = CONFIGS / name
    return {c: json.loads((root / c / "config.json").read_text())
            for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (root / c / "config.json").exists()}


def test_param_counts_of_the_real_architectures():
    cfg = _configs("sd15")
    assert memory.count_params("unet", cfg["unet"]) == 859_520_964
    assert memory.count_params("text_encoder", cfg["text_encoder"]) == 123_650_304


def test_estimate_and_check():
    cfg = _configs("sd15")
    fp32 = memory.estimate(cfg, "sd", 512, 512, 1, weights_dtype_name="fp32")
    fp16 = memory.estimate(cfg, "sd", 512, 512, 1, weights_dtype_name="fp16")
    assert 3.4 * 2**30 < fp32.peak < 4.2 * 2**30 and fp16.peak < 2.5 * 2**30
    assert memory.estimate(cfg, "sd", 2048, 2048, 1).vae_tiled
    with pytest.raises(OutOfMemoryError, match="--weights-dtype fp16"):
        memory.check(fp32, available=2 * 2**30, weights_dtype_name="fp32")
    memory.check(fp32, available=8 * 2**30)
    big = memory.estimate(cfg, "sd", 2048, 2048, 1, vae_tiling=False)
    with pytest.raises(OutOfMemoryError, match="--vae-tiling on"):
        memory.check(big, available=6 * 2**30)


def test_cli_memory_error_and_override(sd1_folder, tmp_path, monkeypatch):
    """txt2img refuses a run that would not fit, with exit code 5 and the options that help; --no-memory-check
    runs it anyway."""
    from sdgen.cli import main

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    args = ["txt2img", "--model", str(sd1_folder), "-p", "a red circle", "--steps", "2", "--seed", "1", "-q",
            "--output", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 5
    with pytest.raises(SystemExit) as e:
        main(args + ["--no-memory-check", "--weights-dtype", "bf16", "--attention-slicing", "max",
                     "--vae-tiling", "on"])
    assert e.value.code == 0 and (tmp_path / "a.png").exists()
    set_attention_slicing(None)


# ----------------------------------------------------------------------------------------- --conv-filters keep


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_conv_filters_keep_same_images(sd1_folder, dtype):
    """--conv-filters keep (the blocked weights' Winograd filters made once and kept) gives the image of the
    default within a grey level on >= 99% of values, with half-precision weights as stored. The tiny model has no
    blocked weights: every plan makes its filters at each call, as the default does (kernels keep those of large
    layers: test_kept_filters_are_the_made_ones)."""
    from sdgen.models.layers import set_conv_filters
    from sdgen.pipeline import Pipeline

    want = Pipeline.load(sd1_folder, weights_dtype=dtype).txt2img("a red circle", seed=3, steps=3).astype(int)
    set_conv_filters("keep")
    try:
        pipe = Pipeline.load(sd1_folder, weights_dtype=dtype)
    finally:
        set_conv_filters(None)
    got = pipe.txt2img("a red circle", seed=3, steps=3).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    plan = pipe.unet.down_blocks[0].resnets[0].conv1.plan
    assert not plan.cache and plan.blocks is None and not plan.keep_filters and plan.prepared_bytes() == 0
    with pytest.raises(ValueError):
        set_conv_filters("sometimes")


def test_estimate_counts_kept_filters():
    """keep adds the F(4,3) filters (36/9 of float32 weights) of the 3x3 convolutions with 640 channels and up:
    SD 1.5's UNet has 541,002,240 weights in 3x3 convolutions (counted from the diffusers checkpoint's header),
    525,312,000 of them in such layers (all but those with 320 channels in or out); the VAE none."""
    cfg = _configs("sd15")
    shapes = [s for s in memory._shapes("unet", cfg["unet"], whole=True).values() if len(s) == 4 and s[2:] == (3, 3)]
    assert sum(math.prod(s) for s in shapes) == 541_002_240
    big = sum(math.prod(s) for s in shapes if min(s[:2]) >= 640)
    assert big == 525_312_000
    kept = memory.kept_filter_bytes("unet", cfg["unet"])
    assert kept == big * 4 * 36 // 9  # no channel padding in SD's layers
    assert memory.kept_filter_bytes("vae", cfg["vae"]) == 0
    for dtype in ("fp32", "fp16"):  # the weights as stored beside the filters
        make = memory.estimate(cfg, "sd", 512, 512, 1, weights_dtype_name=dtype)
        keep = memory.estimate(cfg, "sd", 512, 512, 1, weights_dtype_name=dtype, conv_filters="keep")
        assert keep.weights["unet"] - make.weights["unet"] == kept


def test_cli_conv_filters_option(sd1_folder, tmp_path):
    from sdgen.cli import main

    args = ["txt2img", "--model", str(sd1_folder), "-p", "a red circle", "--steps", "2", "--seed", "1", "-q",
            "--output", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as e:
        main(args + ["--conv-filters", "always"])
    assert e.value.code == 2 and not (tmp_path / "a.png").exists()
    from sdgen.models.layers import conv_filters, set_conv_filters
    try:
        with pytest.raises(SystemExit) as e:
            main(args + ["--conv-filters", "keep"])
        assert e.value.code == 0 and (tmp_path / "a.png").exists() and conv_filters() == "keep"
    finally:
        set_conv_filters(None)


_REFAULT = """
import resource, sys
import numpy as np
mode, size = sys.argv[1], int(sys.argv[2])
if mode == "keep":
    from sdgen.memory import keep_freed_memory
    assert keep_freed_memory()
if mode == "small":
    from sdgen.memory import small_pages
    assert small_pages()
a = np.ones(size // 4, dtype=np.float32)
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(size // 4, dtype=np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(mode: str, size: int) -> int:
    """Pages faulted in by writing a new array of size bytes after one of that size was freed, in a fresh process
    (mode: "default", "keep" with keep_freed_memory, "small" with small_pages)."""
    out = subprocess.run([sys.executable, "-c", _REFAULT, mode, str(size)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_big_blocks():
    """With keep_freed_memory a freed 64 MB block is reused: writing a new one faults in no fresh pages (the
    system's default maps and zeroes it anew: at least 32 faults, one per 2 MB huge page, 16384 with 4 KB pages).
    The same for a block above 2 GB (the heap top an SDXL VAE decode at 1024x1024 leaves): there glibc's highest
    trim threshold (2 GB) would still give it back, so trimming must be off altogether."""
    default, keep = _refaults("default", 64 << 20), _refaults("keep", 64 << 20)
    assert default >= 32, default
    assert keep < 8, keep
    keep_big = _refaults("keep", (2 << 30) + (64 << 20))
    assert keep_big < 8, keep_big


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or _huge_pages_always(),
                    reason="Linux, huge pages left to madvise (with 'always' the kernel gives them anyway)")
def test_small_pages_fault_in_4k_pages():
    """After small_pages a fresh 64 MB array comes in 4 KB pages (numpy no longer madvises huge pages): 16384
    faults at least, where a huge-page fault would map 2 MB at once (the setting is process-wide: a subprocess)."""
    assert _refaults("small", 64 << 20) >= 16384


# ----------------------------------------------------------------------------------------- --linear-panels


def test_linear_panels_same_images(sd1_folder, tmp_path):
    """--linear-panels on (linear layers from weights packed in panels during the first step) and auto (the tiles
    from the weights as they lie, nothing kept) give the image of off (OpenBLAS) within a grey level on >= 99% of
    values (the products sum in another order), the packed layers having dropped their weights, auto's kept
    theirs, in a run of 10 steps too. The option reaches load_model and the process setting; a bad value is a
    one-line usage error."""
    from sdgen.cli import main
    from sdgen.kernels import panels
    from sdgen.models.layers import linear_panels, set_linear_panels
    from sdgen.pipeline import Pipeline

    def ff(pipe):
        return pipe.unet.down_blocks[0].attentions[0].blocks[0].ff_in

    def close(got, want):
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())

    set_linear_panels("off")
    try:
        want = Pipeline.load(sd1_folder).txt2img("a red circle", seed=3, steps=3)
        want10 = Pipeline.load(sd1_folder).txt2img("a red circle", seed=3, steps=10)
    finally:
        set_linear_panels(None)
    pipe = Pipeline.load(sd1_folder)
    close(pipe.txt2img("a red circle", seed=3, steps=3), want)  # auto
    close(pipe.txt2img("a red circle", seed=3, steps=10), want10)
    assert ff(pipe).panels is None and ff(pipe).weight is not None
    set_linear_panels(True)
    try:
        pipe = Pipeline.load(sd1_folder)
        close(pipe.txt2img("a red circle", seed=3, steps=3), want)
    finally:
        set_linear_panels(None)
    assert (ff(pipe).panels is not None and ff(pipe).weight is None) == panels.AVAILABLE
    args = ["txt2img", "--model", str(sd1_folder), "-p", "a red circle", "--steps", "2", "--seed", "1", "-q",
            "--output", str(tmp_path / "a.png"), "--linear-panels", "on"]
    try:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 0 and (tmp_path / "a.png").exists() and linear_panels() == "on"
    finally:
        set_linear_panels(None)
    with pytest.raises(SystemExit) as e:
        main(args[:-1] + ["always"] + ["--overwrite"])
    assert e.value.code == 2


def test_half_weights_from_the_tiles(sd1_folder, capsys):
    """fp16 weights under auto (the tiles widen each chunk of them as they pack it): a 2-step run's image within a
    grey level of --linear-panels off (OpenBLAS from the weights widened whole), the weights kept as they are; and
    `sdgen bench --json` says which runs packed their layers for good (--linear-panels on), with the fields the
    issue names."""
    import json

    from sdgen.cli import main
    from sdgen.kernels import panels
    from sdgen.models.layers import set_linear_panels
    from sdgen.pipeline import Pipeline

    set_linear_panels("off")
    try:
        want = Pipeline.load(sd1_folder, weights_dtype="fp16").txt2img("a red circle", seed=3, steps=2).astype(int)
    finally:
        set_linear_panels(None)
    pipe = Pipeline.load(sd1_folder, weights_dtype="fp16")
    got = pipe.txt2img("a red circle", seed=3, steps=2).astype(int)
    ff = pipe.unet.down_blocks[0].attentions[0].blocks[0].ff_in
    assert ff.panels is None and ff.weight.dtype == np.float16
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())
    for dtype, mode, packed in (("fp32", "auto", False), ("fp16", "on", panels.AVAILABLE)):
        capsys.readouterr()
        try:
            with pytest.raises(SystemExit) as e:
                main(["bench", "--model", str(sd1_folder), "--steps", "2", "--threads", "1", "--json",
                      "--weights-dtype", dtype, "--linear-panels", mode])
        finally:
            set_linear_panels(None)
        assert e.value.code == 0
        report = json.loads(capsys.readouterr().out)
        assert report["linear_panels"] is packed and report["weights_dtype"] == dtype
        assert report["weights"] == "file" and report["steps"] == 2 and report["threads"] == 1
        for key in ("load_s", "text_encode_s", "unet_step_s", "vae_decode_s", "total_s", "peak_rss_mb"):
            assert report[key] > 0, key
        steps = report["unet_steps_s"]  # each UNet evaluation's time; unet_step_s is the mean of all but the first
        assert len(steps) >= 2 and steps[0] == report["first_step_s"]
        assert abs(sum(steps[1:]) / len(steps[1:]) - report["unet_step_s"]) <= 1e-3
