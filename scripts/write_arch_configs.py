"""Write the full-size architecture configs (no weights) that sdgen ships in sdgen/data/configs/<name>/.

They are the configs of the public hub models, in the diffusers folder layout, so that `sdgen bench --random-weights`
and the full-size comparison scripts can build the real architectures on machines without the weights.
Run: python scripts/write_arch_configs.py
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sdgen" / "data" / "configs"

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SD_UNET = dict(
    _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    sample_size=64,
)
SD2_UNET = dict(SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=False)
SDXL_UNET = dict(
    SD_UNET, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, sample_size=128,
)
VAE = dict(
    _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3,
    out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_act="quick_gelu", hidden_size=768,
    intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
    vocab_size=49408, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768,
)
OPENCLIP_H = dict(CLIP_L, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                  num_hidden_layers=23, projection_dim=512)
OPENCLIP_BIGG = dict(CLIP_L, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                     intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)


def sd_index(pipeline: str, xl: bool = False) -> dict:
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "X"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return index


MODELS = {
    "sd15": dict(index=sd_index("StableDiffusionPipeline"), unet=SD_UNET, vae=VAE, text_encoder=CLIP_L,
                 scheduler=dict(BETAS, _class_name="PNDMScheduler", set_alpha_to_one=False, skip_prk_steps=True,
                                steps_offset=1, clip_sample=False)),
    "sd21": dict(index=sd_index("StableDiffusionPipeline"), unet=dict(SD2_UNET, sample_size=96),
                 vae=dict(VAE, sample_size=768), text_encoder=OPENCLIP_H,
                 scheduler=dict(BETAS, _class_name="DDIMScheduler", prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)),
    "sd21-base": dict(index=sd_index("StableDiffusionPipeline"), unet=SD2_UNET, vae=VAE, text_encoder=OPENCLIP_H,
                      scheduler=dict(BETAS, _class_name="PNDMScheduler", prediction_type="epsilon",
                                     set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)),
    "sd-turbo": dict(index=sd_index("StableDiffusionPipeline"), unet=SD2_UNET, vae=VAE, text_encoder=OPENCLIP_H,
                     scheduler=dict(BETAS, _class_name="EulerDiscreteScheduler", prediction_type="epsilon",
                                    timestep_spacing="trailing", steps_offset=1, interpolation_type="linear",
                                    use_karras_sigmas=False)),
    "sdxl": dict(index=sd_index("StableDiffusionXLPipeline", xl=True), unet=SDXL_UNET,
                 vae=dict(VAE, sample_size=1024, scaling_factor=0.13025), text_encoder=CLIP_L,
                 text_encoder_2=OPENCLIP_BIGG,
                 scheduler=dict(BETAS, _class_name="EulerDiscreteScheduler", prediction_type="epsilon",
                                timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                                use_karras_sigmas=False)),
    "sdxl-turbo": dict(index=sd_index("StableDiffusionXLPipeline", xl=True), unet=dict(SDXL_UNET, sample_size=64),
                       vae=dict(VAE, sample_size=512, scaling_factor=0.13025), text_encoder=CLIP_L,
                       text_encoder_2=OPENCLIP_BIGG,
                       scheduler=dict(BETAS, _class_name="EulerAncestralDiscreteScheduler", prediction_type="epsilon",
                                      timestep_spacing="trailing", steps_offset=1)),
}


def main() -> None:
    for name, parts in MODELS.items():
        root = OUT / name
        index = dict(parts["index"])
        index["scheduler"] = ["diffusers", parts["scheduler"]["_class_name"]]
        files = {"model_index.json": index, "unet/config.json": parts["unet"], "vae/config.json": parts["vae"],
                 "text_encoder/config.json": parts["text_encoder"],
                 "scheduler/scheduler_config.json": parts["scheduler"]}
        if "text_encoder_2" in parts:
            files["text_encoder_2/config.json"] = parts["text_encoder_2"]
        for rel, content in files.items():
            f = root / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(content, indent=2) + "\n")
        print(root)


if __name__ == "__main__":
    main()
