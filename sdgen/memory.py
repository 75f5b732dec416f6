"""Memory: the precision weights are held at, models built when first needed and released when done, and an
estimate of a run's peak checked against the memory available before anything big is loaded.

Where the memory of a run goes (SD 1.5, 512x512, batch 1, fp32 weights; measured with ``sdgen bench``):
weights (UNet 3.3 GB, text encoder 0.5, VAE decoder 0.2; half that in fp16/bf16), the UNet's activations
(a few hundred MB at 512x512, growing with batch x pixels), the VAE decoder's (about 3 KB per output pixel, so
tiles beyond a size), and the Python/numpy/Numba runtime itself. A run of a single batch ("one-shot") builds each
model when it is first needed and releases it when done, so the text encoders, the UNet and the VAE are never in
memory together.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OutOfMemoryError, UsageError

WEIGHTS_DTYPES = ("auto", "fp32", "fp16", "bf16")
_NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

RUNTIME_BYTES = 330 << 20  # Python, numpy, Numba/LLVM and the compiled kernels (measured: an empty run's peak)
# the kernels' shared buffers: Winograd filters (up to 72 MB, F(6,3)'s), widened weights, per-worker blocks. 160 MB
# until F(6,3): with it SD 1.5's VAE decode peaked at 1576-1599 MB where it had at 1552 (estimate then 1581)
SCRATCH_BYTES = 208 << 20


def weights_dtype(name: str | None):
    """The numpy storage dtype for a --weights-dtype value (None for "auto": each tensor as its file stores it)."""
    if name is None or name == "auto":
        return None
    try:
        return _NUMPY[name]
    except KeyError:
        raise UsageError(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)} (got {name!r})") from None


def attention_slicing(value: str | None) -> str | int | None:
    """A --attention-slicing value: "auto", "max", a positive number of heads, or None/"off"."""
    if value is None or value in ("off", "none"):
        return None
    if value in ("auto", "max"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--attention-slicing must be auto, max or a positive number (got {value!r})")
    return n


# ------------------------------------------------------------------------------------------- models built late


class LazyModel:
    """A model built when first used (called, or any attribute but ``cfg`` read) and released on request: one-shot
    runs keep only the model of the current stage in memory. ``release()`` drops it; using it again builds it again
    (from the same tensors, so the same model)."""

    def __init__(self, build, cfg, name: str = "model"):
        self._build = build
        self._model = None
        self.cfg = cfg
        self.name = name

    @property
    def built(self) -> bool:
        return self._model is not None

    def model(self):
        if self._model is None:
            self._model = self._build()
            trim()  # the temporaries of building (converted tensors, random weights) go back too
        return self._model

    def release(self) -> None:
        if self._model is not None:
            self._model = None
            trim()

    def __call__(self, *args, **kwargs):
        return self.model()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_build", "_model"):
            raise AttributeError(name)
        return getattr(self.model(), name)

    def __repr__(self) -> str:
        return f"LazyModel({self.name}, {'built' if self.built else 'not built'})"


def release(model) -> None:
    """Release a LazyModel (nothing for a model that is always kept)."""
    if isinstance(model, LazyModel):
        model.release()


_libc = None


def trim() -> None:
    """Give freed memory back to the system now: the C allocator keeps freed blocks below its (growing) mmap
    threshold in its heap, where a released model's weights would still count as this process's memory until
    reused. glibc's malloc_trim returns them (every free page, not only the heap's top); elsewhere nothing."""
    global _libc
    import gc

    gc.collect()
    if _libc is None:
        try:
            import ctypes
            import ctypes.util

            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_HEAP_ONLY = {"set": False}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system at once (the sdgen
    command does this at start, through fresh_memory_settings; a program importing sdgen decides for itself). By
    default every block above 32 MB -- each feature map of a VAE decode at 512x512, each large buffer of a UNet step
    -- is a fresh mmap, and the kernel zeroes its pages again at first touch: ~1.2 s of system time per SD1.5 VAE
    decode on 2 cores, ~7% of its wall time (scripts/bench_vs_diffusers.py; sys time from getrusage). With mmap off
    and automatic trimming off, freed blocks are reused from the heap; peak memory is the same (measured with sdgen
    bench: 3980 vs 4021 MB for SD1.5), and trim() still gives the free pages back where sdgen releases a model.
    Trimming is off entirely (a threshold of -1), not merely high: the largest threshold mallopt takes, 2 GB, still
    gave back the 3.5 GB heap top each SDXL VAE decode at 1024x1024 ends with, so that every decode after the first
    faulted it in again (Zen 4, 2 threads: 22.5 s a decode, 5.5 s of it system time, against 19.0 s and none).
    True if set (glibc only)."""
    if _HEAP_ONLY["set"]:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, -1) == 1
    _HEAP_ONLY["set"] = ok
    return ok


def small_pages() -> bool:
    """Stop numpy from asking the kernel for transparent huge pages (madvise MADV_HUGEPAGE, which it does for every
    array of 4 MB and up where the system leaves huge pages to madvise, the usual setting). A huge page is found at
    first touch, and on a machine whose free memory is fragmented or taken by the page cache (the model's own
    files, mapped), that means compacting or reclaiming memory then and there: on the Zen 4 VM (2 threads) the
    first SDXL VAE decode at 1024x1024 took 23.2 s, 7.7 s of it system time, against 20.7 s and 1.5 with 4 KB
    pages; SD 1.5's first decode at 512x512 5.7-5.8 s against 4.8, its first UNet forward 6.5-8.2 s against 6.3;
    later calls, which reuse the heap's memory, the same either way. Where memory was just given back (the decode
    of `sdgen bench`, after the UNet is released) huge pages come cheap and 4 KB pages cost a little more (SDXL
    1024x1024: 22.6 s against 21.7-22.0), but the compactions are the larger and less predictable cost (SD 1.5
    bench runs of 2 steps: 23.6-23.8 s against 24.1 and 27.3, a first step of 9.3 s in the latter). PyTorch does
    not ask for huge pages either.
    True if numpy has the switch (it is numpy's private _set_madvise_hugepage; numpy 1.20 and up)."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True


def fresh_memory_settings() -> None:
    """How the sdgen command (and its workers, and the benchmarks that time it) take memory: freed blocks kept for
    reuse (keep_freed_memory), new ones in small pages (small_pages)."""
    keep_freed_memory()
    small_pages()


# ------------------------------------------------------------------------------------------- what there is


def available_bytes() -> int:
    """Memory this process can still take without swapping: MemAvailable, or less under a cgroup (v2) limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - current
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    if avail is None:  # not Linux: assume the total physical memory is free
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    return avail


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------- parameter counts


def count_params(component: str, config: dict) -> int:
    """Parameters of a component's architecture (unet, vae decoder, text_encoder[_2]) from its config, by building
    it with shape-only placeholder weights (no memory)."""
    return sum(_shapes(component, config).values())


def kept_filter_bytes(component: str, config: dict) -> int:
    """What --conv-filters keep adds to a component's weights: the float32 F(4,3) filters of each 3x3 convolution
    stored in blocks of output channels (sdgen.kernels.conv.blocked_weights: 640 channels and up), which a plan
    keeps for maps up to 32x32 (KEEP_MAX_PIXELS). Counted for every such layer: an upper bound where a large image
    gives some of them larger maps (whose filters are made at each call)."""
    from .kernels.conv import blocked_weights
    from .kernels.winograd import padded_channels

    extra = 0
    for shape in _shapes(component, config, whole=True).values():
        if len(shape) == 4 and shape[2:] == (3, 3) and blocked_weights(shape[1], shape[0]):
            extra += 36 * padded_channels(shape[1]) * padded_channels(shape[0]) * 4
    return extra


def _shapes(component: str, config: dict, whole: bool = False) -> dict:
    """name -> parameter count (whole: shape) of a component's weights, from its config."""
    from .models.layers import RandomParams

    shapes: dict = {}

    class Shapes(RandomParams):
        def sub(self, name):
            return Shapes(self.seed, f"{self.prefix}{name}.", self.source, self.dtype)

        def shaped(self, name, shape):
            shapes[self.prefix + name] = tuple(shape) if whole else math.prod(shape)
            return np.zeros((1,) * len(shape), dtype=np.float32)

        def matrix(self, name, rows, cols):
            return self.shaped(name, (rows, cols))

        def stored(self, name, t):
            return t

        def f32(self, name, t):
            return t

    p = Shapes(0)
    if component == "unet":
        from .models.unet import UNet, UNetConfig
        UNet(UNetConfig.from_dict(config), p)
    elif component == "vae":
        from .models.vae import Decoder, VAEConfig
        cfg = VAEConfig.from_dict(config)
        Decoder(p.sub("decoder"), cfg)
        c = cfg.latent_channels
        shapes["post_quant_conv"] = (c, c + 1) if whole else c * (c + 1)
    else:
        from .models.clip import CLIPTextConfig, CLIPTextModel
        CLIPTextModel(CLIPTextConfig.from_dict(config), p)
    return shapes


# ------------------------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """A run's peak memory, by stage (bytes), and what it is made of."""

    peak: int
    stages: dict = field(default_factory=dict)      # stage -> bytes in memory during it
    weights: dict = field(default_factory=dict)     # component -> bytes of weights
    vae_tiled: bool = False

    def describe(self) -> str:
        gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
        stages = ", ".join(f"{k} {gb(v)}" for k, v in self.stages.items())
        return f"about {gb(self.peak)} at peak ({stages})"


def _bytes_per(dtype_name: str, component: str, stored: dict | None) -> float:
    """Bytes per parameter held for a component: the --weights-dtype, or for "auto" its checkpoint's."""
    if dtype_name != "auto":
        return _BYTES[dtype_name]
    if stored and component in stored:
        return stored[component]
    return 4


def unet_activation_bytes(config: dict, latent_h: int, latent_w: int, rows: int) -> int:
    """UNet activations at peak for `rows` latents (the batch, doubled with guidance) of latent_h x latent_w: the
    skip connections, the widest transformer level's feed-forward (GEGLU: 8 + 4 channels per token per level
    width) and the tensors around it. A model fitted to measurements of SD 1.5 and SDXL."""
    ch = list(config.get("block_out_channels", [320, 640, 1280, 1280]))
    kinds = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    tokens = latent_h * latent_w
    skips, worst = 0.0, 0.0
    for level, c in enumerate(ch):
        t = tokens / 4 ** level
        skips += 3 * t * c
        width = 12 + 4 if "CrossAttn" in kinds[level] else 6
        worst = max(worst, t * c * width)
    return int(4 * rows * (skips + worst))


def context_kv_bytes(config: dict, rows: int, context_tokens: int = 77) -> int:
    """The cross-attention keys and values the UNet keeps for the run's text context (Attention.context_kv): two
    rows of each attn2's width per context token and latent row (SDXL, guided: ~100 MB; SD 1.5: ~15 MB)."""
    widths = [shape[0] for name, shape in _shapes("unet", config, whole=True).items()
              if name.endswith("attn2.to_k.weight")]
    return 4 * 2 * rows * context_tokens * sum(widths)


def vae_decode_bytes(config: dict, height: int, width: int) -> int:
    """VAE decoder activations at peak for one height x width image: the last two up blocks, where the
    channels are widest at full resolution (about 3 KB per pixel for SD's VAE). Since the ResNet blocks' GroupNorms
    are applied inside their convolutions (no normalized map), SD's VAE decode peaks at 1294-1336 MB for the whole
    process at 512x512 and 3545-3562 MB at 1024x1024 (was 1476 and 3944), which this puts at 1501 and 3823."""
    ch = list(config.get("block_out_channels", [128, 256, 512, 512]))
    c_last = ch[0]
    c_prev = ch[1] if len(ch) > 1 else ch[0]
    return int(4 * height * width * (1.5 * c_prev + 3 * c_last))


def tile_size(config: dict) -> int:
    """diffusers' tile_sample_min_size: the VAE config's sample_size (512 for SD 1.x, 1024 for SDXL)."""
    size = config.get("sample_size") or 512
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def auto_vae_tiling(config: dict, height: int, width: int) -> bool:
    """--vae-tiling auto: tile when the image has more than 4 tiles' worth of pixels (beyond 1024x1024 for SD 1.x,
    2048x2048 for SDXL): above that an untiled decode takes over ~3 GB (SD 1.x) and grows with the pixels."""
    t = tile_size(config)
    return height * width > 4 * t * t


def estimate(components: dict, family: str, width: int, height: int, batch: int, guided: bool = True,
             weights_dtype_name: str = "auto", stored_bytes: dict | None = None, one_shot: bool = True,
             vae_tiling: bool | None = None, vae_slicing: bool = True, conv_filters: str = "make") -> Estimate:
    """Peak memory of a run: components maps a component name to its config (text_encoder[_2], unet, vae);
    stored_bytes: bytes per parameter of each component's checkpoint (for "auto"). One-shot runs hold one model
    at a time; others all of them. conv_filters: "keep" counts the kept Winograd filters (kept_filter_bytes)."""
    weights = {}
    for name, cfg in components.items():
        per = _bytes_per(weights_dtype_name, name, stored_bytes)
        weights[name] = int(count_params(name, cfg) * per)
        if conv_filters == "keep" and name in ("unet", "vae"):
            weights[name] += kept_filter_bytes(name, cfg)
    te = sum(v for k, v in weights.items() if k.startswith("text_encoder"))
    vae_cfg = components["vae"]
    scale = 2 ** (len(vae_cfg.get("block_out_channels", [128, 256, 512, 512])) - 1)
    rows = batch * (2 if guided else 1)
    unet_act = (unet_activation_bytes(components["unet"], height // scale, width // scale, rows)
                + context_kv_bytes(components["unet"], rows))
    tiled = auto_vae_tiling(vae_cfg, height, width) if vae_tiling is None else vae_tiling
    if tiled:
        t = tile_size(vae_cfg)
        # one tile decoded at a time, plus every decoded tile kept for the blending (float32 RGB) and the image
        vae_act = vae_decode_bytes(vae_cfg, t, t) + 2 * 4 * 3 * height * width * (1.8 if batch == 1 else batch)
    else:
        vae_act = vae_decode_bytes(vae_cfg, height, width) * (1 if vae_slicing else batch)
    base = RUNTIME_BYTES + SCRATCH_BYTES
    images = 4 * 3 * height * width * batch * 2  # decoded float32 images and their uint8 copies
    if one_shot:
        stages = {"text encoding": base + te,
                  "denoising": base + weights["unet"] + unet_act,
                  "decoding": base + weights["vae"] + vae_act + images}
    else:
        held = base + sum(weights.values())
        stages = {"denoising": held + unet_act, "decoding": held + vae_act + images}
    return Estimate(max(stages.values()), stages, weights, tiled)


def check(est: Estimate, available: int | None = None, weights_dtype_name: str = "auto", batch: int = 1) -> None:
    """OutOfMemoryError naming the estimate and the options that would help when it exceeds the memory
    available (MemAvailable by default)."""
    available = available_bytes() if available is None else available
    if est.peak <= available:
        return
    hints = []
    half = sum(est.weights.values()) // 2
    if weights_dtype_name in ("auto", "fp32") and half > 0:
        hints.append(f"--weights-dtype fp16 (saves about {half / 2**30:.1f} GB)")
    if not est.vae_tiled and "decoding" in est.stages and est.stages["decoding"] == est.peak:
        hints.append("--vae-tiling on")
    if batch > 1:
        hints.append("a smaller --batch-size")
    hints.append("a smaller --width/--height")
    raise OutOfMemoryError(
        f"this run needs {est.describe()}, but only {available / 2**30:.1f} GB is available; try "
        + ", ".join(hints) + " (or --no-memory-check to run anyway)")
