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
