"""Images out: the VAE's float output -> uint8 pixels, grids, and PNG files carrying their generation parameters.

The parameters go in a PNG text chunk named ``parameters`` in the AUTOMATIC1111 layout, which other Stable
Diffusion tools read::

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 0, Size: 512x512, Model: sd15
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import OutputError, UsageError


# ------------------------------------------------------------------------------------------------ pixels
def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output, NCHW (or CHW) floats in [-1, 1] -> NHWC uint8, exactly as diffusers' postprocess to PIL.

    diffusers: ``(x * 0.5 + 0.5).clamp(0, 1)`` in float32, then ``(x * 255).round().astype("uint8")`` in
    numpy float32 (round half to even). NaN pixels become 0.
    """
    x = np.asarray(decoded, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {x.shape}")
    x = x * np.float32(0.5) + np.float32(0.5)
    np.clip(x, np.float32(0), np.float32(1), out=x)
    x = x.transpose(0, 2, 3, 1) * np.float32(255)
    np.round(x, out=x)
    x[np.isnan(x)] = 0
    return x.astype(np.uint8)


def make_grid(images: Sequence[np.ndarray] | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Images (HWC uint8, all one size) laid out row by row on a rows x cols grid, like diffusers'
    ``make_image_grid``; cells left over when there are fewer images are black."""
    images = list(images)
    if not images or len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    h, w = images[0].shape[:2]
    channels = images[0].shape[2] if images[0].ndim == 3 else None
    shape = (rows * h, cols * w) + ((channels,) if channels else ())
    grid = np.zeros(shape, dtype=images[0].dtype)
    for i, image in enumerate(images):
        if image.shape != images[0].shape:
            raise ValueError(f"grid images differ in shape: {image.shape} vs {images[0].shape}")
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return grid


# ------------------------------------------------------------------------------------------------ parameters
# Our scheduler names (and diffusers class names) -> the sampler names AUTOMATIC1111 writes.
_A1111_SAMPLERS = {
    "eulera": "Euler a", "eulerancestral": "Euler a", "euler": "Euler", "heun": "Heun", "lms": "LMS",
    "ddim": "DDIM", "pndm": "PLMS", "plms": "PLMS", "ddpm": "DDPM", "lcm": "LCM", "unipc": "UniPC",
    "unipcmultistep": "UniPC", "dpm2": "DPM2", "kdpm2": "DPM2", "dpm2a": "DPM2 a", "kdpm2ancestral": "DPM2 a",
    "dpmpp2m": "DPM++ 2M", "dpmsolvermultistep": "DPM++ 2M", "dpmpp2mkarras": "DPM++ 2M Karras",
    "dpmppsde": "DPM++ SDE", "dpmsolversde": "DPM++ SDE", "dpmpp2sa": "DPM++ 2S a",
    "dpmsolversinglestep": "DPM++ 2S", "dpmpp2msde": "DPM++ 2M SDE",
}


def sampler_display_name(scheduler: str) -> str:
    """``euler_a`` / ``EulerAncestralDiscreteScheduler`` -> ``Euler a``; unknown names are returned as given."""
    key = scheduler.lower().replace("+", "p")
    for noise in ("_", "-", " ", "scheduler", "discrete"):
        key = key.replace(noise, "")
    return _A1111_SAMPLERS.get(key, scheduler)


def _quote(value: object) -> str:
    """A1111's rule: a value holding a separator is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(ch in text for ch in ",:\n\"") else text


def format_parameters(prompt: str, negative_prompt: str | None, steps: int, scheduler: str, guidance: float,
                      seed: int, width: int, height: int, model: str,
                      extra: Mapping[str, object] | None = None) -> str:
    """The A1111 ``parameters`` text; the negative-prompt line is left out when there is none."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler_display_name(scheduler), "CFG scale": f"{float(guidance):g}",
              "Seed": seed, "Size": f"{width}x{height}", "Model": model, **(extra or {})}
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files
def _png_bytes(image: np.ndarray, parameters: str | None) -> bytes:
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an HWC uint8 image, got {image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)  # tEXt, or iTXt when the text is not Latin-1
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail early, before minutes of generation, if ``path`` could not be written as asked."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists already (pass --overwrite to replace it)")
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: cannot write there")


def save_png(path: str | os.PathLike, image: np.ndarray, parameters: str | None = None,
             overwrite: bool = False) -> Path:
    """Write ``image`` (HWC uint8) as a PNG at ``path``, atomically, with the ``parameters`` text chunk.

    The bytes go to a temporary file in the same folder, are fsynced, then moved into place, so a reader never
    sees half a file. Missing parent folders are created. An existing file is kept unless ``overwrite``.
    """
    path = Path(path)
    data = _png_bytes(image, parameters)
    directory = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists already (pass --overwrite to replace it)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{directory}: cannot create the output folder ({e.strerror})") from None
    tmp = directory / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputError(f"{directory}: cannot write there ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists, without a window in which another writer could slip in
    (a hard link fails on an existing name); where hard links are unsupported, check then rename."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise OutputError(f"{path}: exists already (pass --overwrite to replace it)") from None
    except OSError:
        pass
    if path.exists():
        raise OutputError(f"{path}: exists already (pass --overwrite to replace it)")
    os.replace(tmp, path)


def read_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text of a PNG (as written by sdgen or AUTOMATIC1111), or None if it has none."""
    try:
        with Image.open(path) as im:
            im.load()
            return getattr(im, "text", {}).get("parameters")
    except (OSError, SyntaxError) as e:
        raise UsageError(f"{path}: cannot read PNG parameters ({e})") from None
