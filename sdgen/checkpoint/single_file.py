"""Single-file checkpoints: one ``.safetensors`` holding a whole Stable Diffusion model under the original names.

The original training code (CompVis LDM for SD1/SD2, Stability's SGM for SDXL) saved every part of the model in
one state dict, under these prefixes::

    model.diffusion_model.*                      UNet (LDM names: input_blocks, middle_block, output_blocks, ...)
    first_stage_model.*                          VAE (LDM names: encoder.down.N.block.M, mid.attn_1, ...)
    cond_stage_model.transformer.text_model.*    SD1 text encoder: CLIP ViT-L in Hugging Face names already
    cond_stage_model.model.*                     SD2 text encoder: OpenCLIP ViT-H (fused q/k/v, ln_1, mlp.c_fc, ...)
    conditioner.embedders.0.transformer.text_model.*   SDXL text encoder 1: CLIP ViT-L (HF names)
    conditioner.embedders.1.model.*              SDXL text encoder 2: OpenCLIP ViT-bigG (OpenCLIP names)

Everything else in such files (``model_ema.*``, the noise schedule buffers ``betas``, ``alphas_cumprod``, ...)
is not needed and is ignored.

This module holds every name conversion from those layouts to the diffusers names sdgen's models use (and text
encoders in sdgen's canonical naming: no ``text_model.`` prefix, see ``diffusers_folder``). The rules follow what
diffusers' ``from_single_file`` does (``diffusers/loaders/single_file_utils.py``), so the tensors come out equal
to the ones diffusers loads; they are written here as explicit tables built from the diffusers config rather than
substring replacements, so every tensor under a model's prefix is either placed or reported.

Only tensor names and shapes decide the model family, never the file name. What the tensors cannot say
(v-prediction vs epsilon, the default image size) comes from the configs: sdgen's bundled ones
(``sdgen/data/configs/<name>``) or a diffusers folder the caller names with ``config_dir=``, as diffusers'
``from_single_file(path, config=folder)``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..errors import UsageError, BadModelFileError
from .diffusers_folder import TEXT_MODEL_PREFIX, read_json
from .safetensors_file import SafetensorsFile, open_safetensors

# ----------------------------------------------------------------------------------------------- prefixes, families
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."

UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
SDXL_ADD_EMBEDDING = UNET_PREFIX + "label_emb.0.0.weight"

FAMILIES = ("sd1", "sd2", "sdxl", "sd1-inpaint", "sd2-inpaint", "sdxl-inpaint")
INPAINT_IN_CHANNELS = 9  # 4 noisy latents + 4 masked-image latents + 1 mask

# family (without "-inpaint") -> the bundled config folder used when the caller gives none
DEFAULT_CONFIGS = {"sd1": "sd15", "sd2": "sd21-base", "sdxl": "sdxl"}

# family -> component -> the prefix of its tensors in the single file
COMPONENT_PREFIXES = {
    "sd1": {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": SD1_CLIP_PREFIX},
    "sd2": {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": SD2_OPENCLIP_PREFIX},
    "sdxl": {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": SDXL_CLIP_PREFIX,
             "text_encoder_2": SDXL_OPENCLIP_PREFIX},
}

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "data" / "configs"

# Tensors found next to the weights in OpenCLIP / HF CLIP state dicts that no diffusers model holds.
_OPENCLIP_IGNORED = ("logit_scale", "attn_mask")
_CLIP_IGNORED = ("embeddings.position_ids",)


def base_family(family: str) -> str:
    """``"sd2-inpaint"`` -> ``"sd2"``."""
    return family.split("-", 1)[0]


def default_config_dir(family: str) -> Path:
    """The bundled diffusers config folder for a family (``sd15``, ``sd21-base`` or ``sdxl``)."""
    base = base_family(family)
    if base not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    return CONFIGS_ROOT / DEFAULT_CONFIGS[base]


def bundled_configs() -> list[str]:
    """The names of the config folders sdgen ships (sd15, sd21, sd21-base, sd-turbo, sdxl, sdxl-turbo)."""
    return sorted(d.name for d in CONFIGS_ROOT.iterdir() if (d / "unet" / "config.json").is_file())


def resolve_config(name_or_dir: str | os.PathLike) -> Path:
    """A single file's configs: a diffusers folder (with <component>/config.json files) or the name of a bundled one
    (e.g. ``sd21`` for SD 2.x 768 v-prediction files, which the tensors cannot tell from the 512 epsilon ones)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "unet" / "config.json").is_file():
            raise UsageError(f"{path}: not a diffusers config folder (no unet/config.json)")
        return path
    if str(name_or_dir) in bundled_configs():
        return CONFIGS_ROOT / str(name_or_dir)
    raise UsageError(f"--config {name_or_dir}: neither a diffusers folder nor a bundled config "
                     f"(bundled: {', '.join(bundled_configs())})")


def _shapes(names_and_shapes) -> dict[str, tuple[int, ...]]:
    """name -> shape from a mapping (to shapes, arrays or anything with ``.shape``) or from (name, shape) pairs."""
    items = names_and_shapes.items() if isinstance(names_and_shapes, Mapping) else names_and_shapes
    out = {}
    for name, value in items:
        shape = getattr(value, "shape", value)
        out[name] = tuple(int(d) for d in shape)
    return out


def _has_prefix(shapes: Mapping[str, tuple], prefix: str) -> bool:
    return any(name.startswith(prefix) for name in shapes)


def _layout_hint(shapes: Mapping[str, tuple]) -> str:
    """A guess at what a file that is not a full checkpoint is, for the error message."""
    names = list(shapes)
    if any(n.startswith("lora_") or ".lora_" in n for n in names):
        return "; it looks like a LoRA, not a full model"
    if vae_file_format(names) is not None and not _has_prefix(shapes, UNET_PREFIX):
        return "; it looks like a VAE alone (load it as a VAE file)"
    if any(n.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for n in names):
        return "; it looks like a diffusers-format UNet alone (a model folder needs all its components)"
    if any(n.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.joint_blocks.",
                         "model.diffusion_model.double_blocks.")) for n in names):
        return "; it looks like a transformer model (SD3/Flux), which sdgen does not run"
    if _has_prefix(shapes, SDXL_REFINER_PREFIX):
        return "; it looks like the SDXL refiner, which sdgen does not support"
    return ""


def detect_family(names_and_shapes) -> str:
    """The model family of a single-file checkpoint, from its tensor names and shapes alone.

    ``names_and_shapes``: a mapping name -> shape (or -> array / ``TensorInfo``: anything with ``.shape``), or an
    iterable of (name, shape) pairs. Returns ``"sd1"``, ``"sd2"`` or ``"sdxl"``, with ``"-inpaint"`` appended when
    the UNet's first convolution takes 9 channels (latents + masked-image latents + mask).

    The text encoder decides the family: CLIP ViT-L under ``cond_stage_model.transformer.`` is SD1, OpenCLIP under
    ``cond_stage_model.model.`` is SD2, both under ``conditioner.embedders.{0,1}`` is SDXL (whose UNet must then
    have the ``label_emb`` add-embedding). A UNet-only file falls back on the UNet: ``label_emb`` -> SDXL, linear
    attention projections (SD2's ``use_linear_in_transformer``) -> SD2, 1x1-conv projections -> SD1.
    Epsilon vs v-prediction is not visible in the tensors and is left to the config.

    Raises BadModelFileError naming what is missing when the layout is none of these.
    """
    shapes = _shapes(names_and_shapes)
    conv_in = shapes.get(UNET_CONV_IN)
    if conv_in is None:
        raise BadModelFileError(
            f"not a Stable Diffusion checkpoint sdgen knows: no UNet (tensor {UNET_CONV_IN!r} is missing; "
            f"{len(shapes)} tensors in the file){_layout_hint(shapes)}")
    if len(conv_in) != 4:
        raise BadModelFileError(f"UNet tensor {UNET_CONV_IN!r} has shape {conv_in}, expected a 4-d convolution")
    in_channels = conv_in[1]
    if in_channels not in (4, INPAINT_IN_CHANNELS):
        raise BadModelFileError(
            f"UNet input convolution takes {in_channels} channels: only 4 (text-to-image) and "
            f"{INPAINT_IN_CHANNELS} (inpainting) are supported")

    has_sdxl_clip = _has_prefix(shapes, SDXL_CLIP_PREFIX)
    has_sdxl_openclip = _has_prefix(shapes, SDXL_OPENCLIP_PREFIX)
    if has_sdxl_clip or has_sdxl_openclip:
        missing = [p + "*" for p, present in ((SDXL_CLIP_PREFIX, has_sdxl_clip),
                                              (SDXL_OPENCLIP_PREFIX, has_sdxl_openclip)) if not present]
        if missing:
            raise BadModelFileError(f"SDXL layout with a text encoder missing: no {', '.join(missing)} tensors"
                                    f"{_layout_hint(shapes)}")
        if SDXL_ADD_EMBEDDING not in shapes:
            raise BadModelFileError(f"SDXL text encoders but the UNet has no add-embedding "
                                    f"({SDXL_ADD_EMBEDDING!r} is missing)")
        family = "sdxl"
    elif _has_prefix(shapes, SD2_OPENCLIP_PREFIX):
        family = "sd2"
    elif _has_prefix(shapes, SD1_CLIP_PREFIX):
        family = "sd1"
    elif _has_prefix(shapes, "conditioner.embedders.") or _has_prefix(shapes, "cond_stage_model."):
        raise BadModelFileError(
            f"unknown text encoder layout (expected {SD1_CLIP_PREFIX}*, {SD2_OPENCLIP_PREFIX}* or "
            f"{SDXL_CLIP_PREFIX}* with {SDXL_OPENCLIP_PREFIX}*){_layout_hint(shapes)}")
    else:
        family = _family_from_unet(shapes)
    return family + ("-inpaint" if in_channels == INPAINT_IN_CHANNELS else "")


def _family_from_unet(shapes: Mapping[str, tuple]) -> str:
    """The family of a UNet without its text encoders (see ``detect_family``)."""
    if SDXL_ADD_EMBEDDING in shapes:
        return "sdxl"
    proj_in = sorted((name, shape) for name, shape in shapes.items()
                     if name.startswith(UNET_PREFIX) and name.endswith(".proj_in.weight"))
    if not proj_in:
        raise BadModelFileError(
            f"cannot tell the model family: no text encoder ({SD1_CLIP_PREFIX}*, {SD2_OPENCLIP_PREFIX}* or "
            f"conditioner.embedders.*) and no UNet attention (*.proj_in.weight)")
    return "sd2" if len(proj_in[0][1]) == 2 else "sd1"


# ------------------------------------------------------------------------------------------------------- helpers
def _fail_unplaced(what: str, names: list[str], why: str) -> None:
    if names:
        shown = ", ".join(repr(n) for n in names[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        count = f"{len(names)} tensor{'s' if len(names) > 1 else ''}"
        raise BadModelFileError(f"{what}: {count} {why}: {shown}{more}")


def _strip(tensors: Mapping[str, np.ndarray], prefixes: Iterable[str]) -> dict[str, np.ndarray]:
    """The tensors under the first of ``prefixes`` present, with it removed; all tensors when none is present."""
    for prefix in prefixes:
        if any(name.startswith(prefix) for name in tensors):
            return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return dict(tensors)


def _as_matrix(t: np.ndarray) -> np.ndarray:
    """A (out, in) weight from a 1x1 convolution kernel (out, in, 1, 1) or 1-d convolution (out, in, 1)."""
    if t.ndim > 2:
        if any(d != 1 for d in t.shape[2:]):
            raise BadModelFileError(f"expected a 1x1 kernel, got shape {tuple(t.shape)}")
        return t.reshape(t.shape[0], t.shape[1])
    return t


def _per_block(value, n: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise BadModelFileError(f"config lists {len(value)} values for {n} blocks: {value!r}")
        return [int(v) for v in value]
    return [int(value)] * n


# ---------------------------------------------------------------------------------------------------------- UNet
# LDM ResBlock parts -> diffusers ResnetBlock2D parts
_UNET_RESNET_PARTS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_UNET_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE_KEY = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_PARAM = re.compile(r"^(.+)\.(weight|bias)$")


def _unet_tables(config: dict) -> tuple[dict, dict]:
    """The LDM input/output block index -> diffusers place, from the UNet config.

    LDM numbers the encoder's layers ``input_blocks.1..``: per level, ``layers_per_block`` (resnet [+ attention])
    entries, then one downsampler entry (``.0.op``) except after the last level. The decoder's
    ``output_blocks.0..`` have ``layers_per_block + 1`` entries per level (deepest first), and the upsampler sits
    in the level's last entry after the resnet and the attention if any (``.1.conv`` or ``.2.conv``).
    """
    down_types = config.get("down_block_types") or []
    up_types = config.get("up_block_types") or []
    if not down_types or len(up_types) != len(down_types):
        raise BadModelFileError("unet config: down_block_types/up_block_types are missing or of unequal length")
    n = len(down_types)
    layers = _per_block(config.get("layers_per_block", 2), n)
    inputs: dict[int, tuple[int, int | None]] = {}  # index -> (block, layer) or (block, None) = downsampler
    i = 1
    for b in range(n):
        for layer in range(layers[b]):
            inputs[i] = (b, layer)
            i += 1
        if b != n - 1:
            inputs[i] = (b, None)
            i += 1
    outputs: dict[int, tuple[int, int, bool]] = {}  # index -> (block, layer, holds the upsampler)
    j = 0
    up_layers = list(reversed(layers))
    for b in range(n):
        count = up_layers[b] + 1
        for layer in range(count):
            outputs[j] = (b, layer, layer == count - 1 and b != n - 1)
            j += 1
    return inputs, outputs


def _unet_resnet(prefix: str, rest: str) -> str | None:
    m = _PARAM.match(rest)
    if not m or m.group(1) not in _UNET_RESNET_PARTS:
        return None
    return f"{prefix}.{_UNET_RESNET_PARTS[m.group(1)]}.{m.group(2)}"


def _unet_attention_tensor(name: str, t: np.ndarray, linear: bool) -> np.ndarray:
    """proj_in/proj_out are 1x1 convs in SD1 and linear layers in SD2/SDXL: store them as the config says."""
    if name.endswith((".proj_in.weight", ".proj_out.weight")):
        if linear and t.ndim == 4:
            return _as_matrix(t)
        if not linear and t.ndim == 2:
            return t.reshape(t.shape[0], t.shape[1], 1, 1)
    return t


def unet_name(ldm_name: str, config: dict, tables: tuple[dict, dict] | None = None) -> str | None:
    """The diffusers name of one LDM UNet tensor (without ``model.diffusion_model.``), or None if not placed."""
    inputs, outputs = tables or _unet_tables(config)
    m = _PARAM.match(ldm_name)
    if m and m.group(1) in _UNET_TOP_LEVEL:
        return f"{_UNET_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    if m and m.group(1) in ("label_emb.0.0", "label_emb.0.2"):
        linear = "linear_1" if m.group(1).endswith("0.0") else "linear_2"
        if config.get("addition_embed_type") == "text_time":
            return f"add_embedding.{linear}.{m.group(2)}"
        if config.get("class_embed_type") in ("timestep", "projection"):
            return f"class_embedding.{linear}.{m.group(2)}"
        return None
    m = _MIDDLE_KEY.match(ldm_name)
    if m:  # resnet, attention, resnet
        index, rest = int(m.group(1)), m.group(2)
        if index in (0, 2):
            return _unet_resnet(f"mid_block.resnets.{index // 2}", rest)
        if index == 1:
            return f"mid_block.attentions.0.{rest}"
        return None
    m = _BLOCK_KEY.match(ldm_name)
    if not m:
        return None
    kind, index, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "input_blocks":
        place = inputs.get(index)
        if place is None:
            return None
        block, layer = place
        if layer is None:  # downsampler entry
            op = _PARAM.match(rest)
            if sub == 0 and op and op.group(1) == "op":
                return f"down_blocks.{block}.downsamplers.0.conv.{op.group(2)}"
            return None
        if sub == 0:
            return _unet_resnet(f"down_blocks.{block}.resnets.{layer}", rest)
        if sub == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        return None
    place = outputs.get(index)
    if place is None:
        return None
    block, layer, has_upsampler = place
    conv = _PARAM.match(rest)
    if sub in (1, 2) and has_upsampler and conv and conv.group(1) == "conv":
        return f"up_blocks.{block}.upsamplers.0.conv.{conv.group(2)}"
    if sub == 0:
        return _unet_resnet(f"up_blocks.{block}.resnets.{layer}", rest)
    if sub == 1:
        return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


def convert_unet(tensors: Mapping[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """LDM/SGM UNet tensors (with or without ``model.diffusion_model.``) -> diffusers ``UNet2DConditionModel`` names.

    ``config`` is the diffusers UNet config: ``layers_per_block`` and the block lists fix where each LDM block
    index goes, ``addition_embed_type``/``class_embed_type`` where ``label_emb`` goes, ``use_linear_projection``
    the stored shape of ``proj_in``/``proj_out``. A tensor that fits none of the places is an error (a config that
    does not match the checkpoint) rather than silently dropped.
    """
    ldm = _strip(tensors, (UNET_PREFIX,))
    tables = _unet_tables(config)
    linear = bool(config.get("use_linear_projection", False))
    out: dict[str, np.ndarray] = {}
    unplaced = []
    for name, t in ldm.items():
        new = unet_name(name, config, tables)
        if new is None:
            unplaced.append(UNET_PREFIX + name)
            continue
        if new in out:
            raise BadModelFileError(f"UNet: two tensors map to {new!r} (one is {UNET_PREFIX + name!r})")
        out[new] = _unet_attention_tensor(new, t, linear)
    _fail_unplaced("UNet", unplaced, f"not fitting the UNet config (layers_per_block="
                                     f"{config.get('layers_per_block')}, {len(config.get('down_block_types', []))} "
                                     f"levels, addition_embed_type={config.get('addition_embed_type')!r})")
    return out


# ----------------------------------------------------------------------------------------------------------- VAE
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in", "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in", "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                     "nin_shortcut": "conv_shortcut"}
# LDM AttnBlock (1x1 convs) -> diffusers Attention (linear layers)
_VAE_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers' own pre-0.14 attention names, still found in old diffusers-format VAE files
_VAE_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ENCODER_BLOCK = re.compile(r"^encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)$")
_VAE_DECODER_BLOCK = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)$")
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")
_VAE_DIFFUSERS_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_file_format(names: Iterable[str]) -> str | None:
    """``"diffusers"`` or ``"ldm"`` for a set of VAE tensor names (prefix ``first_stage_model.``/``vae.`` or none),
    None when they are neither."""
    names = list(names)
    for prefix in ("",) + VAE_PREFIXES:
        inner = [n[len(prefix):] for n in names if n.startswith(prefix)]
        if any(n.startswith("encoder.down_blocks.") or n.startswith("decoder.up_blocks.") for n in inner):
            return "diffusers"
        if any(n.startswith("encoder.down.") or n.startswith("decoder.up.") for n in inner):
            return "ldm"
    return None


def vae_name(ldm_name: str, num_up_blocks: int) -> str | None:
    """The diffusers name of one LDM VAE tensor (without ``first_stage_model.``), or None if not placed.

    The LDM decoder numbers its levels from the deepest (``up.{n-1}`` runs first), diffusers in running order,
    so ``decoder.up.{i}`` is ``decoder.up_blocks.{n-1-i}``.
    """
    m = _PARAM.match(ldm_name)
    if not m:
        return None
    module, param = m.group(1), m.group(2)
    if module in _VAE_TOP_LEVEL:
        return f"{_VAE_TOP_LEVEL[module]}.{param}"
    for pattern, side in ((_VAE_ENCODER_BLOCK, "encoder"), (_VAE_DECODER_BLOCK, "decoder")):
        b = pattern.match(ldm_name)
        if not b:
            continue
        level, resnet, rest = int(b.group(1)), b.group(3), b.group(4)
        if side == "encoder":
            block = f"encoder.down_blocks.{level}"
            sampler = "downsamplers"
        else:
            if level >= num_up_blocks:
                return None
            block = f"decoder.up_blocks.{num_up_blocks - 1 - level}"
            sampler = "upsamplers"
        part = _PARAM.match(rest)
        if part is None:
            return None
        if resnet is None:  # downsample/upsample
            return f"{block}.{sampler}.0.conv.{part.group(2)}" if part.group(1) == "conv" else None
        if part.group(1) not in _VAE_RESNET_PARTS:
            return None
        return f"{block}.resnets.{resnet}.{_VAE_RESNET_PARTS[part.group(1)]}.{part.group(2)}"
    mid = _VAE_MID.match(ldm_name)
    if mid:
        side, which, rest = mid.groups()
        part = _PARAM.match(rest)
        if part is None:
            return None
        if which == "attn_1":
            if part.group(1) not in _VAE_ATTENTION_PARTS:
                return None
            return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION_PARTS[part.group(1)]}.{part.group(2)}"
        if part.group(1) not in _VAE_RESNET_PARTS:
            return None
        index = 0 if which == "block_1" else 1
        return f"{side}.mid_block.resnets.{index}.{_VAE_RESNET_PARTS[part.group(1)]}.{part.group(2)}"
    return None


def _vae_attention_matrices(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mid-block attention's q/k/v/out weights as diffusers' linear (C, C), from 1x1 conv kernels."""
    for name in list(out):
        if ".mid_block.attentions." in name and name.endswith(".weight") and ".group_norm." not in name:
            out[name] = _as_matrix(out[name])
    return out


def convert_vae(tensors: Mapping[str, np.ndarray], config: dict | None = None) -> dict[str, np.ndarray]:
    """LDM VAE tensors (prefix ``first_stage_model.``, ``vae.`` or none) -> diffusers ``AutoencoderKL`` names.

    The number of decoder levels comes from ``config["up_block_types"]`` (default: what the tensors show).
    Tensors outside ``encoder.``/``decoder.``/``quant_conv.``/``post_quant_conv.`` (a training loss, EMA
    counters) are ignored; one inside them that fits nowhere is an error.
    """
    ldm = _strip(tensors, VAE_PREFIXES)
    ldm = {n: t for n, t in ldm.items() if n.startswith(_VAE_DIFFUSERS_ROOTS)}
    if config and config.get("up_block_types"):
        num_up = len(config["up_block_types"])
    else:
        levels = {int(m.group(1)) for m in map(_VAE_DECODER_BLOCK.match, ldm) if m}
        num_up = max(levels) + 1 if levels else 0
    out: dict[str, np.ndarray] = {}
    unplaced = []
    for name, t in ldm.items():
        new = vae_name(name, num_up)
        if new is None:
            unplaced.append(name)
        else:
            out[new] = t
    _fail_unplaced("VAE", unplaced, "outside the LDM VAE layout")
    return _vae_attention_matrices(out)


def normalize_diffusers_vae(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A diffusers-format VAE state dict (prefix ``vae.`` or none) with the pre-0.14 attention names
    (``query``/``key``/``value``/``proj_attn``) renamed to today's, as diffusers does when loading."""
    inner = _strip(tensors, VAE_PREFIXES)
    out: dict[str, np.ndarray] = {}
    for name, t in inner.items():
        if not name.startswith(_VAE_DIFFUSERS_ROOTS):
            continue
        parts = name.split(".")
        if ".attentions." in name and len(parts) >= 2 and parts[-2] in _VAE_DEPRECATED_ATTENTION:
            name = ".".join(parts[:-2] + [_VAE_DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        out[name] = t
    return _vae_attention_matrices(out)


# -------------------------------------------------------------------------------------------------- text encoders
def convert_clip(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLIP ViT-L as stored by SD1 (``cond_stage_model.transformer.``) and SDXL (``conditioner.embedders.0.
    transformer.``): Hugging Face names already, so only the prefixes go (the outer one, then ``text_model.`` as
    sdgen's canonical naming has it; very old SD1 files lack ``text_model.``), and the ``position_ids`` buffer."""
    inner = _strip(tensors, (SD1_CLIP_PREFIX, SDXL_CLIP_PREFIX))
    out: dict[str, np.ndarray] = {}
    for name, t in inner.items():
        key = name[len(TEXT_MODEL_PREFIX):] if name.startswith(TEXT_MODEL_PREFIX) else name
        if key in _CLIP_IGNORED:
            continue
        if key in out:
            raise BadModelFileError(f"text encoder: tensor {key!r} appears both with and without "
                                    f"{TEXT_MODEL_PREFIX!r}")
        out[key] = t
    return out


_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_LAYER_PARTS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_TOP_LEVEL = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


def convert_open_clip(tensors: Mapping[str, np.ndarray], config: dict,
                      with_projection: bool | None = None) -> dict[str, np.ndarray]:
    """OpenCLIP text tower (SD2's ViT-H under ``cond_stage_model.model.``, SDXL's bigG under
    ``conditioner.embedders.1.model.``) -> transformers ``CLIPTextModel[WithProjection]``, canonical names.

    - ``transformer.resblocks.N.attn.in_proj_weight`` (3C, C) / ``in_proj_bias`` (3C) split into q, k, v;
      ``ln_1``/``ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc``/``c_proj`` -> ``mlp.fc1/fc2``.
    - Only the first ``config["num_hidden_layers"]`` blocks are taken: SD2 conditions on the penultimate layer,
      so its diffusers text encoder has 23 of OpenCLIP's 24 layers (the last is dropped, as diffusers does).
    - ``text_projection`` is stored (C, proj) for ``x @ P``; diffusers' Linear wants (proj, C): transposed. It is
      kept only for a model with a projection (``with_projection``, default: the config's architecture is
      ``CLIPTextModelWithProjection``, i.e. SDXL's second encoder); SD2's is dropped.
    """
    inner = _strip(tensors, (SD2_OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_REFINER_PREFIX))
    layers = int(config.get("num_hidden_layers", 0))
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    present = {int(m.group(1)) for m in map(_OPENCLIP_LAYER.match, inner) if m}
    if layers <= 0 or any(i not in present for i in range(layers)):
        raise BadModelFileError(f"OpenCLIP text encoder: the config asks for {layers} layers, the checkpoint has "
                                f"{len(present)}")
    out: dict[str, np.ndarray] = {}
    unplaced = []
    for name, t in inner.items():
        if name in _OPENCLIP_TOP_LEVEL:
            out[_OPENCLIP_TOP_LEVEL[name]] = t
            continue
        if name == "text_projection":
            if with_projection:
                out["text_projection.weight"] = np.ascontiguousarray(_check_2d(name, t).T)
            continue
        if name in _OPENCLIP_IGNORED:
            continue
        m = _OPENCLIP_LAYER.match(name)
        if not m:
            unplaced.append(name)
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index >= layers:  # beyond the layers the text encoder uses (SD2's last block)
            continue
        prefix = f"encoder.layers.{index}"
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            if t.shape[0] % 3:
                raise BadModelFileError(f"OpenCLIP tensor {name!r} of shape {tuple(t.shape)} does not split into "
                                        "q, k, v")
            width = t.shape[0] // 3
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}.self_attn.{proj}.{kind}"] = t[j * width:(j + 1) * width]
            continue
        part = _PARAM.match(rest)
        if part and part.group(1) in _OPENCLIP_LAYER_PARTS:
            out[f"{prefix}.{_OPENCLIP_LAYER_PARTS[part.group(1)]}.{part.group(2)}"] = t
        else:
            unplaced.append(name)
    _fail_unplaced("OpenCLIP text encoder", unplaced, "outside the OpenCLIP text layout")
    if with_projection and "text_projection.weight" not in out:
        raise BadModelFileError("OpenCLIP text encoder: text_projection is missing")
    return out


def _check_2d(name: str, t: np.ndarray) -> np.ndarray:
    if t.ndim != 2:
        raise BadModelFileError(f"OpenCLIP tensor {name!r} has shape {tuple(t.shape)}, expected a matrix")
    return t


# ---------------------------------------------------------------------------------------------------------- files
def _component_config(config_dir: Path, component: str) -> dict:
    return copy.deepcopy(read_json(config_dir / component / "config.json", f"the {component} config"))


def _load_prefixed(f: SafetensorsFile, prefixes: Iterable[str], dtype=np.float32) -> dict[str, np.ndarray]:
    """The tensors of ``f`` under the first of ``prefixes`` present (prefix kept), converted to ``dtype``."""
    names = f.keys()
    for prefix in prefixes:
        chosen = [n for n in names if n.startswith(prefix)]
        if chosen:
            return {n: f.get(n, dtype) for n in chosen}
    return {}


def _convert_component(family: str, component: str, tensors: dict, config: dict) -> dict[str, np.ndarray]:
    if component == "unet":
        return convert_unet(tensors, config)
    if component == "vae":
        return convert_vae(tensors, config)
    if base_family(family) == "sd2" or component == "text_encoder_2":
        return convert_open_clip(tensors, config)
    return convert_clip(tensors)


def load_single_file(path: str | os.PathLike, config_dir: str | os.PathLike | None = None,
                     components: Iterable[str] | None = None,
                     family: str | None = None) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """Load a single-file SD1/SD2/SDXL checkpoint as diffusers components.

    Returns ``{component: (diffusers config, tensors)}`` for ``unet``, ``vae``, ``text_encoder`` and (SDXL)
    ``text_encoder_2``: float32 tensors under diffusers' names, text encoders in sdgen's canonical naming
    (no ``text_model.`` prefix), as ``load_component`` gives them for a diffusers folder.

    ``config_dir``: a diffusers folder whose ``<component>/config.json`` files describe the model (as
    diffusers' ``from_single_file(path, config=folder)``); default: sdgen's bundled configs for the detected
    family (``sd15``, ``sd21-base`` -- epsilon, 512 px -- or ``sdxl``). An inpainting UNet gets
    ``in_channels=9`` whatever the config says. ``components``: load only these (e.g. without ``vae`` when the
    VAE comes from elsewhere). ``family``: skip detection (must be one of ``FAMILIES``).
    Pickled files are refused; a component missing from the file is a BadModelFileError naming its prefix.
    """
    path = Path(path)
    with open_safetensors(path) as f:
        try:
            detected = detect_family({n: f.info(n).shape for n in f.keys()})
        except BadModelFileError as e:
            raise BadModelFileError(f"{path}: {e}") from None
        family = family or detected
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
        base = base_family(family)
        cfg_root = Path(config_dir) if config_dir is not None else default_config_dir(family)
        wanted = list(COMPONENT_PREFIXES[base]) if components is None else list(components)
        result = {}
        for component in wanted:
            if component not in COMPONENT_PREFIXES[base]:
                raise ValueError(f"{family} checkpoints have no component {component!r} "
                                 f"(they have {', '.join(COMPONENT_PREFIXES[base])})")
            prefixes = VAE_PREFIXES if component == "vae" else (COMPONENT_PREFIXES[base][component],)
            tensors = _load_prefixed(f, prefixes)
            if not tensors:
                raise BadModelFileError(f"{path}: the {family} checkpoint has no {component} "
                                        f"(no {' or '.join(p + '*' for p in prefixes)} tensors)")
            config = _component_config(cfg_root, component)
            if component == "unet" and family.endswith("-inpaint"):
                config["in_channels"] = INPAINT_IN_CHANNELS
            try:
                converted = _convert_component(family, component, tensors, config)
            except BadModelFileError as e:
                raise BadModelFileError(f"{path}: {e}") from None
            result[component] = (config, converted)
    return result


def load_vae_file(path: str | os.PathLike, config: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A VAE alone (``--vae PATH``): a diffusers-format ``diffusion_pytorch_model.safetensors`` or an LDM-format
    file (``encoder.down.N...``, with or without ``first_stage_model.``; a full checkpoint's VAE also works).

    ``config``: the diffusers VAE config to use (give the main model's, whose ``scaling_factor`` belongs to the
    family: 0.18215 for SD1/SD2, 0.13025 for SDXL); default: the bundled SD1.5 one.
    Returns ``(config, tensors)`` under diffusers' names, float32.
    """
    path = Path(path)
    config = copy.deepcopy(config) if config is not None else _component_config(default_config_dir("sd1"), "vae")
    with open_safetensors(path) as f:
        names = f.keys()
        fmt = vae_file_format(names)
        if fmt is None:
            raise BadModelFileError(
                f"{path}: not a VAE: no encoder.down_blocks.*/decoder.up_blocks.* (diffusers) or "
                f"encoder.down.*/decoder.up.* (LDM) tensors, with or without first_stage_model./vae.")
        # the prefix in use: the first that holds VAE tensors, else none
        prefix = next((p for p in VAE_PREFIXES
                       if any(n.startswith(p + "encoder.") or n.startswith(p + "decoder.") for n in names)), "")
        tensors = {n[len(prefix):]: f.get(n) for n in names
                   if n.startswith(prefix) and n[len(prefix):].startswith(_VAE_DIFFUSERS_ROOTS)}
    try:
        converted = convert_vae(tensors, config) if fmt == "ldm" else normalize_diffusers_vae(tensors)
    except BadModelFileError as e:
        raise BadModelFileError(f"{path}: {e}") from None
    return config, converted
