"""Tiny random-weight models of the real architectures, built with diffusers/transformers (test-only dependencies).

Widths are tiny so the tests are fast; the structure (block types, attention, skip wiring, norms) is the real one.
"""

from __future__ import annotations

import numpy as np
import torch

SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
# SD2-style: linear projections, per-level head counts; SDXL-style: several transformer layers per block + time ids
SD2_UNET = dict(SD1_UNET, use_linear_projection=True, attention_head_dim=(2, 4, 4))
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4, 8), use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
)
SD1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    norm_num_groups=32, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD1_CLIP = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=1,
)


def seeded(seed: int = 0):
    torch.manual_seed(seed)
    np.random.seed(seed)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Give every parameter random values (diffusers zero-initialises some output layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1) if p.ndim >= 2 else p.shape[0]
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
    return module.eval()


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel
    return randomize(UNet2DConditionModel(**config), seed)


def make_vae(config: dict = SD1_VAE, seed: int = 0):
    from diffusers import AutoencoderKL
    return randomize(AutoencoderKL(**config), seed)


def make_clip(config: dict = SD1_CLIP, seed: int = 0, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    if projection_dim is None:
        return randomize(CLIPTextModel(CLIPTextConfig(**config)), seed)
    return randomize(CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=projection_dim)), seed)


def state_dict_numpy(module: torch.nn.Module, strip_prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in module.state_dict().items():
        if strip_prefix and k.startswith(strip_prefix):
            k = k[len(strip_prefix):]
        out[k] = v.detach().float().numpy().copy()
    return out


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
)


SD2_CLIP = dict(SD1_CLIP, hidden_act="gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
XL_CLIP_1 = dict(SD1_CLIP)
XL_CLIP_2 = dict(SD1_CLIP, hidden_act="gelu", num_hidden_layers=4, intermediate_size=41)

# family -> how its tiny folder is built: (unet config, scheduler class, scheduler options, text encoders, pads)
FAMILIES = {
    "sd1": (SD1_UNET, "PNDMScheduler", {}),
    "sd2": (SD2_UNET, "PNDMScheduler", {}),                                              # sd21-base style
    "sd2-v": (SD2_UNET, "DDIMScheduler", {"prediction_type": "v_prediction"}),           # sd21 (768-v) style
    "sdxl": (SDXL_UNET, "EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    "sdxl-turbo": (SDXL_UNET, "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "sd-turbo": (SD2_UNET, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    # an inpainting model: the UNet also takes the mask and the masked image's latents (4 + 1 + 4 channels)
    "sd1-inpaint": (dict(SD1_UNET, in_channels=9), "PNDMScheduler", {}),
}


def build_sd_folder(path, family: str = "sd1", seed: int = 0):
    """Save a tiny pipeline of the family with diffusers' save_pretrained (safetensors) and return its folder."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdgen.tokenizer import write_vocab_files

    unet_cfg, sched_cls, sched_opts = FAMILIES[family]
    scheduler = getattr(diffusers, sched_cls).from_config(dict(SD15_SCHEDULER, **sched_opts))

    def tokenizer(pad):
        tok_dir = path / f"_tokenizer_src_{'bang' if pad == '!' else 'eot'}"
        write_vocab_files(tok_dir, pad_token=pad)
        return CLIPTokenizer.from_pretrained(tok_dir)

    vae, unet = make_vae(SD1_VAE, seed + 1), make_unet(unet_cfg, seed + 3)
    if family.startswith("sdxl"):
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=make_clip(XL_CLIP_1, seed + 2), tokenizer=tokenizer("<|endoftext|>"),
            text_encoder_2=make_clip(XL_CLIP_2, seed + 4, projection_dim=32), tokenizer_2=tokenizer("!"),
        )
    else:
        sd2 = family.startswith("sd2") or family == "sd-turbo"
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=make_clip(SD2_CLIP if sd2 else SD1_CLIP, seed + 2),
            tokenizer=tokenizer("!" if sd2 else "<|endoftext|>"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    out = path / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


_LOADED = {}


def diffusers_pipeline(path):
    """The reference pipeline for a folder (loaded once per test session)."""
    from diffusers import DiffusionPipeline

    key = str(path)
    if key not in _LOADED:
        pipe = DiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        _LOADED[key] = (pipe, pipe.scheduler.config)
    return _LOADED[key]


def diffusers_txt2img(path, prompt, scheduler=None, seed=0, steps=4, guidance=7.5, width=None, height=None,
                      negative_prompt=None):
    """The reference: diffusers' StableDiffusionPipeline on the CPU, uint8 pixels as its PIL output would have."""
    import diffusers

    pipe, original_config = diffusers_pipeline(path)
    if scheduler is not None:
        cls, options = scheduler
        pipe.scheduler = getattr(diffusers, cls).from_config(original_config, **options)
    else:
        pipe.scheduler = getattr(diffusers, original_config["_class_name"]).from_config(original_config)
    out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
               width=width, height=height, generator=torch.Generator().manual_seed(seed), output_type="np")
    return (out.images * 255).round().astype(np.uint8)


class DiffusersSD:
    """diffusers' StableDiffusionPipeline loaded once (loading dominates a tiny model's run), driven with any
    scheduler: each call builds the scheduler from the model's own scheduler config, as diffusers_txt2img does."""

    def __init__(self, path):
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.default_scheduler = self.pipe.scheduler

    def txt2img(self, prompt, scheduler=None, seed=0, steps=4, guidance=7.5, width=None, height=None,
                negative_prompt=None, **call_options):
        """uint8 pixels (B, H, W, 3) as diffusers_txt2img returns them; scheduler = (class name, options) or None;
        call_options go to the pipeline call (e.g. eta)."""
        import diffusers

        base = self.default_scheduler
        if scheduler is None:
            self.pipe.scheduler = base
        else:
            cls, options = scheduler
            self.pipe.scheduler = getattr(diffusers, cls).from_config(base.config, **options)
        out = self.pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                        width=width, height=height, generator=torch.Generator().manual_seed(seed), output_type="np",
                        **call_options)
        return (out.images * 255).round().astype(np.uint8)
