"""The KL autoencoder (diffusers' AutoencoderKL): latents to pixels and back.

    decode: latents / scaling ─ post_quant_conv ─ conv_in ─ mid (ResNet, attention, ResNet) ─ up blocks ─ norm, SiLU, conv_out
    encode: pixels ─ conv_in ─ down blocks ─ mid ─ norm, SiLU, conv_out ─ quant_conv ─ (mean, logvar)

Up blocks are (layers + 1) ResNets then nearest x2 + conv; down blocks are ResNets then a stride-2 conv on an input
padded by one pixel on the right and bottom. The mid-block attention is single-head over all pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layers import Conv2d, GroupNorm, Linear, Params, attention, nchw_to_nhwc, nhwc_to_nchw
from .unet import ResnetBlock

_EPS = 1e-6


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    sample_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class SpatialAttention:
    """GroupNorm, single-head attention over all pixels, + input."""

    def __init__(self, p: Params, channels: int, groups: int):
        self.norm = GroupNorm(p.sub("group_norm"), groups, channels, _EPS)
        self.qkv = Linear.fused([Linear(p.sub(n), channels, channels) for n in ("to_q", "to_k", "to_v")])
        self.to_out = Linear(p.sub("to_out.0"), channels, channels)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        q, k, v = np.split(self.qkv(self.norm(x).reshape(n, h * w, c)), 3, axis=-1)
        return self.to_out(attention(q, k, v, 1), residual=x.reshape(n, h * w, c)).reshape(n, h, w, c)


class VAEMidBlock:
    def __init__(self, p: Params, channels: int, groups: int, attention: bool):
        self.resnets = [ResnetBlock(p.sub(f"resnets.{i}"), channels, channels, None, groups, _EPS) for i in range(2)]
        self.attention = SpatialAttention(p.sub("attentions.0"), channels, groups) if attention else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.resnets[0](x, None)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x, None)


class Decoder:
    def __init__(self, p: Params, cfg: VAEConfig):
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(p.sub("conv_in"), cfg.latent_channels, ch[-1])
        self.mid_block = VAEMidBlock(p.sub("mid_block"), ch[-1], groups, cfg.mid_block_add_attention)
        self.up_blocks = []
        cout = ch[-1]
        for i, channels in enumerate(reversed(ch)):
            cin, cout = cout, channels
            bp = p.sub(f"up_blocks.{i}")
            resnets = [ResnetBlock(bp.sub(f"resnets.{j}"), cin if j == 0 else cout, cout, None, groups, _EPS)
                       for j in range(cfg.layers_per_block + 1)]
            upsampler = Conv2d(bp.sub("upsamplers.0.conv"), cout, cout) if i < len(ch) - 1 else None
            self.up_blocks.append((resnets, upsampler))
        self.conv_norm_out = GroupNorm(p.sub("conv_norm_out"), groups, ch[0], _EPS)
        self.conv_out = Conv2d(p.sub("conv_out"), ch[0], cfg.out_channels)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        x = self.mid_block(self.conv_in(z))
        for resnets, upsampler in self.up_blocks:
            for resnet in resnets:
                x = resnet(x, None)
            if upsampler is not None:
                x = upsampler.upsampled(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Encoder:
    def __init__(self, p: Params, cfg: VAEConfig):
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(p.sub("conv_in"), cfg.in_channels, ch[0])
        self.down_blocks = []
        cout = ch[0]
        for i, channels in enumerate(ch):
            cin, cout = cout, channels
            bp = p.sub(f"down_blocks.{i}")
            resnets = [ResnetBlock(bp.sub(f"resnets.{j}"), cin if j == 0 else cout, cout, None, groups, _EPS)
                       for j in range(cfg.layers_per_block)]
            downsampler = Conv2d(bp.sub("downsamplers.0.conv"), cout, cout, 3, stride=2, padding=0) \
                if i < len(ch) - 1 else None
            self.down_blocks.append((resnets, downsampler))
        self.mid_block = VAEMidBlock(p.sub("mid_block"), ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(p.sub("conv_norm_out"), groups, ch[-1], _EPS)
        self.conv_out = Conv2d(p.sub("conv_out"), ch[-1], 2 * cfg.latent_channels)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.conv_in(x)
        for resnets, downsampler in self.down_blocks:
            for resnet in resnets:
                x = resnet(x, None)
            if downsampler is not None:
                x = downsampler(np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
        return self.conv_out(self.conv_norm_out(self.mid_block(x), silu=True))


class AutoencoderKL:
    def __init__(self, cfg: VAEConfig, tensors: "dict[str, np.ndarray] | Params", source: str = "vae", encoder: bool = True):
        p = tensors if isinstance(tensors, Params) else Params(tensors, source=source)
        self.cfg = cfg
        lat = cfg.latent_channels
        self.decoder = Decoder(p.sub("decoder"), cfg)
        self.post_quant_conv = Conv2d(p.sub("post_quant_conv"), lat, lat, 1) if cfg.use_post_quant_conv else None
        self.encoder = self.quant_conv = None
        if encoder and p.has_prefix("encoder"):
            self.encoder = Encoder(p.sub("encoder"), cfg)
            self.quant_conv = Conv2d(p.sub("quant_conv"), 2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None

    # -- decoding ------------------------------------------------------------------------------------------------
    # Tiling as diffusers' AutoencoderKL.enable_tiling(): latents larger than tile_latent_min_size (the config's
    # sample_size / 8) are decoded in tiles of that size overlapping by a quarter, each tile's top and left
    # edges blended linearly into the tiles above and before it (blend_v, blend_h), then cropped to
    # tile_sample_min_size * 3/4 -- the same pixels as diffusers with tiling. GroupNorm statistics are per tile,
    # so a tiled image differs slightly from an untiled one everywhere, and most near the seams.
    tile_overlap_factor = 0.25

    @property
    def tile_sample_min_size(self) -> int:
        size = self.cfg.sample_size or 512
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tile_latent_min_size(self) -> int:
        return int(self.tile_sample_min_size / self.cfg.downscale)

    def decode(self, latents: np.ndarray, tiling: bool = False, slicing: bool = False) -> np.ndarray:
        """Raw latents (B, C, h, w), already divided by the scaling factor -> images (B, 3, H, W) in about [-1, 1].

        tiling: decode latents larger than a tile in overlapping tiles (diffusers' enable_tiling). slicing: decode a
        batch one image at a time (diffusers' enable_slicing; the same images)."""
        if slicing and latents.shape[0] > 1:
            return np.concatenate([self._decode(latents[i : i + 1], tiling) for i in range(latents.shape[0])])
        return self._decode(latents, tiling)

    def _decode(self, latents: np.ndarray, tiling: bool) -> np.ndarray:
        t = self.tile_latent_min_size
        if tiling and (latents.shape[-1] > t or latents.shape[-2] > t):
            return self.tiled_decode(latents)
        z = nchw_to_nhwc(latents)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return nhwc_to_nchw(self.decoder(z))

    def tiled_decode(self, latents: np.ndarray) -> np.ndarray:
        """Decode NCHW latents tile by tile as diffusers' AutoencoderKL.tiled_decode (NHWC inside)."""
        tl, ts = self.tile_latent_min_size, self.tile_sample_min_size
        overlap = int(tl * (1 - self.tile_overlap_factor))
        blend = int(ts * self.tile_overlap_factor)
        limit = ts - blend
        z = nchw_to_nhwc(latents)
        result_rows, above = [], None
        for i in range(0, z.shape[1], overlap):
            row = []
            for j in range(0, z.shape[2], overlap):
                tile = np.ascontiguousarray(z[:, i : i + tl, j : j + tl])
                if self.post_quant_conv is not None:
                    tile = self.post_quant_conv(tile)
                row.append(self.decoder(tile))
            for j, tile in enumerate(row):  # blended in place, in diffusers' order
                if above is not None:
                    _blend(above[j], tile, blend, axis=1)
                if j > 0:
                    _blend(row[j - 1], tile, blend, axis=2)
            result_rows.append(np.concatenate([tile[:, :limit, :limit] for tile in row], axis=2))
            above = row  # only the row above is blended into the next
        return nhwc_to_nchw(np.concatenate(result_rows, axis=1))

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar) of the latent distribution, NCHW."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded without its encoder")
        moments = self.encoder(nchw_to_nhwc(images))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = np.split(nhwc_to_nchw(moments), 2, axis=1)
        return np.ascontiguousarray(mean), np.clip(logvar, -30.0, 20.0)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """diffusers' blend_v (axis 1, rows) / blend_h (axis 2, columns) on NHWC tiles: b's first `extent` lines
    become a linear mix of a's last ones and their own, in place; float32 arithmetic as PyTorch's."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    for y in range(extent):
        wa, wb = np.float32(1 - y / extent), np.float32(y / extent)
        if axis == 1:
            b[:, y] = a[:, y - extent] * wa + b[:, y] * wb
        else:
            b[:, :, y] = a[:, :, y - extent] * wa + b[:, :, y] * wb
