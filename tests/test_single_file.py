"""Single-file checkpoints (original LDM/SGM names): sdgen's loader against diffusers' ``from_single_file``.

Tiny random-weight SD1, SD2 and SDXL pipelines are saved as diffusers folders, written out as single files with
the original names by ``ldm_export`` (test-only), and loaded both by sdgen and by diffusers (with ``config=`` the
folder, offline): every tensor must be equal, and equal to the folder's own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from ldm_export import export_single_file, read_folder_component, vae_to_ldm  # noqa: E402
from tiny_models import (  # noqa: E402
    SD1_CLIP, SD1_VAE, SD2_UNET, SDXL_UNET, build_sd_folder, make_clip, make_unet, make_vae,
)

from sdgen.checkpoint import canonical_text_encoder_names, load_component  # noqa: E402
from sdgen.checkpoint.single_file import (  # noqa: E402
    default_config_dir, detect_family, load_single_file, load_vae_file,
)
from sdgen.errors import BadModelFileError  # noqa: E402

# SD2's text encoder: OpenCLIP ViT-H in miniature -- gelu, 23 layers used of the 24 stored
SD2_CLIP = dict(SD1_CLIP, hidden_act="gelu", num_hidden_layers=23, intermediate_size=40)
# SDXL: CLIP-L and OpenCLIP bigG of different widths (diffusers tells them apart by width), 24 + 40 = the UNet's
# cross_attention_dim 64; bigG's projection (32) feeds the UNet's add-embedding with 6 time ids of 8.
SDXL_CLIP_L = dict(SD1_CLIP, hidden_size=24, num_hidden_layers=2, intermediate_size=30)
SDXL_CLIP_G = dict(SD1_CLIP, hidden_size=40, num_hidden_layers=3, intermediate_size=50, hidden_act="gelu")


def _tokenizer(path):
    from transformers import CLIPTokenizer

    from sdgen.tokenizer import write_vocab_files
    write_vocab_files(path)
    return CLIPTokenizer.from_pretrained(path)


def build_sd2_folder(path, seed=10):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline(
        vae=make_vae(SD1_VAE, seed + 1), text_encoder=make_clip(SD2_CLIP, seed + 2),
        tokenizer=_tokenizer(path / "_tok"), unet=make_unet(SD2_UNET, seed + 3),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "model", safe_serialization=True)
    return path / "model"


def build_sdxl_folder(path, seed=20):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok = _tokenizer(path / "_tok")
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(SD1_VAE, seed + 1), text_encoder=make_clip(SDXL_CLIP_L, seed + 2),
        text_encoder_2=make_clip(SDXL_CLIP_G, seed + 3, projection_dim=32), tokenizer=tok, tokenizer_2=tok,
        unet=make_unet(SDXL_UNET, seed + 4),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    )
    pipe.save_pretrained(path / "model", safe_serialization=True)
    return path / "model"


BUILDERS = {"sd1": lambda p: build_sd_folder(p, "sd1", seed=30), "sd2": build_sd2_folder,
            "sdxl": build_sdxl_folder}


_BUILT: dict = {}


def _built(family, tmp_path_factory):
    """(family, diffusers folder, single-file checkpoint written from it, its storage dtype), built once."""
    if family not in _BUILT:
        root = tmp_path_factory.mktemp(f"single-{family}")
        folder = BUILDERS[family](root)
        # SD1 as fp16 (as most downloads are): exercises the conversion to float32 on the way in
        dtype = np.float16 if family == "sd1" else np.float32
        path = export_single_file(folder, family, root / f"{family}-model.safetensors", dtype=dtype)
        _BUILT[family] = (family, folder, path, dtype)
    return _BUILT[family]


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def single(request, tmp_path_factory):
    return _built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd1_single(tmp_path_factory):
    return _built("sd1", tmp_path_factory)


def _diffusers_components(family, folder, path) -> dict[str, dict[str, np.ndarray]]:
    """What diffusers' own single-file loader makes of ``path``, configured by ``folder``, offline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        sd = {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
        out[name] = canonical_text_encoder_names(sd) if name.startswith("text_encoder") else sd
    return out


def _assert_same(ours: dict, theirs: dict, what: str) -> None:
    assert sorted(ours) == sorted(theirs), (
        f"{what}: only sdgen {sorted(set(ours) - set(theirs))[:5]}, only reference "
        f"{sorted(set(theirs) - set(ours))[:5]}")
    for name, ref in theirs.items():
        got = ours[name]
        assert got.dtype == np.float32, (what, name, got.dtype)
        assert got.shape == ref.shape, (what, name, got.shape, ref.shape)
        np.testing.assert_array_equal(got, ref, err_msg=f"{what}: {name}")


def test_detect_family(single):
    family, _, path, _ = single
    with safetensors_numpy.safe_open(str(path), "np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert detect_family(shapes) == family
    assert detect_family(list(shapes.items())) == family
    # inpainting UNets take latents + masked-image latents + mask: 9 channels
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = dict(shapes, **{conv_in: (shapes[conv_in][0], 9, 3, 3)})
    assert detect_family(inpaint) == f"{family}-inpaint"
    # without its text encoders the UNet alone still tells the family
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    assert detect_family(unet_only) == family


def test_matches_diffusers_from_single_file(single):
    family, folder, path, dtype = single
    ours = load_single_file(path, config_dir=folder)
    theirs = _diffusers_components(family, folder, path)
    expected = {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert set(ours) == set(theirs) == expected
    for component in expected:
        config, tensors = ours[component]
        assert config == json.loads((folder / component / "config.json").read_text())
        _assert_same(tensors, theirs[component], f"{family} {component}")
        # and the round trip gives back the folder's own weights (rounded through fp16 for SD1's file)
        _, original = load_component(folder, component)
        _assert_same(tensors, {k: v.astype(dtype).astype(np.float32) for k, v in original.items()},
                     f"{family} {component} vs the folder")


def test_bundled_configs_and_component_choice(single):
    family, folder, path, _ = single
    loaded = load_single_file(path, components=["unet", "text_encoder"])
    assert set(loaded) == {"unet", "text_encoder"}
    bundled = default_config_dir(family)
    assert bundled.name == {"sd1": "sd15", "sd2": "sd21-base", "sdxl": "sdxl"}[family]
    assert loaded["unet"][0] == json.loads((bundled / "unet" / "config.json").read_text())
    if family == "sd2":  # 23 of OpenCLIP's 24 layers, no projection (SD2 uses the penultimate layer)
        names = loaded["text_encoder"][1]
        assert "encoder.layers.22.mlp.fc1.weight" in names and "encoder.layers.23.mlp.fc1.weight" not in names
        assert "text_projection.weight" not in names


def test_vae_file_both_formats(sd1_single, tmp_path):
    family, folder, path, _ = sd1_single
    from diffusers import AutoencoderKL
    config, diffusers_sd = read_folder_component(folder, "vae")
    diffusers_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    ldm = vae_to_ldm(diffusers_sd, config)
    safetensors_numpy.save_file(ldm, str(tmp_path / "ldm-prefixed.safetensors"))
    bare = {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}
    bare["model_ema.decay"] = np.array(0.999, dtype=np.float32)  # LDM VAE files may carry such extras
    safetensors_numpy.save_file(bare, str(tmp_path / "ldm-bare.safetensors"))

    reference = AutoencoderKL.from_single_file(str(tmp_path / "ldm-bare.safetensors"), config=str(folder),
                                               subfolder="vae", local_files_only=True)
    reference = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    for file in (diffusers_file, tmp_path / "ldm-prefixed.safetensors", tmp_path / "ldm-bare.safetensors"):
        got_config, tensors = load_vae_file(file, config=config)
        assert got_config == config
        _assert_same(tensors, reference, f"VAE from {file.name}")
    # a whole checkpoint's VAE serves as well (this one is stored in fp16)
    _assert_same(load_vae_file(path, config=config)[1],
                 {k: v.astype(np.float16).astype(np.float32) for k, v in reference.items()}, "VAE of a checkpoint")
    # diffusers' pre-0.14 attention names in a diffusers-format file
    renames = {"attentions.0.to_q.": "attentions.0.query.", "attentions.0.to_k.": "attentions.0.key.",
               "attentions.0.to_v.": "attentions.0.value.", "attentions.0.to_out.0.": "attentions.0.proj_attn."}
    old = {}
    for k, v in diffusers_sd.items():
        for new_name, old_name in renames.items():
            k = k.replace(new_name, old_name)
        old[k] = v
    safetensors_numpy.save_file(old, str(tmp_path / "old-names.safetensors"))
    _assert_same(load_vae_file(tmp_path / "old-names.safetensors")[1], reference, "VAE with old attention names")
    assert load_vae_file(diffusers_file)[0]["scaling_factor"] == 0.18215  # bundled SD1.5 config by default


def _write(path, names_and_shapes):
    safetensors_numpy.save_file({k: np.zeros(s, np.float32) for k, s in names_and_shapes.items()}, str(path))
    return path


def test_unknown_layouts(tmp_path):
    with pytest.raises(BadModelFileError, match=r"no UNet.*model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        detect_family({"foo.weight": (3, 3)})
    with pytest.raises(BadModelFileError, match="LoRA"):
        detect_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)})
    with pytest.raises(BadModelFileError, match="VAE alone"):
        detect_family({"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3)})
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": (32, 80)}
    with pytest.raises(BadModelFileError, match=r"conditioner\.embedders\.1\.model\.\*"):
        detect_family(dict(unet, **{"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,)}))
    with pytest.raises(BadModelFileError, match="8 channels"):
        detect_family({"model.diffusion_model.input_blocks.0.0.weight": (32, 8, 3, 3)})
    # the file's name plays no part, and the message names the file
    bad = _write(tmp_path / "sd_xl_base_1.0.safetensors", {"first_stage_model.foo.weight": (2, 2)})
    with pytest.raises(BadModelFileError, match=r"sd_xl_base_1\.0\.safetensors: .*no UNet"):
        load_single_file(bad)
    with pytest.raises(BadModelFileError, match="not a VAE"):
        load_vae_file(bad)
    with pytest.raises(BadModelFileError, match="pickled"):
        load_single_file(tmp_path / "model.ckpt")


def test_component_missing_or_misfit(sd1_single, tmp_path):
    family, folder, path, _ = sd1_single
    with safetensors_numpy.safe_open(str(path), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    no_vae = _write_arrays(tmp_path / "no-vae.safetensors",
                           {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(BadModelFileError, match=r"has no vae \(no first_stage_model\.\* or vae\.\* tensors\)"):
        load_single_file(no_vae, config_dir=folder)
    assert set(load_single_file(no_vae, config_dir=folder, components=["unet"])) == {"unet"}
    # a UNet that does not fit its config is reported, not silently dropped
    extra = dict(tensors, **{"model.diffusion_model.input_blocks.99.0.in_layers.0.weight": np.zeros(4, np.float16)})
    with pytest.raises(BadModelFileError, match=r"1 tensor not fitting the UNet config.*input_blocks\.99"):
        load_single_file(_write_arrays(tmp_path / "extra.safetensors", extra), config_dir=folder)


def _write_arrays(path, tensors):
    safetensors_numpy.save_file(tensors, str(path))
    return path


def test_inpainting_unet_gets_nine_input_channels(sd1_single, tmp_path):
    _, folder, path, _ = sd1_single
    with safetensors_numpy.safe_open(str(path), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    w = tensors[conv_in]
    tensors[conv_in] = np.concatenate([w, w, w[:, :1]], axis=1)  # 4 + 4 + 1 channels
    inpaint = _write_arrays(tmp_path / "inpaint.safetensors", tensors)
    config, unet = load_single_file(inpaint, config_dir=folder, components=["unet"])["unet"]
    assert config["in_channels"] == 9
    np.testing.assert_array_equal(unet["conv_in.weight"], tensors[conv_in].astype(np.float32))
