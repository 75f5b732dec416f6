"""Test-only: write a diffusers model folder as one single-file checkpoint with the original LDM/SGM names.

No single-file checkpoints exist in the test environment, so the tests make them: a tiny diffusers pipeline is
saved with ``save_pretrained`` and its weights are renamed here the way the original training code names them
(the inverse of what sdgen's loader and diffusers' ``from_single_file`` do). This direction is written separately
from ``sdgen.checkpoint.single_file`` -- diffusers -> LDM, by walking the diffusers names -- so the two are not the
same table read twice; the tests then compare sdgen's loading of the file against diffusers' own loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def read_folder_component(folder: Path, component: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors) of one component of a diffusers folder, read with the safetensors package."""
    from safetensors.numpy import load_file

    sub = Path(folder) / component
    config = json.loads((sub / "config.json").read_text())
    files = sorted(sub.glob("*.safetensors"))
    assert len(files) == 1, files
    return config, load_file(str(files[0]))


def _split(name: str) -> tuple[str, str]:
    module, param = name.rsplit(".", 1)
    return module, param


def unet_to_ldm(sd: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """diffusers UNet2DConditionModel names -> LDM ``model.diffusion_model.*`` names."""
    n = len(config["down_block_types"])
    lpb = config["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    down_start, i = [], 1
    for b in range(n):
        down_start.append(i)
        i += lpb[b] + (1 if b < n - 1 else 0)
    up_lpb = list(reversed(lpb))
    up_start, j = [], 0
    for b in range(n):
        up_start.append(j)
        j += up_lpb[b] + 1
    out = {}
    for name, t in sd.items():
        module, param = _split(name)
        if module in UNET_TOP:
            new = f"{UNET_TOP[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            b, layer, part = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{down_start[b] + layer}.0.{UNET_RESNET[part]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", module):
            b, layer = int(m[1]), int(m[2])
            new = f"input_blocks.{down_start[b] + layer}.1.{m[3]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            b = int(m[1])
            new = f"input_blocks.{down_start[b] + lpb[b]}.0.op.{param}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)$", module):
            new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}.{param}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)$", module):
            new = f"middle_block.1.{m[1]}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            b, layer, part = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{up_start[b] + layer}.0.{UNET_RESNET[part]}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", module):
            b, layer = int(m[1]), int(m[2])
            new = f"output_blocks.{up_start[b] + layer}.1.{m[3]}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            b = int(m[1])
            slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            new = f"output_blocks.{up_start[b] + up_lpb[b]}.{slot}.conv.{param}"
        else:
            raise KeyError(f"no LDM name for UNet tensor {name}")
        assert new not in out, new
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(sd: dict[str, np.ndarray], config: dict, prefix: str = "first_stage_model.") -> dict:
    """diffusers AutoencoderKL names -> LDM names; attention projections become 1x1 conv kernels."""
    n_up = len(config["up_block_types"])
    out = {}
    for name, t in sd.items():
        module, param = _split(name)
        if module in VAE_TOP:
            new = f"{VAE_TOP[module]}.{param}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{VAE_RESNET[m[3]]}.{param}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            new = f"encoder.down.{m[1]}.downsample.conv.{param}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{VAE_RESNET[m[3]]}.{param}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{param}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)$", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{VAE_RESNET[m[3]]}.{param}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", module):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{param}"
            if param == "weight" and m[2] != "group_norm":
                t = t.reshape(*t.shape, 1, 1)
        elif module in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                        "quant_conv", "post_quant_conv"):
            new = name
        else:
            raise KeyError(f"no LDM name for VAE tensor {name}")
        out[prefix + new] = t
    return out


def _canonical(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """transformers CLIPTextModel -> ``<prefix>text_model.*`` (HF names), with the position_ids buffer that
    real SD1/SDXL files carry."""
    out = {f"{prefix}text_model.{k}": v for k, v in _canonical(sd).items()}
    out[f"{prefix}text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def clip_to_open_clip(sd: dict[str, np.ndarray], prefix: str, extra_layers: int = 0,
                      projection: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """transformers CLIPTextModel[WithProjection] -> OpenCLIP text-tower names under ``prefix``.

    q/k/v fuse into ``attn.in_proj_weight``/``in_proj_bias``; ``text_projection.weight`` (proj, C) is stored
    transposed as ``text_projection`` (C, proj), or ``projection`` is used when the model has none (SD2).
    ``extra_layers`` random blocks are appended after the model's (SD2's unused 24th layer).
    """
    sd = _canonical(sd)
    rng = np.random.default_rng(seed)
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
        prefix + "logit_scale": np.array(4.6052, dtype=np.float32),
    }
    proj = sd.pop("text_projection.weight", None)
    proj = proj.T.copy() if proj is not None else projection
    if proj is not None:
        out[prefix + "text_projection"] = proj
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = np.concatenate(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in "qkv"], axis=0)
            for hf, oc in OPENCLIP_LAYER.items():
                out[dst + f"{oc}.{kind}"] = sd.pop(src + f"{hf}.{kind}")
    assert not sd, f"unconverted text encoder tensors: {sorted(sd)}"
    last = layers[-1]
    for extra in range(1, extra_layers + 1):
        for name in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{last}.")]:
            new = name.replace(f"resblocks.{last}.", f"resblocks.{last + extra}.")
            out[new] = rng.standard_normal(out[name].shape).astype(np.float32)
    return out


SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod")


def export_single_file(folder: Path, family: str, out_path: Path, dtype=np.float32) -> Path:
    """Write the diffusers folder ``folder`` (family ``sd1``/``sd2``/``sdxl``) as one LDM/SGM safetensors file."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    cfg, sd = read_folder_component(folder, "unet")
    tensors.update(unet_to_ldm(sd, cfg))
    cfg, sd = read_folder_component(folder, "vae")
    tensors.update(vae_to_ldm(sd, cfg))
    _, sd = read_folder_component(folder, "text_encoder")
    if family == "sd1":
        tensors.update(clip_to_ldm(sd, "cond_stage_model.transformer."))
    elif family == "sd2":
        width = sd["embeddings.token_embedding.weight"].shape[1] if "embeddings.token_embedding.weight" in sd \
            else sd["text_model.embeddings.token_embedding.weight"].shape[1]
        proj = np.random.default_rng(1).standard_normal((width, width)).astype(np.float32)
        tensors.update(clip_to_open_clip(sd, "cond_stage_model.model.", extra_layers=1, projection=proj))
    elif family == "sdxl":
        tensors.update(clip_to_ldm(sd, "conditioner.embedders.0.transformer."))
        _, sd2 = read_folder_component(folder, "text_encoder_2")
        tensors.update(clip_to_open_clip(sd2, "conditioner.embedders.1.model."))
    else:
        raise ValueError(family)
    for buf in SCHEDULE_BUFFERS:  # present in real LDM checkpoints, not part of any model
        tensors[buf] = np.linspace(0.1, 0.9, 1000, dtype=np.float32)
    tensors = {k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in tensors.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_path))
    return out_path
