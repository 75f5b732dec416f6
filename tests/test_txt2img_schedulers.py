"""Whole images with every scheduler beyond the five of test_txt2img_sd1.py, against diffusers'
StableDiffusionPipeline with the same tiny model, prompt, seed and scheduler (built from the model's scheduler config
with the options the name stands for, as a diffusers user would).

Tolerance, as in test_txt2img_sd1.py: at most 1 grey level of difference on at least 99% of pixel values. Few steps
and 64x48 images keep it cheap; the diffusers pipeline is loaded once for the module.
"""

import pytest

from sdgen.pipeline import Pipeline
from test_txt2img_sd1 import assert_images_close
from tiny_models import DiffusersSD

# sdgen scheduler name -> (diffusers class, from_config options, extra pipeline call options)
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}, {}),
    "lms karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    "heun": ("HeunDiscreteScheduler", {}, {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}, {}),
    "dpm2 a karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    "dpm++ 2s": ("DPMSolverSinglestepScheduler", {}, {}),
    "dpm++ 2m sde karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, {}),
    "deis": ("DEISMultistepScheduler", {}, {}),
    "unipc": ("UniPCMultistepScheduler", {}, {}),
    "lcm": ("LCMScheduler", {}, {}),
    # TCD's gamma: our default 0.3 is diffusers' step() default; the SD pipeline passes its own eta (default 0)
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}),
}
# two model calls per step: fewer steps
TWO_STAGE = {"heun", "dpm2", "dpm2 a karras"}
PROMPT = "a photo of an astronaut riding a horse on mars"


@pytest.fixture(scope="module")
def pipe(tiny_sd1):
    return Pipeline.load(tiny_sd1)


@pytest.fixture(scope="module")
def reference(tiny_sd1):
    return DiffusersSD(tiny_sd1)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(pipe, reference, scheduler):
    cls, options, call_options = SCHEDULERS[scheduler]
    steps = 3 if scheduler in TWO_STAGE else 4
    ours = pipe.txt2img(PROMPT, seed=5, steps=steps, guidance=7.5, width=64, height=48, scheduler=scheduler)
    ref = reference.txt2img(PROMPT, (cls, options), seed=5, steps=steps, guidance=7.5, width=64, height=48,
                            **call_options)[0]
    assert_images_close(ours, ref)

