"""The bundled ``toy`` model (sdgen/data/toy): its files, its layout, and what it draws.

The semantic test generates every held-out prompt of ``scripts/toy_data.py`` (twelve (shape colour, background
colour) pairs that never appear in training, with any shape) for a few seeds, and checks that the mean colour of
the central region is nearest to the asked-for shape colour and the mean colour of the border frame is nearest to
the asked-for background colour.  A model that ignores the prompt gets at most one of the twelve pairs (8%); random
weights get none.
The images are made by sdgen's own pipeline when ``sdgen.pipeline.Pipeline`` exists, else by diffusers'
``StableDiffusionPipeline`` (both must give the same pictures for the same seed).
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "sdgen" / "data" / "toy"
sys.path.insert(0, str(ROOT / "scripts"))
import toy_data  # noqa: E402

# The model's defaults (what its registry entry uses): 64x64, 20 steps of its own PNDM scheduler, guidance 2.0.
# (Guidance above ~3 breaks this small model: held-out success 94% at 3, 69% at 4, 0% at 7.5.)
SIZE = 64
STEPS = 20
GUIDANCE = 2.0
SEEDS = (0, 1, 2)


def _sdgen_pipeline():
    try:
        from sdgen.pipeline import Pipeline  # type: ignore[attr-defined]
    except ImportError:
        return None
    return Pipeline if hasattr(Pipeline, "load") else None


@lru_cache(maxsize=1)
def _diffusers_pipe():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TOY, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=1)
def _sdgen_pipe():
    return _sdgen_pipeline().load(str(TOY))


def generate(prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
             size: int = SIZE) -> np.ndarray:
    """(B, size, size, 3) uint8 pictures of the toy model, prompts[i] with seeds[i], negative prompt "": by sdgen's
    Pipeline when it has one, else by diffusers (one batch; per-picture generators, so as one call each)."""
    if _sdgen_pipeline() is not None:
        from sdgen import threads

        before = threads.get_threads()
        threads.set_threads(1)  # a tiny model: one thread is as fast, and far faster on a busy machine
        try:
            imgs = _sdgen_pipe().txt2img(list(prompts), negative_prompt=[""] * len(prompts), seed=list(seeds),
                                         steps=steps, guidance=guidance, width=size, height=size)
        finally:
            threads.set_threads(before)
        return np.asarray(imgs, dtype=np.uint8).reshape(len(prompts), size, size, 3)
    import torch

    pipe = _diffusers_pipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and far faster on a busy machine
    try:
        out = pipe(
            list(prompts),
            negative_prompt=[""] * len(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=size,
            height=size,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="np",
        ).images
    finally:
        torch.set_num_threads(threads)
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def _asked(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    return words[1], words[-2]  # "a <fg> <shape> on a <bg> background"


# ----------------------------------------------------------------------------------------------------------------


def test_files_and_size():
    index = json.loads((TOY / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for sub in ("text_encoder", "unet", "vae"):
        assert len(list((TOY / sub).glob("*.safetensors"))) == 1, sub
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (TOY / "tokenizer" / name).is_file()
    assert (TOY / "scheduler" / "scheduler_config.json").is_file()
    assert (TOY / "README.md").is_file()
    assert not list(TOY.rglob("*.bin")) and not list(TOY.rglob("*.pt")) and not list(TOY.rglob("*.ckpt"))
    total = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert total < 12 * 2**20, total


def test_sd1x_architecture():
    unet = json.loads((TOY / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DConditionModel"
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet["mid_block_type"] in (None, "UNetMidBlock2DCrossAttn")
    assert unet["in_channels"] == unet["out_channels"] == 4
    vae = json.loads((TOY / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKL" and vae["latent_channels"] == 4
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == SIZE
    te = json.loads((TOY / "text_encoder" / "config.json").read_text())
    assert te["architectures"] == ["CLIPTextModel"] and te["vocab_size"] == 49408
    assert te["hidden_size"] == unet["cross_attention_dim"]
    sched = json.loads((TOY / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PNDMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert sched["num_train_timesteps"] == 1000 and sched["prediction_type"] == "epsilon"


def test_weights_are_finite_fp16():
    safetensors = pytest.importorskip("safetensors.numpy")
    for f in TOY.rglob("*.safetensors"):
        for name, arr in safetensors.load_file(f).items():
            assert arr.dtype == np.float16, (f, name)
            assert np.isfinite(arr).all(), (f, name)


def test_held_out_prompts_are_held_out():
    train = {toy_data.caption(*t) for t in toy_data.train_triples()}
    assert len(toy_data.HELD_OUT_PROMPTS) == 12
    assert not train & set(toy_data.HELD_OUT_PROMPTS)
    _, captions = toy_data.make_dataset(400, seed=0)
    pairs = {_asked(c) for c in captions}
    assert not pairs & set(toy_data.HELD_OUT_PAIRS)


def test_loads_in_diffusers():
    """The plain diffusers call loads it, in float32 (the configs say float32; the files store float16)."""
    import torch

    pipe = _diffusers_pipe()
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert m.dtype == torch.float32, type(m)
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == SIZE
    ids = pipe.tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 9


# Measured with diffusers at the defaults (64x64, 20 PNDM steps, guidance 2.0): 36/36 for seeds 0-2, 120/120 for
# seeds 0-9 (and 120/120 at guidance 2.5); see the model card.  Asserted a little below, to leave room for other seeds
# or a scheduler's numerics: at least 33 of 36.
MIN_SUCCESS_RATE = 0.9


def test_held_out_prompts_draw_the_asked_colours():
    """For the 12 held-out prompts x 3 seeds (36 pictures) the shape colour (centre) and the background colour
    (border) must both be the asked ones in at least MIN_SUCCESS_RATE (90%) of the pictures; measured: 100%."""
    cases = [(p, s) for p in toy_data.HELD_OUT_PROMPTS for s in SEEDS]
    imgs = generate([p for p, _ in cases], [s for _, s in cases])
    assert imgs.shape == (len(cases), SIZE, SIZE, 3) and imgs.dtype == np.uint8
    results = [(p, s, toy_data.measure_colours(img), _asked(p)) for (p, s), img in zip(cases, imgs)]
    rate = sum(got == want for _, _, got, want in results) / len(results)
    misses = [f"{p!r} seed {s}: got {got}" for p, s, got, want in results if got != want]
    assert rate >= MIN_SUCCESS_RATE, f"success rate {rate:.2f} < {MIN_SUCCESS_RATE}; misses: {misses}"
