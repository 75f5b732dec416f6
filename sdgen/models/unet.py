"""The denoising UNet (diffusers' UNet2DConditionModel), for SD 1.x, SD 2.x and SDXL configs.

    noisy latents ─ conv_in ─ down blocks ─ mid block ─ up blocks ─ norm, SiLU, conv_out ─ predicted noise (or v)
                               │  (skips) ─────────────────────┘
    timestep ─ sinusoidal ─ MLP ─ (+ SDXL: text embeds and size/crop ids) ─ added in every ResNet block
    text context ─ cross-attention in every transformer block

A down block is [ResNet, (Transformer)] x layers, then a stride-2 conv; an up block concatenates a skip before each
ResNet and ends with nearest x2 + conv. A transformer block is self-attention, cross-attention and a GEGLU MLP, each
pre-normed and residual. Internally feature maps are NHWC; the model takes and returns NCHW like diffusers.

Guidance runs the same latents under two text contexts (negative and positive prompt). Given B latents and k B
context rows, the UNet computes what it would on the latents repeated k times, but runs the layers the contexts do
not reach yet once per latent: up to the first cross-attention (conv_in, the first ResNet, the first self-attention
of SD 1.x/2.x) the k copies would be the same numbers. The hidden states are repeated where a context first enters
(for_rows), skips and the time embedding where they meet repeated states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..errors import BadModelFileError
from .layers import (Conv2d, GroupNorm, LayerNorm, Linear, Params, attention, nchw_to_nhwc, nhwc_to_nchw,
                     timestep_embedding)


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int | list = 2
    attention_head_dim: int | list = 8
    num_attention_heads: int | list | None = None
    cross_attention_dim: int | list = 768
    transformer_layers_per_block: int | list = 1
    reverse_transformer_layers_per_block: list | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    only_cross_attention: bool | list = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    class_embed_type: str | None = None
    time_cond_proj_dim: int | None = None
    resnet_time_scale_shift: str = "default"
    sample_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        unsupported = {
            "class_embed_type": cfg.class_embed_type,
            "time_cond_proj_dim": cfg.time_cond_proj_dim,
            "resnet_time_scale_shift": None if cfg.resnet_time_scale_shift == "default" else cfg.resnet_time_scale_shift,
            "addition_embed_type": None if cfg.addition_embed_type in (None, "text_time") else cfg.addition_embed_type,
        }
        for key, value in unsupported.items():
            if value is not None:
                raise BadModelFileError(f"unet config: {key}={value!r} is not supported")
        if any(_per_block(cfg.only_cross_attention, 1)):
            raise BadModelFileError("unet config: only_cross_attention is not supported")
        return cfg


def for_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a (B, ...) as the rows of the batch it joins: a itself if it has them, else a repeated k = rows / B times
    along the batch (np.concatenate([a] * k)), as the shared layers' outputs meet those the contexts have reached."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a] * (rows // a.shape[0]))


class ResnetBlock:
    """GroupNorm, SiLU, conv; + time embedding; GroupNorm, SiLU, conv; + (1x1-projected) input."""

    def __init__(self, p: Params, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float):
        self.norm1 = GroupNorm(p.sub("norm1"), groups, cin, eps)
        self.conv1 = Conv2d(p.sub("conv1"), cin, cout)
        self.time_emb_proj = Linear(p.sub("time_emb_proj"), temb_channels, cout) if temb_channels else None
        self.norm2 = GroupNorm(p.sub("norm2"), groups, cout, eps)
        self.conv2 = Conv2d(p.sub("conv2"), cout, cout)
        # the 1x1 shortcut convolution is a linear layer over the channels (linear panels where they run)
        self.conv_shortcut = Linear(p.sub("conv_shortcut"), cin, cout) if cin != cout else None

    def __call__(self, x: np.ndarray, temb: np.ndarray | None) -> np.ndarray:
        # each GroupNorm + SiLU applied by the convolution after it as it reads its input (the same numbers; the
        # normalized maps are never made)
        h = self.conv1(x, pre=self.norm1.stats(x, silu=True))
        if self.time_emb_proj is not None and temb is not None:
            h += for_rows(self.time_emb_proj(kernels.silu(temb)), h.shape[0])[:, None, None, :]
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return self.conv2(h, residual=shortcut, pre=self.norm2.stats(h, silu=True))


class Attention:
    """Multi-head attention with q from x and k, v from the context (x itself for self-attention)."""

    def __init__(self, p: Params, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        self.heads = heads
        self.self_attention = context_dim is None
        kv_dim = dim if context_dim is None else context_dim
        q = Linear(p.sub("to_q"), dim, dim, bias=bias)
        k = Linear(p.sub("to_k"), kv_dim, dim, bias=bias)
        v = Linear(p.sub("to_v"), kv_dim, dim, bias=bias)
        if self.self_attention:
            self.qkv = Linear.fused([q, k, v])
        else:
            self.q, self.kv = q, Linear.fused([k, v])
        self.to_out = Linear(p.sub("to_out.0"), dim, dim)
        self._context_kv = None  # (context, its keys and values): see context_kv

    def __call__(self, x: np.ndarray, context: np.ndarray | None = None, residual: np.ndarray | None = None
                 ) -> np.ndarray:
        """Attention over x (and context), projected out, + residual if given (in the projection's pass)."""
        if self.self_attention:
            q, k, v = np.split(self.qkv(x), 3, axis=-1)  # views, which the attention kernel reads in place
        else:
            q = self.q(x)
            k, v = np.split(self.context_kv(context), 2, axis=-1)
        return self.to_out(attention(q, k, v, self.heads), residual=residual)

    def context_kv(self, context: np.ndarray) -> np.ndarray:
        """The cross-attention's keys and values (B, L, 2 dim) of the context. They do not depend on the latents,
        so they are kept and reused while the same context array comes back: the UNet passes its own read-only
        copy of the text context, the same object at every step of a run (UNet.text_context)."""
        kept = self._context_kv
        if kept is None or kept[0] is not context:
            kept = self._context_kv = (context, self.kv(context))
        return kept[1]


FF_CHUNK_BYTES = 32 << 20  # the transformer MLP's intermediate (tokens x 8 channels) per block of tokens, at most


class TransformerBlock:
    """x + self-attn(LN x); x + cross-attn(LN x, context); x + GEGLU-MLP(LN x)."""

    def __init__(self, p: Params, dim: int, heads: int, context_dim: int):
        self.norm1 = LayerNorm(p.sub("norm1"), dim)
        self.attn1 = Attention(p.sub("attn1"), dim, heads)
        self.norm2 = LayerNorm(p.sub("norm2"), dim)
        self.attn2 = Attention(p.sub("attn2"), dim, heads, context_dim)
        self.norm3 = LayerNorm(p.sub("norm3"), dim)
        self.ff_in = Linear(p.sub("ff.net.0.proj"), dim, dim * 8)
        self.ff_out = Linear(p.sub("ff.net.2"), dim * 4, dim)

    def __call__(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        x = self.attn1(self.norm1(x), residual=x)
        x = for_rows(x, context.shape[0])  # the first layer where the text contexts enter
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.feed_forward(x)

    def feed_forward(self, x: np.ndarray) -> np.ndarray:
        """x + GEGLU-MLP(LN x), over blocks of tokens so that the MLP's 8x-wide intermediate stays within
        FF_CHUNK_BYTES (as diffusers' forward chunking: every token on its own, the same numbers)."""
        b, n, c = x.shape
        rows = max(64, FF_CHUNK_BYTES // (4 * self.ff_in.out_features))
        if b * n <= rows:
            return self.ff_out(kernels.geglu(self.ff_in(self.norm3(x))), residual=x)
        flat = np.ascontiguousarray(x).reshape(b * n, c)
        out = np.empty_like(flat)
        for r0 in range(0, b * n, rows):
            xs = flat[r0 : r0 + rows]
            self.ff_out(kernels.geglu(self.ff_in(self.norm3(xs))), residual=xs, out=out[r0 : r0 + rows])
        return out.reshape(b, n, c)


class Transformer2D:
    """GroupNorm, project to tokens, transformer blocks, project back, + input."""

    def __init__(self, p: Params, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        self.norm = GroupNorm(p.sub("norm"), groups, channels, 1e-6)
        # a 1x1 conv (SD1) or a linear layer (SD2, SDXL): the same map on NHWC tokens
        self.proj_in = Linear(p.sub("proj_in"), channels, channels)
        self.blocks = [TransformerBlock(p.sub(f"transformer_blocks.{i}"), channels, heads, context_dim)
                       for i in range(depth)]
        self.proj_out = Linear(p.sub("proj_out"), channels, channels)

    def __call__(self, x: np.ndarray, context: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(n, h * w, c))
        for block in self.blocks:
            tokens = block(tokens, context)
        rows = tokens.shape[0]
        return self.proj_out(tokens, residual=for_rows(x, rows).reshape(rows, h * w, c)).reshape(rows, h, w, c)



class DownBlock:
    def __init__(self, p: Params, cin: int, cout: int, layers: int, temb: int, groups: int, eps: float,
                 attention: dict | None, downsample: bool):
        self.resnets = [ResnetBlock(p.sub(f"resnets.{i}"), cin if i == 0 else cout, cout, temb, groups, eps)
                        for i in range(layers)]
        self.attentions = [Transformer2D(p.sub(f"attentions.{i}"), cout, groups=groups, **attention)
                           for i in range(layers)] if attention else None
        self.downsampler = Conv2d(p.sub("downsamplers.0.conv"), cout, cout, 3, stride=2) if downsample else None

    def __call__(self, x, temb, context, skips: list):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x


class UpBlock:
    def __init__(self, p: Params, cin: int, cprev: int, cout: int, layers: int, temb: int, groups: int, eps: float,
                 attention: dict | None, upsample: bool):
        self.resnets = []
        for i in range(layers):
            skip_channels = cin if i == layers - 1 else cout
            resnet_in = cprev if i == 0 else cout
            self.resnets.append(ResnetBlock(p.sub(f"resnets.{i}"), resnet_in + skip_channels, cout, temb, groups, eps))
        self.attentions = [Transformer2D(p.sub(f"attentions.{i}"), cout, groups=groups, **attention)
                           for i in range(layers)] if attention else None
        self.upsampler = Conv2d(p.sub("upsamplers.0.conv"), cout, cout) if upsample else None

    def __call__(self, x, temb, context, skips: list, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(np.concatenate([x, for_rows(skips.pop(), x.shape[0])], axis=-1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        if self.upsampler is not None:
            x = self.upsampler.upsampled(x, upsample_size)
        return x


class MidBlock:
    def __init__(self, p: Params, channels: int, temb: int, groups: int, eps: float, attention: dict):
        self.resnets = [ResnetBlock(p.sub(f"resnets.{i}"), channels, channels, temb, groups, eps) for i in range(2)]
        self.attention = Transformer2D(p.sub("attentions.0"), channels, groups=groups, **attention)

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attention(x, context)
        return self.resnets[1](x, temb)


class UNet:
    def __init__(self, cfg: UNetConfig, tensors: "dict[str, np.ndarray] | Params", source: str = "unet"):
        p = tensors if isinstance(tensors, Params) else Params(tensors, source=source)
        self.cfg = cfg
        ch = list(cfg.block_out_channels)
        n = len(ch)
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        layers = _per_block(cfg.layers_per_block, n)
        context_dims = _per_block(cfg.cross_attention_dim, n)
        depths = _per_block(cfg.transformer_layers_per_block, n)
        up_depths = cfg.reverse_transformer_layers_per_block or list(reversed(depths))
        temb = ch[0] * 4

        def attention(kind: str, i: int, depth: int, head_list=heads, ctx=context_dims):
            if "CrossAttn" not in kind:
                return None
            return {"heads": head_list[i], "depth": depth, "context_dim": ctx[i]}

        self.time_linear_1 = Linear(p.sub("time_embedding.linear_1"), ch[0], temb)
        self.time_linear_2 = Linear(p.sub("time_embedding.linear_2"), temb, temb)
        self.add_linear_1 = self.add_linear_2 = None
        if cfg.addition_embed_type == "text_time":
            self.add_linear_1 = Linear(p.sub("add_embedding.linear_1"), cfg.projection_class_embeddings_input_dim, temb)
            self.add_linear_2 = Linear(p.sub("add_embedding.linear_2"), temb, temb)
        self.conv_in = Conv2d(p.sub("conv_in"), cfg.in_channels, ch[0])

        self.down_blocks = []
        cout = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(p.sub(f"down_blocks.{i}"), cin, cout, layers[i], temb, groups, eps,
                                              attention(kind, i, depths[i]), downsample=i < n - 1))

        self.mid_block = None
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = MidBlock(p.sub("mid_block"), ch[-1], temb, groups, eps,
                                      {"heads": heads[-1], "depth": depths[-1], "context_dim": context_dims[-1]})
        elif cfg.mid_block_type is not None:
            raise BadModelFileError(f"unet config: mid_block_type {cfg.mid_block_type!r} is not supported")

        rch, rheads, rlayers, rctx = ch[::-1], heads[::-1], layers[::-1], context_dims[::-1]
        self.up_blocks = []
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            cprev, cout = cout, rch[i]
            cin = rch[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(p.sub(f"up_blocks.{i}"), cin, cprev, cout, rlayers[i] + 1, temb, groups, eps,
                                          attention(kind, i, up_depths[i], rheads, rctx), upsample=i < n - 1))

        self.conv_norm_out = GroupNorm(p.sub("conv_norm_out"), groups, ch[0], eps)
        self.conv_out = Conv2d(p.sub("conv_out"), ch[0], cfg.out_channels)
        self._context = None

    def text_context(self, context: np.ndarray) -> np.ndarray:
        """context as the UNet's own read-only float32 copy: the same array object for as long as the values stay
        the same (the steps of a run), so that each cross-attention computes its keys and values once per prompt
        instead of once per step (Attention.context_kv): about 4% of an SDXL step at 512x512, 0.5% for SD 1.x.
        A new context (another prompt, batch or shape) replaces the copy and so every layer's kept keys."""
        context = np.asarray(context, dtype=np.float32)
        held = self._context
        if held is None or held.shape != context.shape or not np.array_equal(held, context):
            held = np.array(context, dtype=np.float32, order="C")
            held.flags.writeable = False
            self._context = held
        return held

    def forget_context(self) -> None:
        """Drop the kept text context, so that the next forward computes every cross-attention's keys and values
        again (benchmarks timing one whole forward)."""
        self._context = None

    def time_embedding(self, timestep, batch: int, text_embeds=None, time_ids=None) -> np.ndarray:
        t = np.broadcast_to(np.asarray(timestep, dtype=np.float64).reshape(-1), (batch,))
        emb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        emb = self.time_linear_2(kernels.silu(self.time_linear_1(emb)))
        if self.add_linear_1 is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet (SDXL) needs text_embeds and time_ids")
            ids = timestep_embedding(np.asarray(time_ids, dtype=np.float32).reshape(-1), self.cfg.addition_time_embed_dim,
                                     self.cfg.flip_sin_to_cos, self.cfg.freq_shift).reshape(batch, -1)
            add = np.concatenate([np.asarray(text_embeds, dtype=np.float32), ids], axis=-1)
            emb = emb + self.add_linear_2(kernels.silu(self.add_linear_1(add)))
        return emb

    def __call__(self, sample: np.ndarray, timestep, context: np.ndarray, text_embeds: np.ndarray | None = None,
                 time_ids: np.ndarray | None = None) -> np.ndarray:
        """sample: (B, C, H, W) NCHW; timestep: scalar or (B,); context: (B, L, D), or (k B, L, D) for each sample
        under k contexts (guidance: the result of np.concatenate([sample] * k) with the layers before the first
        cross-attention run once per sample; see the module's docstring). text_embeds, time_ids (SDXL): one row
        per context row. Returns NCHW, a row per context row."""
        batch, rows = sample.shape[0], context.shape[0]
        if rows % batch:
            raise ValueError(f"unet: {rows} context rows for {batch} samples (must be a multiple)")
        temb = self.time_embedding(timestep, batch if self.add_linear_1 is None else rows, text_embeds, time_ids)
        context = self.text_context(context)
        x = self.conv_in(nchw_to_nhwc(sample))
        if temb.shape[0] != batch:  # SDXL: the pooled text embeddings make each context's time embedding its own
            x = for_rows(x, rows)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            # the upsampled size follows the skip it will be joined with (needed when H or W is not a multiple of 2^n)
            target = None
            if block.upsampler is not None:
                target = skips[-len(block.resnets) - 1].shape[1:3]
            x = block(x, temb, context, skips, upsample_size=target)
        x = self.conv_out(self.conv_norm_out(x, silu=True))
        return nhwc_to_nchw(for_rows(x, rows))  # (a UNet without cross-attention never met the contexts)
