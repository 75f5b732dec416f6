"""Every model family end to end against diffusers: SD 2.x (epsilon and v-prediction), SDXL (two text encoders,
pooled embedding, size/crop ids; at a non-square size), and the turbo models (no guidance, trailing spacing).

Tolerance as in test_txt2img_sd1.py: at most 1 grey level on at least 99% of pixel values.
"""

import numpy as np
import pytest

from sdgen.pipeline import Pipeline
from test_txt2img_sd1 import assert_images_close
from tiny_models import build_sd_folder, diffusers_txt2img

CASES = [
    # family, width, height, steps, guidance, negative prompt
    ("sd1", 64, 64, 3, 7.5, None),
    ("sd2", 64, 64, 4, 7.5, "ugly"),
    ("sd2-v", 64, 48, 4, 7.5, None),
    ("sdxl", 64, 64, 4, 5.0, None),        # zeroed unconditional embeddings (force_zeros_for_empty_prompt)
    ("sdxl", 48, 80, 4, 5.0, "blurry"),    # non-square: the time ids carry (80, 48)
    ("sdxl-turbo", 64, 64, 2, 0.0, None),
    ("sd-turbo", 64, 64, 1, 0.0, None),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_sd_folder(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return get


@pytest.mark.parametrize("family,width,height,steps,guidance,negative", CASES)
def test_family_txt2img_matches_diffusers(folders, family, width, height, steps, guidance, negative):
    folder = folders(family)
    prompt = "a cinematic photo of a lighthouse in a storm"
    ours = Pipeline.load(folder).txt2img(prompt, negative_prompt=negative, seed=11, steps=steps, guidance=guidance,
                                         width=width, height=height)
    ref = diffusers_txt2img(folder, prompt, negative_prompt=negative, seed=11, steps=steps, guidance=guidance,
                            width=width, height=height)[0]
    assert_images_close(ours, ref)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_gives_the_same_image_as_the_folder(folders, tmp_path, family):
    """The same weights as a single LDM/SGM-named .safetensors (configs from the folder, as diffusers'
    from_single_file(config=...)): identical pixels, since identical tensors go through identical code."""
    from ldm_export import export_single_file

    folder = folders(family)
    single = export_single_file(folder, family, tmp_path / f"{family}.safetensors")
    kwargs = dict(seed=5, steps=3, guidance=6.0, width=64, height=64)
    from_folder = Pipeline.load(folder).txt2img("a watercolor fox", **kwargs)
    from_file = Pipeline.load(single, config_dir=folder).txt2img("a watercolor fox", **kwargs)
    assert np.array_equal(from_folder, from_file)


def test_vae_override_matches_diffusers_with_that_vae(folders, tmp_path):
    """--vae PATH: the model's VAE replaced by another one (here: different random weights, diffusers format)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from tiny_models import SD1_VAE, make_vae

    folder = folders("sd1")
    make_vae(SD1_VAE, seed=99).save_pretrained(tmp_path / "vae", safe_serialization=True)
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    ours = Pipeline.load(folder, vae=vae_file).txt2img("a castle", seed=2, steps=3, guidance=7.0)
    ref_pipe = StableDiffusionPipeline.from_pretrained(folder, vae=AutoencoderKL.from_pretrained(tmp_path / "vae"),
                                                       safety_checker=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    out = ref_pipe("a castle", num_inference_steps=3, guidance_scale=7.0, output_type="np",
                   generator=torch.Generator().manual_seed(2))
    assert_images_close(ours, (out.images[0] * 255).round().astype(np.uint8))


def test_cli_config_chooses_a_single_files_configs(folders, tmp_path):
    """--config: an SD 2.x v-prediction single file run with its configs (here the folder's: tiny models do not fit
    the bundled full-size ones, e.g. sd21) gives the folder's image exactly; read with the configs of an epsilon
    model of the same architecture (what SD 2.x files default to) it gives another image -- which is why the
    option exists. Bad values are one-line usage errors."""
    from ldm_export import export_single_file
    from test_cli import assert_one_line_error, pixels, sdgen

    folder = folders("sd2-v")
    single = export_single_file(folder, "sd2", tmp_path / "sd2v.safetensors")
    args = ["-p", "a watercolor fox", "--seed", "5", "--steps", "3", "-W", "64", "-H", "64", "-t", "1"]
    runs = {"folder": ["-m", folder], "configured": ["-m", single, "--config", folder],
            "epsilon": ["-m", single, "--config", folders("sd2")]}
    for name, model in runs.items():
        result = sdgen("txt2img", *model, *args, "-o", f"{name}.png", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(pixels(tmp_path / "configured.png"), pixels(tmp_path / "folder.png"))
    assert np.abs(pixels(tmp_path / "epsilon.png") - pixels(tmp_path / "folder.png")).max() > 10
    bad = sdgen("txt2img", "-m", single, *args, "--config", "sd99", "-o", "x.png", cwd=tmp_path)
    assert_one_line_error(bad, 2, "--config sd99", "sd21-base")
    on_folder = sdgen("txt2img", "-m", folder, *args, "--config", "sd21", "-o", "x.png", cwd=tmp_path)
    assert_one_line_error(on_folder, 2, "single-file")
    assert not (tmp_path / "x.png").exists()
