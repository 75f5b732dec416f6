"""Test-only: random LoRA files in the formats found in the wild, and the reference merge.

Files are written the way their tools write them: kohya/A1111 (``lora_unet_*`` / ``lora_te*_*`` with
``lora_down``/``lora_up``/``alpha``; SD1/SD2 UNets under diffusers module paths, SDXL under the SGM ones) and
diffusers/PEFT (``unet.<module>.lora_A.weight`` ..., with the ``lora_adapter_metadata`` that ``save_lora_weights``
adds).

The reference is diffusers: ``load_lora_weights`` + ``fuse_lora(lora_scale=...)`` when PEFT is installed. Without
PEFT (diffusers refuses to load LoRAs then), the same steps are taken here from diffusers' own pieces: its key
conversion (``lora_state_dict``, ``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``), its LoraConfig
arguments (``get_peft_kwargs``: rank, alpha and their per-module patterns), and PEFT's merge,
``W += lora_scale * alpha / r * B @ A``, on the torch modules. sdgen's reading of names and alphas is written
independently in sdgen/lora.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from ldm_export import unet_to_ldm

ATTENTION_PARTS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
              "mlp.fc2")


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def unet_targets(unet, convs: bool) -> list[str]:
    """Module paths a LoRA trainer targets: the transformer blocks' linear layers and proj_in/proj_out; with
    ``convs`` (LoCon) also the ResNets' convolutions."""
    names = []
    for name, module in unet.named_modules():
        if re.search(r"transformer_blocks\.\d+\.(%s)$" % "|".join(map(re.escape, ATTENTION_PARTS)), name):
            names.append(name)
        elif re.search(r"attentions\.\d+\.(proj_in|proj_out)$", name):
            names.append(name)
        elif convs and re.search(r"resnets\.\d+\.(conv1|conv2)$", name):
            names.append(name)
    return names


def text_targets(encoder) -> list[str]:
    return [name for name, _ in encoder.named_modules() if name.endswith(TEXT_PARTS)]


def _pair(module, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    w = module.weight.detach().numpy()
    fan_in = int(np.prod(w.shape[1:]))
    down = rng.standard_normal((rank,) + w.shape[1:]).astype(np.float32) / np.sqrt(fan_in)
    up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
    up = (0.5 * rng.standard_normal(up_shape) / np.sqrt(rank)).astype(np.float32)
    return down, up


def kohya_lora(pipe, family: str, rank: int = 4, alpha: float = 2.0, conv_alpha: float = 1.0, seed: int = 0,
               convs: bool = True) -> dict[str, np.ndarray]:
    """A kohya-format LoRA for the pipeline's UNet and text encoder(s), LoCon convolutions included."""
    rng = np.random.default_rng(seed)
    out = {}
    modules = dict(pipe.unet.named_modules())
    sgm = family == "sdxl"
    for name in unet_targets(pipe.unet, convs):
        down, up = _pair(modules[name], rank, rng)
        if sgm:
            ldm = next(iter(unet_to_ldm({name + ".weight": down}, dict(pipe.unet.config))))
            flat = ldm[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        else:
            flat = name.replace(".", "_")
        key = "lora_unet_" + flat
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
        out[key + ".alpha"] = np.array(conv_alpha if modules[name].weight.ndim == 4 else alpha, dtype=np.float32)
    encoders = [("lora_te1_" if sgm else "lora_te_", pipe.text_encoder)]
    if sgm:
        encoders.append(("lora_te2_", pipe.text_encoder_2))
    for prefix, encoder in encoders:
        te_modules = dict(encoder.named_modules())
        for name in text_targets(encoder):
            down, up = _pair(te_modules[name], rank, rng)
            key = prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_")
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
            out[key + ".alpha"] = np.array(alpha, dtype=np.float32)
    return out


def peft_lora(pipe, rank: int = 4, lora_alpha: float = 8.0, seed: int = 1,
              convs: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A diffusers/PEFT-format LoRA (UNet and first text encoder) and the safetensors metadata
    ``save_lora_weights`` writes with it."""
    rng = np.random.default_rng(seed)
    out = {}
    modules = dict(pipe.unet.named_modules())
    targets = unet_targets(pipe.unet, convs)
    for name in targets:
        down, up = _pair(modules[name], rank, rng)
        out[f"unet.{name}.lora_A.weight"], out[f"unet.{name}.lora_B.weight"] = down, up
    te_modules = dict(pipe.text_encoder.named_modules())
    te_targets = text_targets(pipe.text_encoder)
    for name in te_targets:
        down, up = _pair(te_modules[name], rank, rng)
        key = "text_encoder.text_model." + name.removeprefix("text_model.")
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down, up
    meta = {}
    for prefix, mods in (("unet", targets), ("text_encoder", te_targets)):
        meta.update({f"{prefix}.r": rank, f"{prefix}.lora_alpha": lora_alpha, f"{prefix}.target_modules": mods,
                     f"{prefix}.rank_pattern": {}, f"{prefix}.alpha_pattern": {}, f"{prefix}.use_dora": False,
                     f"{prefix}.lora_bias": False})
    return out, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def save(tensors: dict[str, np.ndarray], path, metadata: dict | None = None):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------- the reference
def _pattern(patterns: dict, module: str):
    for key, value in (patterns or {}).items():
        if key.startswith("^"):
            if re.match(rf"{key}$", module):
                return value
        elif re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _merge(model, peft_sd: dict, config: dict, scale: float) -> None:
    """PEFT's merge with a LoraConfig's r/lora_alpha/patterns: W += scale * alpha / r * B @ A."""
    modules = dict(model.named_modules())
    for key, a in peft_sd.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        b = peft_sd[key.replace(".lora_A.", ".lora_B.")]
        alpha = _pattern(config.get("alpha_pattern"), name)
        alpha = config["lora_alpha"] if alpha is None else alpha
        r = _pattern(config.get("rank_pattern"), name)
        r = config["r"] if r is None else r
        weight = modules[name].weight
        if a.ndim == 4 and a.shape[2:] != (1, 1):
            delta = torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1)
        elif a.ndim == 4:
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = b @ a
        with torch.no_grad():
            weight += delta.reshape(weight.shape) * (scale * alpha / r)


def fuse_reference(pipe, lora_path, scale: float, family: str) -> None:
    """Merge the LoRA file into the diffusers pipeline as diffusers does (see the module docstring)."""
    if have_peft():
        pipe.load_lora_weights(str(lora_path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers (plain state-dict names)
        return
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, \
        convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    kwargs = {"unet_config": pipe.unet.config} if family == "sdxl" else {}
    state, alphas, metadata = type(pipe).lora_state_dict(str(lora_path), return_lora_metadata=True, **kwargs)
    components = [("unet", pipe.unet)] + [(n, getattr(pipe, n)) for n in ("text_encoder", "text_encoder_2")
                                          if getattr(pipe, n, None) is not None]
    for prefix, model in components:
        sd = {k.removeprefix(prefix + "."): v for k, v in state.items() if k.startswith(prefix + ".")}
        if not sd:
            continue
        is_unet = prefix == "unet"
        if is_unet:
            if "lora_A" not in next(iter(sd)):
                sd = convert_unet_state_dict_to_peft(sd)
            ranks = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
        else:
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # transformers 5 module names
            ranks = {k: v.shape[1] for k, v in sd.items() if "lora_B" in k}
        net_alphas = None
        if alphas:
            net_alphas = {k.removeprefix(prefix + "."): v for k, v in alphas.items()
                          if k.split(".")[0] == prefix}
        meta = None
        if metadata:
            meta = {k.removeprefix(prefix + "."): v for k, v in metadata.items() if k.startswith(prefix + ".")}
        config = meta or get_peft_kwargs(ranks, net_alphas, sd, is_unet=is_unet)
        if not is_unet:
            config = dict(config)
            for key in ("alpha_pattern", "rank_pattern"):
                config[key] = {k.removeprefix("text_model."): v for k, v in (config.get(key) or {}).items()}
        _merge(model, sd, config, scale)
