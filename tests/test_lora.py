"""LoRA merging against diffusers' load_lora_weights + fuse_lora on tiny models with random LoRAs.

Formats: kohya/A1111 (SD1 with LoCon convolutions and per-layer alphas, SDXL with SGM UNet names and both text
encoders) and diffusers/PEFT (SD2, with the PEFT config in the file's metadata). Merged tensors are compared with
the fused reference tensor by tensor; whole images within 1 grey level (test_txt2img_sd1.assert_images_close).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_reference import fuse_reference, kohya_lora, peft_lora, save
from sdgen.errors import BadModelFileError, UsageError
from sdgen.lora import LoraRequest, merge_loras, parse_lora_option
from sdgen.pipeline import Pipeline, open_model
from test_txt2img_sd1 import assert_images_close
from tiny_models import build_sd_folder

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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_sd_folder(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return get


def _reference(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def fused(folders, tmp_path_factory):
    """(LoRA file, diffusers pipeline with it fused) per case, made once: the file written from the model's own
    layer shapes, the reference fused by diffusers (see lora_reference.fuse_reference)."""
    cache = {}

    def get(family, kind, scale):
        key = (family, kind, scale)
        if key not in cache:
            folder = folders(family)
            ref = _reference(folder)
            path = tmp_path_factory.mktemp("lora") / f"{family}-{kind}.safetensors"
            if kind == "kohya":
                lora = save(kohya_lora(ref, family), path)
            else:
                tensors, meta = peft_lora(ref, convs=True)
                lora = save(tensors, path, meta)
            fuse_reference(ref, lora, scale, family)
            cache[key] = lora, ref
        return cache[key]
    return get


def _reference_image(pipe, prompt, seed, steps, guidance, size):
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


CASES = [("sd1", "kohya", 0.7), ("sd2", "peft", 1.0), ("sdxl", "kohya", 0.8)]


@pytest.mark.parametrize("family,kind,scale", CASES)
def test_merged_weights_match_diffusers_fuse_lora(folders, fused, family, kind, scale):
    folder = folders(family)
    lora, ref = fused(family, kind, scale)
    src = open_model(folder)
    merged, report = merge_loras(src.components, [LoraRequest(lora, scale)])
    counts = report.layers[str(lora)]
    assert counts["unet"] > 20 and counts["text_encoder"] > 20
    if family == "sdxl":
        assert counts["text_encoder_2"] > 20
    changed = 0
    for component in counts:
        ref_sd = {k.removeprefix("text_model."): v for k, v in getattr(ref, component).state_dict().items()}
        original = src.components[component][1]
        for key, ours in merged[component][1].items():
            if ours is original[key]:
                continue
            changed += 1
            theirs = ref_sd[key].detach().numpy()
            np.testing.assert_allclose(ours, theirs.reshape(ours.shape), rtol=1e-5, atol=1e-6, err_msg=key)
            assert np.abs(ours - original[key]).max() > 1e-3, key  # the LoRA did change it
    assert changed == sum(counts.values())


@pytest.mark.parametrize("family,kind,scale", CASES[:2])  # SDXL: tensors above suffice, images cost time
def test_image_with_lora_matches_diffusers(folders, fused, family, kind, scale):
    folder = folders(family)
    lora, ref = fused(family, kind, scale)
    prompt = "a cozy cabin in the woods"
    expected = _reference_image(ref, prompt, seed=3, steps=2, guidance=6.0, size=48)
    ours = Pipeline.load(folder, loras=[(lora, scale)]).txt2img(prompt, seed=3, steps=2, guidance=6.0, width=48,
                                                                height=48)
    assert_images_close(ours, expected)
    plain = Pipeline.load(folder).txt2img(prompt, seed=3, steps=2, guidance=6.0, width=48, height=48)
    assert (plain != ours).mean() > 0.05  # the LoRA shows (the tensor test above measures it)


def _outputs(pipe):
    """What the LoRA-changed models compute: text conditioning and one UNet evaluation (cheaper than images)."""
    cond = pipe.encode_prompt(["a lighthouse"], [None], guided=False)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    return cond.context, pipe.unet(x, 500, cond.context)


def test_switching_loras_rebuilds_from_the_original_weights(folders, fused, tmp_path):
    folder = folders("sd1")
    pipe_ref = fused(*CASES[0])[1]  # (only its layer shapes are used)
    a = save(kohya_lora(pipe_ref, "sd1", seed=5), tmp_path / "a.safetensors")
    b = save(kohya_lora(pipe_ref, "sd1", seed=6, convs=False), tmp_path / "b.safetensors")
    pipe = Pipeline.load(folder, loras=[(a, 1.0)])
    with_a = _outputs(pipe)
    for loras in ([(b, 0.5), (a, 0.3)], [], [str(a)]):
        pipe.set_loras(loras)
        expected = with_a if loras == [str(a)] else _outputs(Pipeline.load(folder, loras=loras))
        for ours, theirs in zip(_outputs(pipe), expected):
            assert np.array_equal(ours, theirs)
    assert pipe.loras == [LoraRequest(a, 1.0)]


def test_bad_lora_files_are_refused(folders, tmp_path):
    folder = folders("sd1")
    src = open_model(folder)
    with pytest.raises(BadModelFileError, match="pickled"):
        merge_loras(src.components, [LoraRequest(tmp_path / "x.ckpt")])
    wrong = save({"lora_unet_nowhere_to_q.lora_down.weight": np.zeros((2, 32), np.float32),
                  "lora_unet_nowhere_to_q.lora_up.weight": np.zeros((32, 2), np.float32)}, tmp_path / "w.safetensors")
    with pytest.raises(BadModelFileError, match="fits no layer"):
        merge_loras(src.components, [LoraRequest(wrong)])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    misfit = save({key + ".lora_down.weight": np.zeros((2, 48), np.float32),
                   key + ".lora_up.weight": np.zeros((32, 2), np.float32)}, tmp_path / "m.safetensors")
    with pytest.raises(BadModelFileError, match="does not fit"):
        merge_loras(src.components, [LoraRequest(misfit)])
    loha = save({key + ".hada_w1_a": np.zeros((2, 2), np.float32)}, tmp_path / "loha.safetensors")
    with pytest.raises(BadModelFileError, match="LoHa"):
        merge_loras(src.components, [LoraRequest(loha)])


def test_parse_lora_option():
    assert parse_lora_option("style.safetensors") == LoraRequest(Path("style.safetensors"), 1.0)
    assert parse_lora_option("dir/style.safetensors:0.6") == LoraRequest(Path("dir/style.safetensors"), 0.6)
    assert parse_lora_option("C:/loras/x.safetensors") == LoraRequest(Path("C:/loras/x.safetensors"), 1.0)
    assert parse_lora_option("x.safetensors:-1") == LoraRequest(Path("x.safetensors"), -1.0)
    with pytest.raises(UsageError):
        parse_lora_option("x.safetensors:1.2.3")



def test_cli_lora_and_clip_skip(folders, fused, tmp_path):
    """``--lora PATH:SCALE`` and ``--clip-skip N`` (web-UI numbering: N - 1 layers skipped)."""
    from sdgen.image import read_parameters
    from test_cli import assert_one_line_error, pixels, sdgen

    folder = folders("sd1")
    lora = save(kohya_lora(fused(*CASES[0])[1], "sd1", seed=8), tmp_path / "style.safetensors")
    result = sdgen("txt2img", "-m", folder, "-p", "a harbour", "--lora", f"{lora}:0.5", "--clip-skip", "2",
                   "--seed", "1", "-t", "1", "--steps", "2", "-W", "32", "-H", "32", "-o", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe = Pipeline.load(folder, loras=[(lora, 0.5)])
    pipe.clip_skip = 1
    ours = pipe.txt2img("a harbour", seed=1, steps=2, width=32, height=32)
    assert np.abs(pixels(tmp_path / "out.png") - ours.astype(np.int16)).max() <= 1
    assert "Clip skip: 2" in read_parameters(tmp_path / "out.png")
    assert_one_line_error(sdgen("txt2img", "-m", folder, "-p", "x", "--lora", "nowhere.safetensors", cwd=tmp_path),
                          2, "nowhere.safetensors")


def test_merge_into_weights_held_in_half_precision(folders, fused):
    """Tensors as stored in fp16/bf16 files (bf16 as uint16 bits): the merged layers become float32 sums of the
    exact stored values and the update."""
    from sdgen.checkpoint import bf16_to_f32

    folder = folders("sd1")
    lora = fused(*CASES[0])[0]
    components = open_model(folder).components
    cfg, tensors = components["unet"]
    half = {k: np.asarray(v, np.float32).astype(np.float16) for k, v in tensors.items()}
    bf16 = {k: (np.asarray(v, np.float32).view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}
    for stored, widen in ((half, lambda t: t.astype(np.float32)), (bf16, bf16_to_f32)):
        merged, _ = merge_loras(dict(components, unet=(cfg, stored)), [LoraRequest(lora, 0.7)])
        reference, _ = merge_loras(dict(components, unet=(cfg, {k: widen(v) for k, v in stored.items()})),
                                   [LoraRequest(lora, 0.7)])
        for key, value in merged["unet"][1].items():
            if value is not stored[key]:
                assert value.dtype == np.float32
                np.testing.assert_array_equal(value, reference["unet"][1][key])
