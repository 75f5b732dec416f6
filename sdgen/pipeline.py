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
from .errors import BadModelFileError, UsageError
from .image import to_uint8
from .models.clip import CLIPTextConfig, CLIPTextModel
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


@dataclass
class Timings:
    load_s: float = 0.0
    text_encode_s: float = 0.0
    unet_steps_s: list = field(default_factory=list)
    vae_decode_s: float = 0.0


def _family(model_index: dict) -> str:
    cls = model_index.get("_class_name", "")
    if "XL" in cls or "text_encoder_2" in model_index:
        return "sdxl"
    return "sd"


class Pipeline:
    def __init__(self, path: Path, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet,
                 vae: AutoencoderKL, scheduler_config: dict, name: str | None = None):
        self.path = path
        self.name = name or path.name
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.vae_scale_factor = vae.cfg.downscale
        self.timings = Timings()

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, variant: str | None = None) -> "Pipeline":
        """Load a diffusers-layout model folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/)."""
        t0 = time.perf_counter()
        path = Path(path)
        model_index = checkpoint.read_model_index(path)
        if _family(model_index) != "sd":
            raise BadModelFileError(f"{path}: {model_index.get('_class_name')} models are not supported yet")
        te_cfg, te_tensors = checkpoint.load_component(path, "text_encoder", variant)
        unet_cfg, unet_tensors = checkpoint.load_component(path, "unet", variant)
        vae_cfg, vae_tensors = checkpoint.load_component(path, "vae", variant)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(te_cfg), te_tensors, source=str(path / "text_encoder"))
        unet = UNet(UNetConfig.from_dict(unet_cfg), unet_tensors, source=str(path / "unet"))
        vae = AutoencoderKL(VAEConfig.from_dict(vae_cfg), vae_tensors, source=str(path / "vae"))
        tok_dir = path / "tokenizer"
        if (tok_dir / "vocab.json").exists():
            tokenizer = CLIPTokenizer.from_folder(tok_dir)
        else:
            # SD2's OpenCLIP text encoder pads with "!"; SD1's CLIP with the end-of-text token
            tokenizer = CLIPTokenizer.default(pad_token="!" if te_cfg.get("hidden_act") == "gelu" else "<|endoftext|>")
        pipe = cls(path, tokenizer, text_encoder, unet, vae, checkpoint.load_scheduler_config(path), name)
        pipe.timings.load_s = time.perf_counter() - t0
        return pipe

    # -- stages -------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str], guided: bool) -> Conditioning:
        t0 = time.perf_counter()
        max_length = self.tokenizer.model_max_length
        ids = np.stack([self.tokenizer(p, max_length=max_length) for p in prompts])
        context = self.text_encoder(ids).last_hidden_state
        if guided:
            neg_ids = np.stack([self.tokenizer(p, max_length=max_length) for p in negative_prompts])
            context = np.concatenate([self.text_encoder(neg_ids).last_hidden_state, context])
        self.timings.text_encode_s += time.perf_counter() - t0
        return Conditioning(np.ascontiguousarray(context, dtype=np.float32), guided)

    def generate_latents(self, cond: Conditioning, seeds: list[int], steps: int, guidance: float, width: int,
                         height: int, scheduler: str | None = None) -> Iterator[np.ndarray]:
        """Yield the latents after each denoising step (the last yield is the final latents)."""
        sched = make_scheduler(scheduler, self.scheduler_config)
        sched.set_timesteps(steps)
        generator = BatchGenerator(seeds)
        shape = (len(seeds), self.unet.cfg.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = (generator.randn(shape) * np.float32(sched.init_noise_sigma)).astype(np.float32)
        for t in sched.timesteps:
            t0 = time.perf_counter()
            x = np.concatenate([latents, latents]) if cond.guided else latents
            x = sched.scale_model_input(x, t)
            noise = self.unet(x, t, cond.context)
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

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", seed: int | list[int] = 0,
                steps: int = 20, guidance: float = 7.5, width: int | None = None, height: int | None = None,
                scheduler: str | None = None) -> np.ndarray:
        """Generate images; returns (H, W, 3) uint8 for one prompt and seed, else (B, H, W, 3)."""
        single = isinstance(prompt, str) and not isinstance(seed, (list, tuple))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        width = width or self.default_size()
        height = height or self.default_size()
        self.check_request(steps, width, height)
        cond = self.encode_prompt(prompts, negatives, guided=guidance > 1.0)
        latents = None
        for latents in self.generate_latents(cond, seeds, steps, guidance, width, height, scheduler):
            pass
        images = self.decode(latents)
        return images[0] if single else images
