"""TAESD (sdgen.models.taesd) against diffusers' AutoencoderTiny: random tiny configs, decoder and encoder, the file
layouts TAESD comes in, and a whole txt2img run decoded with it (diffusers pipeline with vae=AutoencoderTiny)."""

import numpy as np
import pytest
import torch

from sdgen.models.taesd import load_taesd
from sdgen.pipeline import Pipeline
from test_txt2img_sd1 import assert_images_close
from tiny_models import randomize, rel_err

TINY = dict(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,  # diffusers needs equal widths
            num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1), latent_channels=4)

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


def make_taesd(seed=0, **config):
    from diffusers import AutoencoderTiny
    torch.manual_seed(seed)
    return randomize(AutoencoderTiny(**dict(TINY, **config)), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_taesd(3)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_decoder_and_encoder_match_autoencoder_tiny(saved):
    model, folder = saved
    ours = load_taesd(folder)
    latents = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ref = model.decode(latents).sample.numpy()
    out = ours.decode(latents.numpy())
    assert out.shape == ref.shape == (2, 3, 40, 48)
    assert rel_err(out, ref) < 1e-5
    images = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_lat = model.encode(images).latents.numpy()
    assert rel_err(ours.encode(images.numpy()), ref_lat) < 1e-5


def test_file_layouts(saved, tmp_path):
    """The .safetensors alone, and the original TAESD decoder file (nn.Sequential indices after a clamp)."""
    from safetensors.numpy import load_file, save_file

    model, folder = saved
    weights = folder / "diffusion_pytorch_model.safetensors"
    reference = load_taesd(folder)
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    expected = reference.decode(latents)
    alone = tmp_path / "taesd.safetensors"
    alone.write_bytes(weights.read_bytes())
    assert np.array_equal(load_taesd(alone).decode(latents), expected)
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v
                for k, v in load_file(str(weights)).items() if k.startswith("decoder.layers.")}
    save_file(original, str(tmp_path / "taesd_decoder.safetensors"))
    decoder_only = load_taesd(tmp_path / "taesd_decoder.safetensors")
    assert decoder_only.encoder is None
    assert np.array_equal(decoder_only.decode(latents), expected)


def test_txt2img_with_taesd_matches_diffusers(tiny_sd1, saved, tmp_path):
    """The tiny TAESD in place of the VAE: the same pixels as diffusers' pipeline with vae=AutoencoderTiny."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    _, folder = saved
    ours = Pipeline.load(tiny_sd1, taesd=folder).txt2img("a snowy village", seed=4, steps=3, guidance=6.0, width=48,
                                                         height=48)
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd1, vae=AutoencoderTiny.from_pretrained(folder),
                                                  safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    out = ref("a snowy village", num_inference_steps=3, guidance_scale=6.0, width=48, height=48, output_type="np",
              generator=torch.Generator().manual_seed(4))
    assert_images_close(ours, (out.images[0] * 255).round().astype(np.uint8))


def test_cli_taesd(tiny_sd1, saved, tmp_path):
    from test_cli import pixels, sdgen

    _, folder = saved
    result = sdgen("txt2img", "-m", tiny_sd1, "-p", "a kite", "--taesd", folder, "--seed", "2", "-t", "1",
                   "--steps", "2", "-W", "32", "-H", "32", "-o", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = Pipeline.load(tiny_sd1, taesd=folder).txt2img("a kite", seed=2, steps=2, width=32, height=32)
    assert np.abs(pixels(tmp_path / "out.png") - ours.astype(np.int16)).max() <= 1
