"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionInpaintPipeline (9-channel inpainting UNet, and an ordinary 4-channel one), same tiny models, seeds,
images. Tolerance as everywhere: 1 grey level on 99% of the pixel values.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sdgen.errors import UsageError
from sdgen.pipeline import Pipeline
from test_txt2img_sd1 import assert_images_close
from tiny_models import build_sd_folder, diffusers_pipeline

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One Numba/BLAS thread and one torch thread: on a busy 2-core machine parallel loops on two threads are many
    times slower than on one (see test_cli.py), and these models are tiny."""
    from sdgen.threads import set_threads
    torch_threads = torch.get_num_threads()
    set_threads(1)
    torch.set_num_threads(1)
    yield
    set_threads(None)
    torch.set_num_threads(torch_threads)


def init_image(width=70, height=60, seed=0):
    """A smooth colourful picture (a VAE-friendly init image), deliberately not a multiple of 8 wide."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([128 + 100 * np.sin(x / 9 + rng.uniform(0, 3)), 128 + 100 * np.cos(y / 7 + rng.uniform(0, 3)),
                    128 + 90 * np.sin((x + y) / 11)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def mask_image(width=64, height=56):
    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 3: width - 8] = 255
    return m


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_sd_folder(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return get


def _reference(folder, cls_name, scheduler):
    """A diffusers pipeline of class cls_name sharing the cached pipeline's models, with a fresh scheduler."""
    import diffusers

    base, config = diffusers_pipeline(folder)
    pipe = getattr(diffusers, cls_name).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    cls, options = scheduler or (config["_class_name"], {})
    pipe.scheduler = getattr(diffusers, cls).from_config(config, **options)
    return pipe


def _run(pipe, **kwargs):
    seed = kwargs.pop("seed")
    out = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return (out.images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler,ours_name,strength,steps", [
    (None, None, 0.6, 5),                                            # PNDM, the model's own
    (("EulerAncestralDiscreteScheduler", {}), "euler_a", 0.75, 4),   # set_begin_index + noise in every step
])
def test_sd_img2img_matches_diffusers(folders, scheduler, ours_name, strength, steps):
    folder = folders("sd1")
    image = init_image()
    ours = Pipeline.load(folder).img2img("a mountain lake at dawn", image, strength=strength, seed=7, steps=steps,
                                         guidance=7.0, scheduler=ours_name)
    assert ours.shape == (56, 64, 3)  # the image's size rounded down to a multiple of 8
    ref = _run(_reference(folder, "StableDiffusionImg2ImgPipeline", scheduler), prompt="a mountain lake at dawn",
               image=Image.fromarray(image), strength=strength, num_inference_steps=steps, guidance_scale=7.0,
               seed=7)
    assert_images_close(ours, ref)


def test_sdxl_img2img_matches_diffusers(folders):
    folder = folders("sdxl")
    image = init_image(64, 48, seed=1)
    ours = Pipeline.load(folder).img2img("a red fox in the snow", image, strength=0.5, seed=3, steps=4, guidance=5.0)
    ref = _run(_reference(folder, "StableDiffusionXLImg2ImgPipeline", None), prompt="a red fox in the snow",
               image=Image.fromarray(image), strength=0.5, num_inference_steps=4, guidance_scale=5.0, seed=3)
    assert_images_close(ours, ref)


@pytest.mark.parametrize("family,strength", [("sd1-inpaint", 1.0), ("sd1-inpaint", 0.7), ("sd1", 0.8),
                                             ("sdxl", 0.75)])
def test_inpainting_matches_diffusers(folders, family, strength):
    folder = folders(family)
    image, mask = init_image(48, 40, seed=2), mask_image(48, 40)
    ours = Pipeline.load(folder).img2img("a wooden boat", image, strength=strength, mask=mask, seed=5, steps=4,
                                         guidance=6.0, negative_prompt="blurry")
    cls = "StableDiffusionXLInpaintPipeline" if family == "sdxl" else "StableDiffusionInpaintPipeline"
    ref = _run(_reference(folder, cls, None), prompt="a wooden boat",
               negative_prompt="blurry", image=Image.fromarray(image), mask_image=Image.fromarray(mask),
               strength=strength, num_inference_steps=4, guidance_scale=6.0, seed=5,
               width=48, height=40)  # (diffusers' inpainting defaults to the model's size, sdgen to the image's)
    assert_images_close(ours, ref)


def test_strength_is_checked(folders):
    pipe = Pipeline.load(folders("sd1"))
    with pytest.raises(UsageError, match="strength"):
        pipe.img2img("x", init_image(), strength=1.5, steps=4)
    with pytest.raises(UsageError, match="no step"):
        pipe.img2img("x", init_image(), strength=0.1, steps=4)


# ------------------------------------------------------------------------------------------- command line
def test_cli_img2img_with_mask(folders, tmp_path):
    """``sdgen img2img``: txt2img's options plus --init-image/--strength/--mask; the image the Python API makes."""
    from sdgen.image import read_parameters
    from test_cli import pixels, sdgen

    folder = folders("sd1-inpaint")
    image, mask = init_image(40, 32, seed=4), mask_image(40, 32)
    Image.fromarray(image).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = sdgen("img2img", "-m", folder, "-p", "a stone bridge", "-i", "init.png", "--mask", "mask.png",
                   "--strength", "0.8", "--seed", "9", "--steps", "3", "-t", "1", "-o", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = Pipeline.load(folder).img2img("a stone bridge", image, strength=0.8, mask=mask, seed=9, steps=3)
    assert np.abs(pixels(tmp_path / "out.png") - ours.astype(np.int16)).max() <= 1
    assert "Denoising strength: 0.8" in read_parameters(tmp_path / "out.png")


def test_cli_img2img_bad_input(folders, tmp_path):
    from test_cli import assert_one_line_error, sdgen

    folder = folders("sd1")
    Image.fromarray(init_image(32, 32)).save(tmp_path / "init.png")
    assert_one_line_error(sdgen("img2img", "-m", folder, "-p", "x", "-i", "init.png", "--strength", "0", cwd=tmp_path),
                          2, "--strength")
    assert_one_line_error(sdgen("img2img", "-m", folder, "-p", "x", "-i", "missing.png", cwd=tmp_path), 2,
                          "missing.png")
