"""Image to image and inpainting: where the denoising loop starts from when an image is given.

img2img, as diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline::

    image ─ resize (Lanczos) ─ [-1, 1] ─ VAE encode ─ sample (noise from the image's generator) ─ x scaling factor
    timesteps: of ``steps``, the last int(steps * strength) are run (the scheduler starts at that index)
    latents = scheduler.add_noise(image latents, noise from the generator, first of those timesteps)

Inpainting (``mask``: white = repaint, black = keep), as diffusers' StableDiffusionInpaintPipeline:

    mask ─ greyscale ─ resize (Lanczos) ─ [0, 1] ─ binarised at 0.5; masked image = image where the mask is black
    strength 1: the latents start as pure noise (the image is not encoded); else as img2img
    masked image ─ VAE encode ─ sample ─ x scaling factor; mask ─ nearest ─ latent size
    9-channel inpainting UNets: [latents, mask, masked-image latents] are its input at every step
    ordinary 4-channel UNets: after every step the kept region is put back: the image latents noised to the next
    timestep where the mask is black, the denoised latents where it is white

Random draws happen in diffusers' order, from each image's own generator: the image's posterior sample (when
encoded), the starting noise, the masked image's posterior sample, then the scheduler's draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError


# ------------------------------------------------------------------------------------------- images in
def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); UsageError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UsageError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path}: cannot read the image ({e})") from None


def default_size(image: np.ndarray, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of the image rounded down to a multiple of ``multiple``, as diffusers picks the output size."""
    h, w = image.shape[:2]
    width, height = (w // multiple) * multiple, (h // multiple) * multiple
    if width < multiple or height < multiple:
        raise UsageError(f"the image is {w}x{h}: at least {multiple}x{multiple} pixels are needed")
    return width, height


def _resized(image: np.ndarray, width: int, height: int, mode: str | None = None) -> np.ndarray:
    """Resized with PIL's Lanczos filter, as diffusers' VaeImageProcessor (unchanged at the same size)."""
    from PIL import Image

    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.asarray(Image.fromarray(image, mode).resize((width, height), resample=Image.LANCZOS))


def preprocess_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (1, 3, height, width) float32 in [-1, 1]."""
    x = _resized(np.ascontiguousarray(image[..., :3]), width, height).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)[None])


def preprocess_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask image (H, W) or (H, W, 3) uint8 -> (1, 1, height, width) float32 of 0 (keep) and 1 (repaint):
    greyscale as PIL's "L" conversion, resized, binarised at 0.5."""
    from PIL import Image

    if mask.ndim == 3:
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask[..., :3])).convert("L"))
    m = _resized(np.ascontiguousarray(mask), width, height).astype(np.float32) / np.float32(255.0)
    return (m >= 0.5).astype(np.float32)[None, None]


def nearest_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, height, width) by nearest neighbour, as torch's interpolate(mode="nearest")."""
    h, w = x.shape[2:]
    rows = np.minimum((np.arange(height) * np.float32(h / height)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(width) * np.float32(w / width)).astype(np.int64), w - 1)
    return np.ascontiguousarray(x[:, :, rows][:, :, :, cols])


# ------------------------------------------------------------------------------------------- the start
def strength_timesteps(sched, steps: int, strength: float) -> np.ndarray:
    """The timesteps an img2img run of ``steps`` at ``strength`` goes through (diffusers' get_timesteps): the last
    int(steps * strength) steps; the scheduler is told where it starts (set_begin_index)."""
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    order = getattr(sched, "order", 1)
    timesteps = sched.timesteps[start * order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * order)
    if steps - start < 1:
        raise UsageError(f"--strength {strength:g} with {steps} steps leaves no step to run "
                         f"(int(steps * strength) must be at least 1)")
    return timesteps


def encode_latents(vae, images: np.ndarray, generator) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents, sampled from the VAE's posterior (mean + std * noise, the
    noise drawn from each image's generator)."""
    if vae.encoder is None:
        raise UsageError("this model's VAE has no encoder, which img2img and inpainting need")
    means, logvars = [], []
    for i in range(images.shape[0]):  # one by one, as diffusers encodes with a list of generators
        mean, logvar = vae.encode(images[i:i + 1])
        means.append(mean)
        logvars.append(logvar)
    mean, logvar = np.concatenate(means), np.concatenate(logvars)
    std = np.exp(np.float32(0.5) * logvar).astype(np.float32)
    sample = mean + std * generator.randn(mean.shape).astype(np.float32)
    return (np.float32(vae.cfg.scaling_factor) * sample).astype(np.float32)


@dataclass
class Start:
    """How a denoising loop begins and what it adds at each step."""

    latents: np.ndarray                   # (B, 4, h, w) starting latents
    timesteps: np.ndarray                 # the timesteps to run
    unet_extra: np.ndarray | None = None  # (B, 5, h, w) [mask, masked-image latents], for 9-channel UNets
    blend: object | None = None           # callable(latents, i) -> latents, for 4-channel inpainting


@dataclass
class ImageInit:
    """An init image (and optionally a mask) for a batch: ``image`` (B, 3, H, W) in [-1, 1] at the output size,
    ``mask`` (B, 1, H, W) of 0/1 (1 = repaint), ``strength`` in (0, 1]."""

    image: np.ndarray
    strength: float = 0.75
    mask: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, image: np.ndarray, width: int, height: int, strength: float, batch: int,
                    mask: np.ndarray | None = None) -> "ImageInit":
        """From uint8 arrays (as read_image gives), resized to width x height, repeated for a batch."""
        if not 0.0 < strength <= 1.0:
            raise UsageError(f"--strength must be in (0, 1] (got {strength:g})")
        img = np.repeat(preprocess_image(image, width, height), batch, axis=0)
        m = None if mask is None else np.repeat(preprocess_mask(mask, width, height), batch, axis=0)
        return cls(img, strength, m)

    def start(self, pipe, sched, generator, steps: int) -> Start:
        """The starting latents and per-step extras for ``pipe``'s models (draws from ``generator``)."""
        timesteps = strength_timesteps(sched, steps, self.strength)
        vae = pipe.vae
        batch = self.image.shape[0]
        first = np.repeat(np.asarray(timesteps[:1]), batch)
        in_channels = pipe.unet.cfg.in_channels
        latent_channels = vae.cfg.latent_channels
        if self.mask is None:
            image_latents = encode_latents(vae, self.image, generator)
            noise = generator.randn(image_latents.shape).astype(np.float32)
            return Start(sched.add_noise(image_latents, noise, first).astype(np.float32), timesteps)

        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise UsageError(f"the UNet takes {in_channels} channels: inpainting needs {latent_channels} (any "
                             f"model) or {2 * latent_channels + 1} (an inpainting model)")
        inpainting_unet = in_channels == 2 * latent_channels + 1
        full = self.strength == 1.0
        h, w = self.image.shape[2] // pipe.vae_scale_factor, self.image.shape[3] // pipe.vae_scale_factor
        image_latents = None
        if not inpainting_unet or not full:
            image_latents = encode_latents(vae, self.image, generator)
        noise = generator.randn((batch, latent_channels, h, w)).astype(np.float32)
        if full:
            latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            latents = sched.add_noise(image_latents, noise, first).astype(np.float32)
        masked = (self.image * (self.mask < 0.5)).astype(np.float32)
        masked_latents = encode_latents(vae, masked, generator)
        mask = nearest_resize(self.mask, h, w)
        if inpainting_unet:
            return Start(latents, timesteps, unet_extra=np.concatenate([mask, masked_latents], axis=1))

        def blend(current: np.ndarray, i: int) -> np.ndarray:
            kept = image_latents
            if i < len(timesteps) - 1:
                kept = sched.add_noise(image_latents, noise, np.asarray([timesteps[i + 1]]))
            return ((1 - mask) * kept + mask * current).astype(np.float32)

        return Start(latents, timesteps, blend=blend)
