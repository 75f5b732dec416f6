"""The building blocks the architectures are made of: weights looked up by name, prepared once, run by kernels.

Feature maps are NHWC float32 throughout the models (the layout the convolution kernels are fastest in); token
sequences are (batch, tokens, channels). Conversions to and from PyTorch's NCHW happen only at a model's edges.

Weights are held at the storage precision of their Params (``dtype``: float32, float16, or bfloat16 bits as uint16;
None keeps each tensor's own, e.g. as a checkpoint stores it), converted once at load, and widened to float32 by
the kernels when a layer runs (sdgen.kernels.weights); norms and biases stay float32. Each weight is held once:
convolutions keep no transformed copy beside it.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import numpy as np

from .. import kernels
from ..errors import BadModelFileError
from ..kernels import counter_random, linear_tiles
from ..kernels import weights as _weights

# attention_slicing: how many (image x head) score matrices attention may hold at once, as diffusers'
# set_attention_slice counts them (None: sdgen's own bound, kernels.mha's score blocks). Same numbers either way.
_ATTENTION = {"slices": None}


def set_attention_slicing(value: "str | int | None") -> None:
    """diffusers' attention_slicing for every model of this process: None/"off", "auto" (half the heads of a
    layer at a time, as diffusers' "auto"), "max" (one head at a time) or a number of heads."""
    if value in (None, "off", "none"):
        _ATTENTION["slices"] = None
    elif value in ("auto", "max"):
        _ATTENTION["slices"] = value
    else:
        n = int(value)
        if n < 1:
            raise ValueError(f"attention slicing must be auto, max or a positive number (got {value!r})")
        _ATTENTION["slices"] = n


def attention_slices(heads: int) -> int | None:
    """The (image x head) slices an attention layer with this many heads may hold at once (None: no limit)."""
    s = _ATTENTION["slices"]
    if s is None:
        return None
    if s == "auto":
        return max(1, heads // 2)
    if s == "max":
        return 1
    return s


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, mask: np.ndarray | None = None) -> np.ndarray:
    """kernels.attention with this process's attention slicing."""
    slices = attention_slices(heads)
    if slices is None:
        return kernels.attention(q, k, v, heads, mask=mask)
    return kernels.attention(q, k, v, heads, mask=mask, max_slices=slices)


# conv_filters: what the 3x3 convolutions keep. "make" (the default): only their weights, the Winograd filters made
# at each call into shared scratch buffers (one copy of each weight: the memory figures of sdgen.memory). "keep":
# also the F(4,3) filters of the 640-2560 channel layers on maps up to 32x32, made once at the first call (float32,
# 36/9 the size of float32 weights), where making them at each call weighs most: more memory, less work per call
# (kernels.conv.KEEP_MAX_PIXELS; scripts/bench_vs_diffusers.py --conv-filters measures both).
CONV_FILTERS = ("make", "keep")
_CONV = {"filters": "make"}


def set_conv_filters(value: str | None) -> None:
    """conv_filters for the convolutions of models built from now on in this process (None: "make")."""
    value = value or "make"
    if value not in CONV_FILTERS:
        raise ValueError(f"conv filters must be make or keep (got {value!r})")
    _CONV["filters"] = value


def conv_filters() -> str:
    return _CONV["filters"]


# linear_panels: how the linear layers multiply. "auto" (the default): by the register tiles of kernels.linear_tiles
# from W as it lies, each 64 KB chunk of it packed in a panel (and widened, for half-precision weights) right before
# the tiles use it and then dropped -- no memory kept, no first call that costs more, for the text encoders and the
# VAE as for the UNet -- on calls of at least UNPACKED_MIN_ROWS rows whose outputs fill 32-wide panels; OpenBLAS
# for the rest (the time embeddings' one or two rows), which packs too, but more slowly (one thread, Zen 4,
# GFLOP/s, OpenBLAS / tiles: 77 x 768 x 320 77 / 98, 256 x 1280 x 10240 94 / 105, 1024 x 640 x 5120 98 / 108,
# 4096 x 1280 x 320 99 / 102; half weights widened chunk by chunk instead of whole at every call). Forwards
# alternating in one process: SDXL-Turbo's fp32 UNet 0.934 of its time with OpenBLAS, SD 1.5's 0.99; against
# weights packed once for the run ("on"): SD 1.5 the same (on / auto 0.998), SDXL-Turbo at 512x512 0.946-0.966
# (before auto prefetched the next weights to pack: its forward then 0.966-0.974 of that time), without the first
# step's packing (SD 1.5 +2.5 s, SDXL-Turbo +9-10 s: a pass over the weights into new memory).
# "on": every layer's weights re-laid in panels during its first call, which then replace W. "off": OpenBLAS
# everywhere (half weights widened into a scratch buffer at every call).
LINEAR_PANELS = ("auto", "on", "off")
UNPACKED_MIN_ROWS = 16
_LINEAR = {"mode": "auto", "packed": 0}  # packed: the layers packed in this process so far ("on")


def set_linear_panels(value: "str | bool | None") -> None:
    """linear_panels for the linear layers of this process from now on: "auto" (or None), "on" (or True), "off"
    (or False)."""
    mode = {None: "auto", True: "on", False: "off"}[value] if value in (None, True, False) else value
    if mode not in LINEAR_PANELS:
        raise ValueError(f"linear panels must be auto, on or off (got {value!r})")
    _LINEAR["mode"] = mode


def linear_panels() -> str:
    return _LINEAR["mode"]


def linear_layers_packed() -> int:
    """How many linear layers this process has packed in panels so far (--linear-panels on)."""
    return _LINEAR["packed"]


_STORAGE = {"dtype": None}  # the storage dtype of Params made without one (weights_dtype)


@contextlib.contextmanager
def weights_dtype(dtype):
    """Within the block, models built from tensors (Params without a dtype of their own) hold their weights at
    ``dtype`` (float32, float16, or uint16 for bfloat16; None: each tensor's own)."""
    before = _STORAGE["dtype"]
    _STORAGE["dtype"] = None if dtype is None else np.dtype(dtype)
    try:
        yield
    finally:
        _STORAGE["dtype"] = before


@contextlib.contextmanager
def relaid_weights():
    """Within the block, the convolutions built take their re-laid weights from the cache on disk
    (sdgen.relaid_cache), which makes and keeps those it lacks; its files are written when the block ends without
    an error."""
    from ..relaid_cache import RelaidCache

    store = RelaidCache()
    before = _CONV.get("relaid")
    _CONV["relaid"] = store
    try:
        yield
    finally:
        _CONV["relaid"] = before
    store.close()


class Params:
    """The tensors of one model, seen from a name prefix: ``p.sub("down_blocks.0")["conv1.weight"]``.

    dtype: the storage dtype of weight matrices (float32, float16, or uint16 for bfloat16 bits; None: each
    tensor's own). ``stored`` converts a weight to it once; tensors a layer copied (converted, fused, re-laid out)
    are released from a memory-mapped checkpoint (``tensors.release(name)`` where the dict has it), so a file's
    pages stay in memory only where a layer uses them in place.
    """

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str = "", source: str = "model", dtype=None):
        self.tensors = tensors
        self.prefix = prefix
        self.source = source
        self.dtype = _STORAGE["dtype"] if dtype is None else np.dtype(dtype)

    def sub(self, name: str | int) -> "Params":
        return Params(self.tensors, f"{self.prefix}{name}.", self.source, self.dtype)

    def stored(self, name: str, t: np.ndarray) -> np.ndarray:
        """Weight ``name`` (already fetched as t) at this model's storage dtype, converted once."""
        dtype = self.dtype
        if dtype is None:
            dtype = t.dtype if t.dtype in (np.float16, np.uint16) else np.float32
        out = _weights.to_storage(t, dtype)
        if out is not t and not np.shares_memory(out, t):
            self.release(name)
        return out

    def f32(self, name: str, t: np.ndarray | None) -> np.ndarray | None:
        """A small float32 tensor (norm, bias) from ``name`` (already fetched as t), widened if stored in half."""
        if t is None:
            return None
        out = _weights.to_storage(t, np.float32)
        if out is not t and not np.shares_memory(out, t):
            self.release(name)
        return out

    def release(self, name: str) -> None:
        """Tell a memory-mapped source that tensor ``name`` is no longer read (a copy of it is kept instead)."""
        release = self.releaser(name)
        if release is not None:
            release()

    def releaser(self, name: str):
        """A function doing ``release(name)`` later, holding no reference to these tensors (None: nothing to do)."""
        releaser = getattr(self.tensors, "releaser", None)
        return None if releaser is None else releaser(self.prefix + name)

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def has_prefix(self, name: str) -> bool:
        start = f"{self.prefix}{name}."
        return any(key.startswith(start) for key in self.tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        key = self.prefix + name
        try:
            return self.tensors[key]
        except KeyError:
            raise BadModelFileError(f"{self.source}: tensor {key!r} is missing") from None

    def get(self, name: str) -> np.ndarray | None:
        return self.tensors.get(self.prefix + name)

    def shaped(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor, checked against the shape the model's config implies."""
        t = self[name]
        if tuple(t.shape) != tuple(shape):
            raise BadModelFileError(
                f"{self.source}: tensor {self.prefix + name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        return t

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A (rows, cols) weight stored either as a matrix or as a 1x1 convolution kernel (rows, cols, 1, 1)."""
        t = self[name]
        if t.ndim == 4 and t.shape[2:] == (1, 1):
            t = t.reshape(t.shape[0], t.shape[1])
        return self.shaped_like(name, t, (rows, cols))

    def shaped_like(self, name: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if tuple(t.shape) != tuple(shape):
            raise BadModelFileError(
                f"{self.source}: tensor {self.prefix + name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        return t


class RandomParams(Params):
    """Random weights of exactly the shapes the architecture asks for: the real compute cost without a checkpoint
    (benchmarks on machines without weights). Deterministic per seed and name; uniform with the variance of
    N(0, 1/fan-in) (activations stay in a sane range), biases that of N(0, 0.01), norm weights near 1. Made by
    kernels.counter_random, 0.5 ns an element on 2 threads where numpy's normals took 13-17: `sdgen bench --model
    sdxl-turbo --random-weights` loads in 12.3 s instead of 47.3 (what is left is mostly the first touch of its 14
    GB), SD-Turbo in 2.7-3.8 s instead of 15.4."""

    def __init__(self, seed: int = 0, prefix: str = "", source: str = "random weights", dtype=None):
        super().__init__({}, prefix, source, dtype)
        self.seed = seed

    def sub(self, name: str | int) -> "RandomParams":
        return RandomParams(self.seed, f"{self.prefix}{name}.", self.source, self.dtype)

    def __contains__(self, name: str) -> bool:
        return True

    def has_prefix(self, name: str) -> bool:
        return True

    def shaped(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A fresh random tensor (not kept here: the layer that asked owns the only copy)."""
        key = self.prefix + name
        centre, sd = 0.0, 0.1  # (a bias)
        if len(shape) == 1 and ("norm" in key and name == "weight"):
            centre = 1.0
        elif len(shape) > 1:
            sd = 1.0 / math.sqrt(math.prod(shape[1:]))
        half = sd * math.sqrt(3.0)  # uniform on [c - h, c + h) has variance h^2 / 3
        return counter_random.uniform(shape, (self.seed << 32) ^ zlib.crc32(key.encode()), centre - half, centre + half)

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        return self.shaped(name, (rows, cols))

    def __getitem__(self, name: str) -> np.ndarray:
        raise BadModelFileError(f"random weights: {self.prefix + name!r} was asked for without a shape")


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


class Linear:
    """x @ W^T + b; W (out, in) held at the storage dtype (half precision widened as the kernels read it).

    Under linear_panels auto, calls of enough rows multiply by kernels.linear_tiles' register tiles from W as it
    lies (each chunk packed for its use); under on, weights whose outputs fill 32-wide panels are re-laid in them at
    their own precision during the layer's first call, and the panels then replace W (no second copy); under off
    (and for the rest), OpenBLAS. A fused layer (q, k and v sharing an input) holds W as the blocks of its layers,
    where they lie: the tiles read them in place; they are joined into one array only for OpenBLAS."""

    def __init__(self, p: Params, in_features: int, out_features: int, bias: bool = True):
        self.blocks = [p.stored("weight", p.matrix("weight", out_features, in_features))]  # W's rows, in blocks
        self.bias = p.f32("bias", p.shaped("bias", (out_features,))) if bias else None
        self.panels = None
        # how to release the sources of W once its values are copied (into panels, or joined), and of the bias
        # once a fused layer has joined the biases
        self._release = [r for r in (p.releaser("weight"),) if r is not None]
        self._release_bias = p.releaser("bias")

    @property
    def out_features(self) -> int:
        if self.panels is not None:
            return self.panels.shape[0] * self.panels.shape[2]
        return sum(w.shape[0] for w in self.blocks)

    @property
    def weight(self) -> np.ndarray | None:
        """W as one array (a fused layer's blocks joined into new memory, once, at the first request), or None
        once in panels."""
        if self.panels is not None:
            return None
        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks, axis=0)]
            self._drop_sources()
        return self.blocks[0]

    def _drop_sources(self) -> None:
        for release in self._release:  # a memory-mapped source may drop the pages it no longer needs
            release()
        self._release = []

    @classmethod
    def fused(cls, layers: list["Linear"]) -> "Linear":
        """One Linear computing several that share an input (e.g. q, k and v): one product instead of three, from
        their weights where they lie (no copy)."""
        if any(layer.panels is not None for layer in layers):
            raise ValueError("Linear.fused: a layer already in panels")
        fused = cls.__new__(cls)
        fused.blocks = [w for layer in layers for w in layer.blocks]
        fused._release = [r for layer in layers for r in layer._release]
        fused._release_bias = None
        biases = [l.bias for l in layers]
        if all(b is None for b in biases):
            fused.bias = None
        else:
            fused.bias = np.concatenate([np.zeros(l.out_features, np.float32) if b is None else b
                                         for l, b in zip(layers, biases)])
            for layer in layers:  # the biases are copied
                if layer._release_bias is not None:
                    layer._release_bias()
        fused.panels = None
        return fused

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """x W^T + b, + residual (after the bias, as a residual connection rounds) in the same pass if given;
        into out if given (kernels.linear)."""
        if self.panels is not None:
            return linear_tiles.linear(x, self.panels, self.bias, residual, out)
        tiles = all(linear_tiles.packable(w) for w in self.blocks) and len({w.dtype for w in self.blocks}) == 1
        if not tiles and len(self.blocks) > 1:  # blocks that do not fill panels (or mixed dtypes): joined, once
            tiles = linear_tiles.packable(self.weight)
        if _LINEAR["mode"] == "on" and tiles:
            panels = linear_tiles.empty_panels(self.out_features, self.blocks[0].shape[1], dtype=self.blocks[0].dtype)
            y = linear_tiles.linear(x, panels, self.bias, residual, out, weight=self.blocks)
            self.panels, self.blocks = panels, []  # the panels are W now
            _LINEAR["packed"] += 1
            self._drop_sources()
            return y
        if _LINEAR["mode"] != "off" and x.size >= UNPACKED_MIN_ROWS * x.shape[-1] and tiles:
            # the tiles from W as it lies, each chunk packed for its use
            return linear_tiles.linear(x, None, self.bias, residual, out, weight=self.blocks)
        return kernels.linear(x, _weights.as_float32(self.weight, "linear"), self.bias, residual, out)


class Conv2d:
    """A convolution whose weights are prepared for the kernels once, at load. Input and output are NHWC."""

    def __init__(self, p: Params, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None):
        if padding is None:
            padding = kernel_size // 2
        weight = p.stored("weight", p.shaped("weight", (out_channels, in_channels, kernel_size, kernel_size)))
        bias = p.f32("bias", p.shaped("bias", (out_channels,))) if "bias" in p else None
        # the plan keeps the weights re-laid out (HWIO, or in blocks of outputs) and, with "keep", the Winograd
        # filters of its blocked weights on small maps, from the first call (kernels.conv.KEEP_MAX_PIXELS). The
        # OIHW tensor is released.
        store = _CONV.get("relaid")  # re-laid weights from the cache on disk where it has them (relaid_weights)
        relaid = None if store is None else (lambda layout, make: store.get(weight, layout, make))
        self.plan = kernels.Conv2dPlan(weight, bias, stride=stride, padding=padding, cache=False, relaid=relaid,
                                       keep_filters=_CONV["filters"] == "keep")
        p.release("weight")
        self.out_channels = out_channels

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None, pre=None) -> np.ndarray:
        """The convolution of x (+ residual); pre: of GroupNorm.stats(x) applied to x instead (kernels.conv2d)."""
        return kernels.conv2d(x, self.plan, residual=residual, pre=pre)

    def upsampled(self, x: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """This convolution of x upsampled (nearest) by 2, or to size: an upsampler. By 2, without making the
        upsampled map where that pays (kernels.upsample_conv2d)."""
        n, h, w, c = x.shape
        if size is None or tuple(size) == (2 * h, 2 * w):
            return kernels.upsample_conv2d(x, self.plan)
        return self(upsample_nearest(x, size))


class GroupNorm:
    def __init__(self, p: Params, num_groups: int, channels: int, eps: float):
        self.num_groups = num_groups
        self.eps = eps
        self.gamma = p.f32("weight", p.shaped("weight", (channels,)))
        self.beta = p.f32("bias", p.shaped("bias", (channels,)))

    def __call__(self, x: np.ndarray, silu: bool = False) -> np.ndarray:
        return kernels.group_norm(x, self.num_groups, self.gamma, self.beta, self.eps, silu=silu)

    def stats(self, x: np.ndarray, silu: bool = False):
        """This GroupNorm (then SiLU) of x as a kernels.Normalization, for a convolution to apply as it reads x."""
        return kernels.group_norm_stats(x, self.num_groups, self.gamma, self.beta, self.eps, silu=silu)


class LayerNorm:
    def __init__(self, p: Params, channels: int, eps: float = 1e-5):
        self.eps = eps
        self.gamma = p.f32("weight", p.shaped("weight", (channels,)))
        self.beta = p.f32("bias", p.shaped("bias", (channels,)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return kernels.layer_norm(x, self.gamma, self.beta, self.eps)


def timestep_embedding(timesteps: np.ndarray, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> np.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' get_timestep_embedding (float32)."""
    half = dim // 2
    exponent = (-math.log(max_period) * np.arange(half, dtype=np.float32)).astype(np.float32)
    exponent = exponent / np.float32(half - shift)
    freqs = np.exp(exponent).astype(np.float32)
    args = np.asarray(timesteps, dtype=np.float32)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def upsample_nearest(x: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Nearest-neighbour upsampling of NHWC x, by 2 or to a given (H, W) as torch's interpolate(mode="nearest")."""
    n, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return kernels.upsample2x(x)
    oh, ow = size
    rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int64).clip(0, h - 1)
    cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int64).clip(0, w - 1)
    return np.ascontiguousarray(x[:, rows][:, :, cols])


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
