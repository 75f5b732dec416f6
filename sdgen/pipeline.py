"""Text to image: encode the prompt, run the scheduler loop over the UNet, decode the latents.

    prompt ─ tokenizer ─ text encoder ─┐
    seed ─ rng ─ initial latents ──────┼─ scheduler loop { unet → guidance → scheduler.step } ─ VAE decode ─ pixels
    model folder ─ checkpoint loader ──┘

Every step mirrors diffusers' StableDiffusionPipeline so that the same model, prompt, seed and scheduler give the
same image. ``generate_latents`` is a generator yielding after each step, so progress bars, previews and timings
hang off the loop from the outside.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import checkpoint
from .errors import UsageError
from .image import to_uint8
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.layers import RandomParams
from .models.unet import UNet, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .rng import TorchGenerator
from .schedulers import make_scheduler
from .tokenizer import CLIPTokenizer

MAX_PIXELS = 4096 * 4096


class BatchGenerator:
    """One torch-compatible generator per image, as diffusers does when given a list of generators: image i's
    noise comes from its own seed, so it is the same whether it is generated alone or in a batch."""

    def __init__(self, seeds: list[int]):
        self.generators = [TorchGenerator(s) for s in seeds]

    def randn(self, shape) -> np.ndarray:
        shape = tuple(shape)
        if len(self.generators) == 1:
            return self.generators[0].randn(shape)
        if shape[0] != len(self.generators):
            raise ValueError(f"noise batch {shape[0]} != {len(self.generators)} generators")
        return np.stack([g.randn((1,) + shape[1:])[0] for g in self.generators])


@dataclass
class Conditioning:
    context: np.ndarray                    # (B, L, D): negative rows first when guidance is on, like diffusers
    guided: bool
    pooled: np.ndarray | None = None       # SDXL: (B, D) pooled text embedding of the second encoder, same row order


@dataclass
class Timings:
    load_s: float = 0.0
    text_encode_s: float = 0.0
    unet_steps_s: list = field(default_factory=list)
    vae_decode_s: float = 0.0


def model_family(model_index: dict) -> str:
    """"sdxl" for the two-encoder SDXL layout, else "sd" (SD 1.x and 2.x share one pipeline)."""
    cls = model_index.get("_class_name", "")
    if "XL" in cls or "text_encoder_2" in model_index:
        return "sdxl"
    return "sd"


@dataclass
class ModelSource:
    """What a model is made of, wherever it came from: per component, its config and its tensors."""
    family: str
    model_index: dict
    scheduler_config: dict
    components: dict            # component -> (config dict, tensors dict or RandomParams)
    tokenizer_dirs: dict        # "tokenizer"/"tokenizer_2" -> folder with vocab files, or None (use the bundled one)


def open_model(path: Path, variant: str | None = None, random_weights: int | None = None,
               config_dir: Path | None = None) -> ModelSource:
    """A diffusers folder, or a single-file checkpoint (.safetensors with the original LDM/SGM names; its configs
    come from config_dir or the configs sdgen ships for the detected family)."""
    if path.is_file() or checkpoint.is_pickle_path(path):
        parts = checkpoint.load_single_file(path, config_dir=config_dir)
        family = "sdxl" if "text_encoder_2" in parts else "sd"
        if config_dir is None:
            config_dir = checkpoint.single_file.default_config_dir("sdxl" if family == "sdxl" else _sd_family(parts))
        root = Path(config_dir)
    else:
        parts, root = None, path
    model_index = checkpoint.read_model_index(root)
    family = model_family(model_index)
    names = ["text_encoder", "unet", "vae"] + (["text_encoder_2"] if family == "sdxl" else [])
    components = {}
    for name in names:
        if parts is not None:
            components[name] = parts[name]
        elif random_weights is not None:
            components[name] = (checkpoint.read_json(root / name / "config.json", name), RandomParams(random_weights))
        else:
            components[name] = checkpoint.load_component(root, name, variant)
    tokenizer_dirs = {t: (root / t if (root / t / "vocab.json").exists() or (root / t / "tokenizer.json").exists()
                          else None) for t in ("tokenizer", "tokenizer_2")}
    return ModelSource(family, model_index, checkpoint.load_scheduler_config(root), components, tokenizer_dirs)


def _sd_family(parts: dict) -> str:
    """sd1 or sd2 from a converted single file: OpenCLIP (SD2) text encoders use gelu."""
    return "sd2" if parts["text_encoder"][0].get("hidden_act") == "gelu" else "sd1"


def _tokenizer(folder: Path | None, te_cfg: dict) -> CLIPTokenizer:
    if folder is not None:
        return CLIPTokenizer.from_folder(folder)
    # OpenCLIP text encoders (SD2, SDXL's second) pad with "!"; OpenAI's CLIP with the end-of-text token
    return CLIPTokenizer.default(pad_token="!" if te_cfg.get("hidden_act") == "gelu" else "<|endoftext|>")


class Pipeline:
    """SD 1.x / 2.x (one text encoder, its last hidden state) and SDXL (two encoders, penultimate hidden states
    concatenated, pooled embedding and size/crop ids as extra conditioning), as diffusers' StableDiffusionPipeline
    and StableDiffusionXLPipeline."""

    def __init__(self, path: Path, family: str, tokenizers: list[CLIPTokenizer], text_encoders: list[CLIPTextModel],
                 unet: UNet, vae: AutoencoderKL, scheduler_config: dict, name: str | None = None,
                 force_zeros_for_empty_prompt: bool = False):
        self.path = path
        self.family = family
        self.name = name or path.name
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = vae.cfg.downscale
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.timings = Timings()

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, variant: str | None = None,
             random_weights: int | None = None, vae: str | Path | None = None,
             config_dir: str | Path | None = None) -> "Pipeline":
        """Load a model: a diffusers folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/) or
        a single-file .safetensors checkpoint (configs from config_dir, else those sdgen ships for its family).

        vae=PATH replaces the model's VAE with a separately downloaded one (diffusers or original format).
        random_weights=SEED builds the architecture from the configs with random weights instead (benchmarks on
        machines without the checkpoint: the same compute, clearly not a real model).
        """
        t0 = time.perf_counter()
        path = Path(path)
        src = open_model(path, variant, random_weights, None if config_dir is None else Path(config_dir))
        encoders = ["text_encoder", "text_encoder_2"] if src.family == "sdxl" else ["text_encoder"]
        text_encoders, tokenizers = [], []
        for component in encoders:
            cfg, tensors = src.components[component]
            text_encoders.append(CLIPTextModel(CLIPTextConfig.from_dict(cfg), tensors, source=f"{path}:{component}"))
            tokenizers.append(_tokenizer(src.tokenizer_dirs["tokenizer" + component[len("text_encoder"):]], cfg))
        unet_cfg, unet_tensors = src.components["unet"]
        vae_cfg, vae_tensors = src.components["vae"]
        if vae is not None and Path(vae).is_dir():  # a diffusers vae/ folder
            vae_cfg, vae_tensors = checkpoint.load_component(Path(vae).parent, Path(vae).name)
        elif vae is not None:
            vae_cfg, vae_tensors = checkpoint.load_vae_file(Path(vae), config=vae_cfg)
        unet = UNet(UNetConfig.from_dict(unet_cfg), unet_tensors, source=f"{path}:unet")
        vae_model = AutoencoderKL(VAEConfig.from_dict(vae_cfg), vae_tensors, source=f"{vae or path}:vae",
                                  encoder=random_weights is None)
        force_zeros = src.family == "sdxl" and src.model_index.get("force_zeros_for_empty_prompt", True)
        pipe = cls(path, src.family, tokenizers, text_encoders, unet, vae_model, src.scheduler_config,
                   name or (path.stem if path.is_file() else path.name), force_zeros_for_empty_prompt=force_zeros)
        pipe.timings.load_s = time.perf_counter() - t0
        return pipe

    # -- stages -------------------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Context (B, 77, D) and, for SDXL, the pooled embedding (B, D2) of a list of prompts."""
        if self.family == "sd":
            tok, enc = self.tokenizers[0], self.text_encoders[0]
            ids = np.stack([tok(p, max_length=tok.model_max_length) for p in prompts])
            return enc(ids).last_hidden_state, None
        contexts, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = np.stack([tok(p, max_length=tok.model_max_length) for p in prompts])
            out = enc(ids, output_hidden_states=True)
            contexts.append(out.hidden_states[-2])
            if enc.text_projection is not None:
                pooled = out.pooled
        return np.concatenate(contexts, axis=-1), pooled

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str | None], guided: bool) -> Conditioning:
        """Encode prompts; with guidance, negative rows come first. A negative prompt of None is the empty prompt,
        except for SDXL models that zero the unconditional embeddings instead (force_zeros_for_empty_prompt)."""
        t0 = time.perf_counter()
        context, pooled = self._encode(prompts)
        if guided:
            if self.force_zeros_for_empty_prompt and all(n is None for n in negative_prompts):
                neg_context, neg_pooled = np.zeros_like(context), None if pooled is None else np.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self._encode([n or "" for n in negative_prompts])
            context = np.concatenate([neg_context, context])
            if pooled is not None:
                pooled = np.concatenate([neg_pooled, pooled])
        self.timings.text_encode_s += time.perf_counter() - t0
        return Conditioning(np.ascontiguousarray(context, dtype=np.float32), guided,
                            None if pooled is None else np.ascontiguousarray(pooled, dtype=np.float32))

    def generate_latents(self, cond: Conditioning, seeds: list[int], steps: int, guidance: float, width: int,
                         height: int, scheduler: str | None = None,
                         scheduler_options: dict | None = None) -> Iterator[np.ndarray]:
        """Yield the latents after each denoising step (the last yield is the final latents).

        scheduler: a name from sdgen.schedulers (None: the model's own); scheduler_options override config keys
        (e.g. {"timestep_spacing": "trailing"})."""
        sched = make_scheduler(scheduler, self.scheduler_config, **(scheduler_options or {}))
        sched.set_timesteps(steps)
        generator = BatchGenerator(seeds)
        shape = (len(seeds), self.unet.cfg.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = (generator.randn(shape) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        extra = {}
        if cond.pooled is not None:
            # SDXL's micro-conditioning: original size, crop top-left, target size (diffusers' defaults)
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            extra = {"text_embeds": cond.pooled, "time_ids": np.tile(time_ids, (cond.pooled.shape[0], 1))}
        for t in sched.timesteps:
            t0 = time.perf_counter()
            x = np.concatenate([latents, latents]) if cond.guided else latents
            x = sched.scale_model_input(x, t)
            noise = self.unet(x, t, cond.context, **extra)
            if cond.guided:
                uncond, text = np.split(noise, 2)
                noise = uncond + np.float32(guidance) * (text - uncond)
            latents = sched.step(noise, t, latents, generator=generator)
            self.timings.unet_steps_s.append(time.perf_counter() - t0)
            yield latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3)."""
        t0 = time.perf_counter()
        images = self.vae.decode((latents / np.float32(self.vae.cfg.scaling_factor)).astype(np.float32))
        self.timings.vae_decode_s += time.perf_counter() - t0
        return to_uint8(images)

    # -- the whole job ------------------------------------------------------------------------------------------

    def default_size(self) -> int:
        return (self.unet.cfg.sample_size or 64) * self.vae_scale_factor

    def check_request(self, steps: int, width: int, height: int) -> None:
        if steps < 1:
            raise UsageError(f"--steps must be at least 1 (got {steps})")
        for label, v in (("width", width), ("height", height)):
            if v < 8 or v % 8:
                raise UsageError(f"--{label} must be a positive multiple of 8 (got {v})")
        if width * height > MAX_PIXELS:
            raise UsageError(f"{width}x{height} is too large (at most {MAX_PIXELS} pixels)")

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, seed: int | list[int] = 0,
                steps: int = 20, guidance: float = 7.5, width: int | None = None, height: int | None = None,
                scheduler: str | None = None) -> np.ndarray:
        """Generate images; returns (H, W, 3) uint8 for one prompt and seed, else (B, H, W, 3)."""
        single = isinstance(prompt, str) and not isinstance(seed, (list, tuple))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        width = width or self.default_size()
        height = height or self.default_size()
        self.check_request(steps, width, height)
        cond = self.encode_prompt(prompts, negatives, guided=guidance > 1.0)
        latents = None
        for latents in self.generate_latents(cond, seeds, steps, guidance, width, height, scheduler):
            pass
        images = self.decode(latents)
        return images[0] if single else images
