"""Text to image: encode the prompt, run the scheduler loop over the UNet, decode the latents.

    prompt ─ tokenizer ─ text encoder ─┐
    seed ─ rng ─ initial latents ──────┼─ scheduler loop { unet → guidance → scheduler.step } ─ VAE decode ─ pixels
    model folder ─ checkpoint loader ──┘

Every step mirrors diffusers' StableDiffusionPipeline so that the same model, prompt, seed and scheduler give the
same image. ``generate_latents`` is a generator yielding after each step, so progress bars, previews and timings
hang off the loop from the outside.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import checkpoint
from .conditioning import check_clip_skip, encode_texts, pad_chunks
from .errors import UsageError
from .lora import merge_loras
from .image import to_uint8
from .models.clip import CLIPTextConfig, CLIPTextModel
from . import memory
from .models.layers import RandomParams, conv_filters, relaid_weights
from .models.layers import weights_dtype as _weights_dtype
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
        else:  # as stored, memory-mapped: each model converts (once) what it keeps to its weights dtype
            components[name] = checkpoint.load_component(root, name, variant, dtype=None)
    tokenizer_dirs = {t: (root / t if (root / t / "vocab.json").exists() or (root / t / "tokenizer.json").exists()
                          else None) for t in ("tokenizer", "tokenizer_2")}
    return ModelSource(family, model_index, checkpoint.load_scheduler_config(root), components, tokenizer_dirs)


def _lazy_text_encoders(src: ModelSource, path: Path, dtype) -> tuple[list[CLIPTokenizer], list]:
    """_build_text_encoders, each encoder a memory.LazyModel (built at its first use)."""
    encoders = ["text_encoder", "text_encoder_2"] if src.family == "sdxl" else ["text_encoder"]
    text_encoders, tokenizers = [], []
    for component in encoders:
        cfg, tensors = src.components[component]

        def build(cfg=cfg, tensors=tensors, component=component):
            with _weights_dtype(dtype):
                return CLIPTextModel(CLIPTextConfig.from_dict(cfg), tensors, source=f"{path}:{component}")

        text_encoders.append(memory.LazyModel(build, CLIPTextConfig.from_dict(cfg), component))
        tokenizers.append(_tokenizer(src.tokenizer_dirs["tokenizer" + component[len("text_encoder"):]], cfg))
    return tokenizers, text_encoders


def _stored_bytes(tensors) -> float | None:
    """Bytes per parameter of a component's tensors as loaded (None for random weights)."""
    if not isinstance(tensors, dict) or not tensors:
        return None
    n = sum(t.size for t in tensors.values())
    return sum(t.nbytes for t in tensors.values()) / max(n, 1)


def _check_memory(src: ModelSource, dtype_name: str, one_shot: bool, run: dict) -> None:
    """OutOfMemoryError if the run's estimated peak (sdgen.memory.estimate) exceeds the memory available."""
    configs = {name: cfg for name, (cfg, _) in src.components.items()}
    stored = {name: b for name, (_, t) in src.components.items() if (b := _stored_bytes(t)) is not None}
    default = (configs["unet"].get("sample_size") or 64) * 2 ** (len(configs["vae"].get("block_out_channels",
                                                                                        [0] * 4)) - 1)
    est = memory.estimate(configs, src.family, run.get("width") or default, run.get("height") or default,
                          run.get("batch", 1),
                          run.get("guided", True), dtype_name, stored, one_shot, run.get("vae_tiling"),
                          conv_filters=conv_filters())
    memory.check(est, run.get("available"), dtype_name, run.get("batch", 1))


def _sd_family(parts: dict) -> str:
    """sd1 or sd2 from a converted single file: OpenCLIP (SD2) text encoders use gelu."""
    return "sd2" if parts["text_encoder"][0].get("hidden_act") == "gelu" else "sd1"


def _tokenizer(folder: Path | None, te_cfg: dict) -> CLIPTokenizer:
    if folder is not None:
        return CLIPTokenizer.from_folder(folder)
    # OpenCLIP text encoders (SD2, SDXL's second) pad with "!"; OpenAI's CLIP with the end-of-text token
    return CLIPTokenizer.default(pad_token="!" if te_cfg.get("hidden_act") == "gelu" else "<|endoftext|>")


def _lora_requests(loras) -> list:
    """LoraRequest objects from LoraRequests, (path, scale) pairs or "PATH[:SCALE]" strings."""
    from .lora import LoraRequest, parse_lora_option

    out = []
    for item in loras or []:
        if isinstance(item, LoraRequest):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_lora_option(item))
        elif isinstance(item, Path):
            out.append(LoraRequest(item))
        else:
            path, scale = item
            out.append(LoraRequest(Path(path), float(scale)))
    return out


def _build_text_encoders(src: ModelSource, path: Path) -> tuple[list[CLIPTokenizer], list[CLIPTextModel]]:
    """The tokenizers and text encoders of a model source (one for SD 1.x/2.x, two for SDXL)."""
    encoders = ["text_encoder", "text_encoder_2"] if src.family == "sdxl" else ["text_encoder"]
    text_encoders, tokenizers = [], []
    for component in encoders:
        cfg, tensors = src.components[component]
        text_encoders.append(CLIPTextModel(CLIPTextConfig.from_dict(cfg), tensors, source=f"{path}:{component}"))
        tokenizers.append(_tokenizer(src.tokenizer_dirs["tokenizer" + component[len("text_encoder"):]], cfg))
    return tokenizers, text_encoders


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
        self.clip_skip = 0  # text-encoder layers skipped, diffusers' numbering (the CLI's --clip-skip N is N - 1)
        self.loras: list = []  # the LoRAs merged into the weights (sdgen.lora.LoraRequest)
        self.taesd = None      # a TinyAutoencoder that decodes instead of the VAE (--taesd)
        self._reopen = (None, None, None)  # variant, random_weights, config_dir: how to read the weights again
        self.weights_dtype = "auto"  # --weights-dtype: the precision the weights are held at (sdgen.memory)
        # a run of one batch: models are built when first used and released when done (text encoders after
        # encoding, the UNet after denoising), so that they are never in memory together
        self.one_shot = False
        self.vae_tiling = None   # None: above a size (memory.auto_vae_tiling); True/False: always/never
        self.vae_slicing = True  # decode a batch one image at a time (same images, a batch's memory / batch size)
        self.timings = Timings()

    @classmethod
    def load(cls, path: str | Path, name: str | None = None, variant: str | None = None,
             random_weights: int | None = None, vae: str | Path | None = None,
             config_dir: str | Path | None = None, loras: list | None = None,
             taesd: str | Path | None = None, weights_dtype: str | None = None, one_shot: bool = False,
             memory_check: dict | None = None) -> "Pipeline":
        """Load a model: a diffusers folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/) or
        a single-file .safetensors checkpoint (configs from config_dir, else those sdgen ships for its family).

        vae=PATH replaces the model's VAE with a separately downloaded one (diffusers or original format).
        loras=[(path, scale) or LoraRequest, ...] merges LoRAs into the UNet and text-encoder weights before the
        models are built (sdgen.lora); ``set_loras`` changes them later.
        taesd=PATH decodes with the tiny autoencoder TAESD instead of the VAE (sdgen.models.taesd).
        random_weights=SEED builds the architecture from the configs with random weights instead (benchmarks on
        machines without the checkpoint: the same compute, clearly not a real model).
        weights_dtype: "fp32", "fp16", "bf16" or "auto"/None (as the checkpoint stores them): the precision the
        weights are held at (computation is float32 either way). one_shot: the pipeline will run one batch; each
        model is built when first needed and released when done (see sdgen.memory). memory_check: the run's
        {"width", "height", "batch", "guided"}: raise OutOfMemoryError before building anything when the
        estimated peak exceeds the memory available.
        """
        t0 = time.perf_counter()
        path = Path(path)
        dtype_name = weights_dtype or "auto"
        dtype = memory.weights_dtype(dtype_name)
        src = open_model(path, variant, random_weights, None if config_dir is None else Path(config_dir))
        if memory_check is not None:
            _check_memory(src, dtype_name, one_shot, memory_check)
        lora_requests = _lora_requests(loras)
        if lora_requests:
            src.components, _ = merge_loras(src.components, lora_requests)
        unet_cfg, unet_tensors = src.components["unet"]
        vae_cfg, vae_tensors = src.components["vae"]
        if vae is not None and Path(vae).is_dir():  # a diffusers vae/ folder
            vae_cfg, vae_tensors = checkpoint.load_component(Path(vae).parent, Path(vae).name)
        elif vae is not None:
            vae_cfg, vae_tensors = checkpoint.load_vae_file(Path(vae), config=vae_cfg)

        def build_unet():
            with _weights_dtype(dtype), relaid_weights():
                return UNet(UNetConfig.from_dict(unet_cfg), unet_tensors, source=f"{path}:unet")

        def build_vae():
            with _weights_dtype(dtype), relaid_weights():
                return AutoencoderKL(VAEConfig.from_dict(vae_cfg), vae_tensors, source=f"{vae or path}:vae",
                                     encoder=random_weights is None)

        if one_shot:  # built when first used, released when done
            tokenizers, text_encoders = _lazy_text_encoders(src, path, dtype)
            unet = memory.LazyModel(build_unet, UNetConfig.from_dict(unet_cfg), "unet")
            vae_model = memory.LazyModel(build_vae, VAEConfig.from_dict(vae_cfg), "vae")
        else:
            with _weights_dtype(dtype):
                tokenizers, text_encoders = _build_text_encoders(src, path)
            unet, vae_model = build_unet(), build_vae()
        force_zeros = src.family == "sdxl" and src.model_index.get("force_zeros_for_empty_prompt", True)
        pipe = cls(path, src.family, tokenizers, text_encoders, unet, vae_model, src.scheduler_config,
                   name or (path.stem if path.is_file() else path.name), force_zeros_for_empty_prompt=force_zeros)
        pipe.loras = lora_requests
        pipe._reopen = (variant, random_weights, None if config_dir is None else Path(config_dir))
        pipe.weights_dtype = dtype_name
        pipe.one_shot = one_shot
        if taesd is not None:
            from .models.taesd import load_taesd
            pipe.taesd = load_taesd(taesd)
        pipe.timings.load_s = time.perf_counter() - t0
        return pipe

    def set_loras(self, loras: list | None) -> None:
        """Switch to another set of LoRAs (an empty list: none). Merged weights are never un-merged by subtraction:
        the components the old or new LoRAs touch are rebuilt from the model's original tensors (read again from
        its files) with the new LoRAs merged, so the result is exactly what loading with them gives."""
        from .lora import components_touched

        requests = _lora_requests(loras)
        if requests == self.loras:
            return
        touched = components_touched(self.loras + requests)
        variant, random_weights, config_dir = self._reopen
        src = open_model(self.path, variant, random_weights, config_dir)
        src.components.pop("vae", None)
        if requests:
            src.components, _ = merge_loras(src.components, requests)
        with _weights_dtype(memory.weights_dtype(self.weights_dtype)):
            if touched & {"text_encoder", "text_encoder_2"}:
                self.tokenizers, self.text_encoders = _build_text_encoders(src, self.path)
            if "unet" in touched:
                cfg, tensors = src.components["unet"]
                self.unet = UNet(UNetConfig.from_dict(cfg), tensors, source=f"{self.path}:unet")
        self.loras = requests

    # -- stages -------------------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], clip_skip: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Context (B, 77 * chunks, D) and, for SDXL, the pooled embedding (B, D2) of a list of prompts: weighting
        syntax and long prompts as in sdgen.prompt_weights, the layer as in sdgen.conditioning."""
        skip = check_clip_skip(self.clip_skip if clip_skip is None else clip_skip, self.text_encoders)
        context, pooled, _ = encode_texts(self.tokenizers, self.text_encoders, self.family, prompts, skip)
        return context, pooled

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str | None], guided: bool,
                      clip_skip: int | None = None) -> Conditioning:
        """Encode prompts; with guidance, negative rows come first. A negative prompt of None is the empty prompt,
        except for SDXL models that zero the unconditional embeddings instead (force_zeros_for_empty_prompt).
        clip_skip: encoder layers to skip, diffusers' numbering (None: the pipeline's ``clip_skip``, default 0)."""
        self._build(self.text_encoders)
        t0 = time.perf_counter()
        context, pooled = self._encode(prompts, clip_skip)
        if guided:
            if self.force_zeros_for_empty_prompt and all(n is None for n in negative_prompts):
                neg_context, neg_pooled = np.zeros_like(context), None if pooled is None else np.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self._encode([n or "" for n in negative_prompts], clip_skip)
            if neg_context.shape[1] != context.shape[1]:  # long prompts: pad the shorter side with empty chunks
                length = max(neg_context.shape[1], context.shape[1])
                empty = self._encode([""], clip_skip)[0][0]
                context, neg_context = pad_chunks(context, length, empty), pad_chunks(neg_context, length, empty)
            context = np.concatenate([neg_context, context])
            if pooled is not None:
                pooled = np.concatenate([neg_pooled, pooled])
        if self.one_shot:  # the one batch is encoded: the text encoders are not needed any more
            self.release("text_encoders")
        self.timings.text_encode_s += time.perf_counter() - t0
        return Conditioning(np.ascontiguousarray(context, dtype=np.float32), guided,
                            None if pooled is None else np.ascontiguousarray(pooled, dtype=np.float32))

    def generate_latents(self, cond: Conditioning, seeds: list[int], steps: int, guidance: float, width: int,
                         height: int, scheduler: str | None = None,
                         scheduler_options: dict | None = None, init=None) -> Iterator[np.ndarray]:
        """Yield the latents after each denoising step (the last yield is the final latents).

        scheduler: a name from sdgen.schedulers (None: the model's own); scheduler_options override config keys
        (e.g. {"timestep_spacing": "trailing"}). init: an sdgen.img2img.ImageInit (init image, strength, optional
        mask) to start from instead of pure noise (img2img, inpainting)."""
        if self.unet.cfg.in_channels != self.vae.cfg.latent_channels and (init is None or init.mask is None):
            raise UsageError(f"{self.name} is an inpainting model (its UNet takes {self.unet.cfg.in_channels} "
                             "channels): use img2img with --mask")
        self._build([self.unet])
        sched = make_scheduler(scheduler, self.scheduler_config, **(scheduler_options or {}))
        sched.set_timesteps(steps)
        generator = BatchGenerator(seeds)
        unet_extra = blend = None
        if init is None:
            shape = (len(seeds), self.vae.cfg.latent_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            latents = (generator.randn(shape) * np.float32(sched.init_noise_sigma)).astype(np.float32)
            timesteps = sched.timesteps
        else:
            start = init.start(self, sched, generator, steps)
            latents, timesteps, unet_extra, blend = start.latents, start.timesteps, start.unet_extra, start.blend
        extra = {}
        if cond.pooled is not None:
            # SDXL's micro-conditioning: original size, crop top-left, target size (diffusers' defaults)
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            extra = {"text_embeds": cond.pooled, "time_ids": np.tile(time_ids, (cond.pooled.shape[0], 1))}
        for i, t in enumerate(timesteps):
            t0 = time.perf_counter()
            x = sched.scale_model_input(latents, t)
            if unet_extra is not None:  # inpainting UNet: + mask and masked-image latents
                x = np.concatenate([x, unet_extra], axis=1)
            # with guidance the latents once, the contexts twice (negative rows first): the UNet gives diffusers'
            # result on the latents doubled, running the layers before the first cross-attention once
            noise = self.unet(x, t, cond.context, **extra)
            if cond.guided:
                uncond, text = np.split(noise, 2)
                noise = uncond + np.float32(guidance) * (text - uncond)
            latents = sched.step(noise, t, latents, generator=generator)
            if blend is not None:  # inpainting with an ordinary UNet: the kept region put back
                latents = blend(latents, i)
            self.timings.unet_steps_s.append(time.perf_counter() - t0)
            yield latents
        if self.one_shot:  # the one batch is denoised: the UNet is not needed any more
            self.release("unet")

    def _build(self, models: list) -> None:
        """Build the models of a one-shot pipeline not built yet (counted as loading time, not the stage's)."""
        t0 = time.perf_counter()
        for model in models:
            if isinstance(model, memory.LazyModel):
                model.model()
        self.timings.load_s += time.perf_counter() - t0

    def release(self, what: str) -> None:
        """Free a model built on first use (one-shot pipelines): "text_encoders", "unet" or "vae". It is built
        again if used later. Models of ordinary pipelines are kept."""
        for model in (self.text_encoders if what == "text_encoders" else [getattr(self, what)]):
            memory.release(model)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3), with TAESD when the pipeline has one (``taesd=`` at load)."""
        if self.taesd is None:
            self._build([self.vae])
        t0 = time.perf_counter()
        scaling = self.taesd.scaling_factor if self.taesd is not None else self.vae.cfg.scaling_factor
        z = (latents / np.float32(scaling)).astype(np.float32)
        if self.taesd is not None:
            images = self.taesd.decode(z)
        else:  # tiles above a size (or as asked), one image at a time (vae_slicing)
            h, w = z.shape[2] * self.vae_scale_factor, z.shape[3] * self.vae_scale_factor
            tiling = self.vae_tiling
            if tiling is None:
                tiling = memory.auto_vae_tiling(dataclasses.asdict(self.vae.cfg), h, w)
            images = self.vae.decode(z, tiling=tiling, slicing=self.vae_slicing)
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
        return self._generate(prompt, negative_prompt, seed, steps, guidance, width or self.default_size(),
                              height or self.default_size(), scheduler, None)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, mask=None,
                negative_prompt: str | list[str] | None = None, seed: int | list[int] = 0, steps: int = 20,
                guidance: float = 7.5, width: int | None = None, height: int | None = None,
                scheduler: str | None = None) -> np.ndarray:
        """Generate from an init image (a path or RGB uint8 array), as diffusers' img2img pipelines; with ``mask``
        (a path or uint8 array, white = repaint) as its inpainting pipeline. The size defaults to the image's,
        rounded down to a multiple of 8; another size resizes the image (and mask) with a Lanczos filter."""
        from .img2img import ImageInit, default_size, read_image

        image = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        if mask is not None and isinstance(mask, (str, Path)):
            mask = read_image(mask)
        w, h = default_size(image, self.vae_scale_factor)
        width, height = width or w, height or h
        self.check_request(steps, width, height)
        batch = len(seed) if isinstance(seed, (list, tuple)) else (1 if isinstance(prompt, str) else len(prompt))
        init = ImageInit.from_arrays(image, width, height, strength, batch, mask)
        return self._generate(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, init)

    def _generate(self, prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, init) -> np.ndarray:
        single = isinstance(prompt, str) and not isinstance(seed, (list, tuple))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        self.check_request(steps, width, height)
        cond = self.encode_prompt(prompts, negatives, guided=guidance > 1.0)
        latents = None
        for latents in self.generate_latents(cond, seeds, steps, guidance, width, height, scheduler, init=init):
            pass
        images = self.decode(latents)
        return images[0] if single else images
