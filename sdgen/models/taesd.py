"""TAESD, the tiny autoencoder (madebyollin's TAESD / TAESDXL; diffusers' AutoencoderTiny): decodes latents to
pixels in a fraction of the KL VAE's time, for previews and fast turbo runs. Same latent space as the model's VAE
(scaled latents in, as the UNet sees them), slightly softer images.

    decode: latents ─ tanh(x / 3) * 3 ─ conv, ReLU ─ per level: blocks, [nearest x2, conv] ─ conv ─ x * 2 - 1
    encode: pixels ─ (x + 1) / 2 ─ conv, blocks ─ per level: stride-2 conv, blocks ─ conv ─ latents
    block:  ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x))      (skip: a 1x1 conv when the widths differ)

The layer sequence is read from the tensor names (``decoder.layers.N.*`` / ``encoder.layers.N.*`` as diffusers
saves them; a block has ``conv.0/2/4``, a plain convolution ``weight``; an index without tensors is an activation
or an upsampling), so any AutoencoderTiny configuration loads. Files: a diffusers folder (config.json +
diffusion_pytorch_model.safetensors), that .safetensors alone, or the original TAESD ``taesd_decoder.safetensors`` /
``taesd_encoder.safetensors`` (Sequential indices; the decoder's shifted by its leading clamp).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..errors import BadModelFileError
from .layers import Conv2d, Params, nchw_to_nhwc, nhwc_to_nchw, upsample_nearest


@dataclass
class TAESDConfig:
    """The parts of diffusers' AutoencoderTiny config the computation depends on (the widths come from tensors)."""

    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "TAESDConfig":
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if cfg.act_fn != "relu" or cfg.upsample_fn != "nearest" or cfg.upsampling_scaling_factor != 2:
            raise BadModelFileError(f"AutoencoderTiny with act_fn={cfg.act_fn!r}, upsample_fn={cfg.upsample_fn!r}, "
                                    f"upsampling_scaling_factor={cfg.upsampling_scaling_factor} is not supported "
                                    "(TAESD uses relu, nearest, 2)")
        return cfg


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0), out=x)


class TinyBlock:
    """Three 3x3 convolutions with ReLUs between, plus the (1x1-projected) input, then ReLU."""

    def __init__(self, p: Params, cin: int, cout: int):
        self.convs = [Conv2d(p.sub(f"conv.{j}"), cin if j == 0 else cout, cout) for j in (0, 2, 4)]
        self.skip = Conv2d(p.sub("skip"), cin, cout, 1) if "skip.weight" in p else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = _relu(self.convs[0](x))
        h = _relu(self.convs[1](h))
        skip = self.skip(x) if self.skip is not None else x
        return _relu(self.convs[2](h, residual=skip))


def _layer_indices(tensors: dict, prefix: str) -> list[int]:
    out = set()
    for name in tensors:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


class _Sequence:
    """The layers of an encoder or decoder, in order, as found in the tensors under ``prefix``."""

    def __init__(self, tensors: dict, prefix: str, source: str, decoder: bool):
        p = Params(tensors, prefix, source)
        indices = _layer_indices(tensors, prefix)
        if not indices:
            raise BadModelFileError(f"{source}: no {prefix}* tensors")
        self.layers = []
        last = indices[-1]
        for k in range(last + 1):
            lp = p.sub(k)
            if "conv.0.weight" in lp:
                w = lp["conv.0.weight"]
                self.layers.append(TinyBlock(lp, w.shape[1], w.shape[0]))
            elif "weight" in lp:
                w = lp["weight"]
                cout, cin, kh, _ = w.shape
                stride = 2 if (not decoder and 0 < k < last) else 1
                self.layers.append(Conv2d(lp, cin, cout, kh, stride=stride, padding=kh // 2))
            elif decoder and k == 1:
                self.layers.append(_relu)          # the activation after the first convolution
            elif decoder:
                self.layers.append(upsample_nearest)
            else:
                raise BadModelFileError(f"{source}: encoder layer {k} has no tensors")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x


class TinyAutoencoder:
    """TAESD: ``decode`` (scaled latents -> images in about [-1, 1]) and, when the weights have it, ``encode``."""

    def __init__(self, cfg: TAESDConfig, tensors: dict, source: str = "taesd"):
        self.cfg = cfg
        self.decoder = _Sequence(tensors, "decoder.layers.", source, decoder=True)
        self.encoder = None
        if any(name.startswith("encoder.layers.") for name in tensors):
            self.encoder = _Sequence(tensors, "encoder.layers.", source, decoder=False)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (B, 4, h, w) as diffusers' AutoencoderTiny.decode takes them -> images (B, 3, 8h, 8w)."""
        x = nchw_to_nhwc(latents)
        x = (np.tanh(x / np.float32(3)) * np.float32(3)).astype(np.float32)
        x = self.decoder(x)
        return nhwc_to_nchw(x * np.float32(2) - np.float32(1))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), as AutoencoderTiny.encode."""
        if self.encoder is None:
            raise BadModelFileError("this TAESD has no encoder weights")
        x = nchw_to_nhwc(images)
        return nhwc_to_nchw(self.encoder((x + np.float32(1)) / np.float32(2)))


def _original_layout(tensors: dict) -> dict:
    """The original TAESD files (``taesd_decoder`` / ``taesd_encoder``: nn.Sequential indices) -> diffusers names.
    The decoder starts with a parameter-free clamp, so its indices are one higher than diffusers'."""
    if not tensors or not all(name.split(".", 1)[0].isdigit() for name in tensors):
        return tensors
    first = min(int(name.split(".", 1)[0]) for name in tensors)
    if first == 1:   # decoder: Clamp at 0
        return {f"decoder.layers.{int(n.split('.', 1)[0]) - 1}.{n.split('.', 1)[1]}": t for n, t in tensors.items()}
    return {f"encoder.layers.{n}": t for n, t in tensors.items()}


def load_taesd(path: str | Path) -> TinyAutoencoder:
    """A TAESD from a diffusers AutoencoderTiny folder, its .safetensors file, or an original TAESD file."""
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        config = checkpoint.read_json(path / "config.json", "the TAESD config")
        weights = checkpoint.find_weights(path)
    else:
        checkpoint.refuse_pickle(path)
        if not path.is_file():
            from ..errors import ModelNotFoundError
            raise ModelNotFoundError(f"{path}: TAESD file not found")
        weights = path
        if (path.parent / "config.json").is_file():
            sibling = checkpoint.read_json(path.parent / "config.json", "the TAESD config")
            if sibling.get("_class_name") == "AutoencoderTiny":
                config = sibling
    tensors = _original_layout(checkpoint.load_weights(weights))
    if not any(name.startswith("decoder.layers.") for name in tensors):
        raise BadModelFileError(f"{path}: not a TAESD decoder (no decoder.layers.* tensors)")
    return TinyAutoencoder(TAESDConfig.from_dict(config), tensors, source=str(path))
