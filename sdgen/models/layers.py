"""The building blocks the architectures are made of: weights looked up by name, prepared once, run by kernels.

Feature maps are NHWC float32 throughout the models (the layout the convolution kernels are fastest in); token
sequences are (batch, tokens, channels). Conversions to and from PyTorch's NCHW happen only at a model's edges.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..errors import BadModelFileError


class Params:
    """The tensors of one model, seen from a name prefix: ``p.sub("down_blocks.0")["conv1.weight"]``."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str = "", source: str = "model"):
        self.tensors = tensors
        self.prefix = prefix
        self.source = source

    def sub(self, name: str | int) -> "Params":
        return Params(self.tensors, f"{self.prefix}{name}.", self.source)

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
    (benchmarks on machines without weights). Deterministic per name; scaled by 1/sqrt(fan-in) so activations stay
    in a sane range; norm weights near 1."""

    def __init__(self, seed: int = 0, prefix: str = "", source: str = "random weights"):
        super().__init__({}, prefix, source)
        self.seed = seed

    def sub(self, name: str | int) -> "RandomParams":
        return RandomParams(self.seed, f"{self.prefix}{name}.", self.source)

    def __contains__(self, name: str) -> bool:
        return True

    def has_prefix(self, name: str) -> bool:
        return True

    def shaped(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A fresh random tensor (not kept here: the layer that asked owns the only copy)."""
        import zlib

        key = self.prefix + name
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        if len(shape) == 1 and ("norm" in key and name == "weight"):
            t = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) == 1:
            t = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            t = rng.standard_normal(shape, dtype=np.float32)
            t *= np.float32(1.0 / np.sqrt(fan_in))
        return t.astype(np.float32, copy=False)

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        return self.shaped(name, (rows, cols))

    def __getitem__(self, name: str) -> np.ndarray:
        raise BadModelFileError(f"random weights: {self.prefix + name!r} was asked for without a shape")


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


class Linear:
    def __init__(self, p: Params, in_features: int, out_features: int, bias: bool = True):
        self.weight = _f32(p.matrix("weight", out_features, in_features))
        self.bias = _f32(p.shaped("bias", (out_features,))) if bias else None

    @classmethod
    def fused(cls, layers: list["Linear"]) -> "Linear":
        """One Linear computing several that share an input (e.g. q, k and v): one GEMM instead of three."""
        fused = cls.__new__(cls)
        fused.weight = np.ascontiguousarray(np.concatenate([l.weight for l in layers], axis=0))
        biases = [l.bias for l in layers]
        if all(b is None for b in biases):
            fused.bias = None
        else:
            fused.bias = np.concatenate([np.zeros(l.weight.shape[0], np.float32) if b is None else b
                                         for l, b in zip(layers, biases)])
        return fused

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return kernels.linear(x, self.weight, self.bias)


class Conv2d:
    """A convolution whose weights are prepared for the kernels once, at load. Input and output are NHWC."""

    def __init__(self, p: Params, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None):
        if padding is None:
            padding = kernel_size // 2
        weight = p.shaped("weight", (out_channels, in_channels, kernel_size, kernel_size))
        bias = p.shaped("bias", (out_channels,)) if "bias" in p else None
        self.plan = kernels.Conv2dPlan(weight, bias, stride=stride, padding=padding)
        self.out_channels = out_channels

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return kernels.conv2d(x, self.plan, residual=residual)


class GroupNorm:
    def __init__(self, p: Params, num_groups: int, channels: int, eps: float):
        self.num_groups = num_groups
        self.eps = eps
        self.gamma = _f32(p.shaped("weight", (channels,)))
        self.beta = _f32(p.shaped("bias", (channels,)))

    def __call__(self, x: np.ndarray, silu: bool = False) -> np.ndarray:
        return kernels.group_norm(x, self.num_groups, self.gamma, self.beta, self.eps, silu=silu)


class LayerNorm:
    def __init__(self, p: Params, channels: int, eps: float = 1e-5):
        self.eps = eps
        self.gamma = _f32(p.shaped("weight", (channels,)))
        self.beta = _f32(p.shaped("bias", (channels,)))

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
        return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    oh, ow = size
    rows = np.floor(np.arange(oh) * (h / oh)).astype(np.int64).clip(0, h - 1)
    cols = np.floor(np.arange(ow) * (w / ow)).astype(np.int64).clip(0, w - 1)
    return np.ascontiguousarray(x[:, rows][:, :, cols])


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
