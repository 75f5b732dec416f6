"""The CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection).

    token ids ─ token embedding + position embedding ─ N x [ x + attn(LN1(x)) ; x + MLP(LN2(x)) ] ─ final LN
                                                         (causal self-attention)
Hidden states of every layer are kept when asked for: SD2 and SDXL condition on the penultimate one, and clip skip
picks an earlier one. The pooled output is the final-LN state at the first end-of-text token; with a projection
(SDXL's second encoder) it is projected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..kernels.weights import widen
from .layers import LayerNorm, Linear, Params


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TextEncoderOutput:
    last_hidden_state: np.ndarray          # (B, L, C), after the final layer norm
    hidden_states: list[np.ndarray] | None  # embeddings output, then each layer's output (before the final norm)
    pooled: np.ndarray                     # (B, C), or (B, projection_dim) with a projection


_ACTIVATIONS = {"quick_gelu": kernels.quick_gelu, "gelu": kernels.gelu}


class CLIPAttention:
    def __init__(self, p: Params, dim: int, heads: int):
        self.heads = heads
        self.qkv = Linear.fused([Linear(p.sub(n), dim, dim) for n in ("q_proj", "k_proj", "v_proj")])
        self.out_proj = Linear(p.sub("out_proj"), dim, dim)

    def __call__(self, x: np.ndarray, mask: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        q, k, v = np.split(self.qkv(x), 3, axis=-1)  # views, read in place
        return self.out_proj(kernels.attention(q, k, v, self.heads, mask=mask), residual=residual)


class CLIPEncoderLayer:
    def __init__(self, p: Params, cfg: CLIPTextConfig):
        c = cfg.hidden_size
        self.layer_norm1 = LayerNorm(p.sub("layer_norm1"), c, cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(p.sub("self_attn"), c, cfg.num_attention_heads)
        self.layer_norm2 = LayerNorm(p.sub("layer_norm2"), c, cfg.layer_norm_eps)
        self.fc1 = Linear(p.sub("mlp.fc1"), c, cfg.intermediate_size)
        self.fc2 = Linear(p.sub("mlp.fc2"), cfg.intermediate_size, c)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x = self.self_attn(self.layer_norm1(x), mask, residual=x)
        return self.fc2(self.act(self.fc1(self.layer_norm2(x))), residual=x)


class CLIPTextModel:
    """Weights in the canonical naming (no ``text_model.`` prefix): embeddings.*, encoder.layers.N.*, final_layer_norm.*"""

    def __init__(self, cfg: CLIPTextConfig, tensors: "dict[str, np.ndarray] | Params", source: str = "text_encoder"):
        p = tensors if isinstance(tensors, Params) else Params(tensors, source=source)
        c = cfg.hidden_size
        self.cfg = cfg
        # the token table at the storage dtype (rows widened when looked up); positions in float32
        self.token_embedding = p.stored("embeddings.token_embedding.weight",
                                        p.shaped("embeddings.token_embedding.weight", (cfg.vocab_size, c)))
        self.position_embedding = p.f32("embeddings.position_embedding.weight", p.shaped(
            "embeddings.position_embedding.weight", (cfg.max_position_embeddings, c)))
        self.layers = [CLIPEncoderLayer(p.sub(f"encoder.layers.{i}"), cfg) for i in range(cfg.num_hidden_layers)]
        self.final_layer_norm = LayerNorm(p.sub("final_layer_norm"), c, cfg.layer_norm_eps)
        self.text_projection = None
        if cfg.projection_dim is not None and "text_projection.weight" in p:
            self.text_projection = Linear(p.sub("text_projection"), c, cfg.projection_dim, bias=False)

    def __call__(self, input_ids: np.ndarray, output_hidden_states: bool = False) -> TextEncoderOutput:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        length = ids.shape[1]
        x = (widen(self.token_embedding[ids]) + self.position_embedding[:length]).astype(np.float32)
        mask = np.triu(np.full((length, length), np.finfo(np.float32).min, dtype=np.float32), k=1)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask)
            if hidden is not None:
                hidden.append(x)
        last = self.final_layer_norm(x)
        # transformers: a config with the legacy eos id 2 pools at the highest id; otherwise at the first eos token
        if self.cfg.eos_token_id == 2:
            eos_at = ids.argmax(axis=-1)
        else:
            eos_at = (ids == self.cfg.eos_token_id).argmax(axis=-1)
        pooled = last[np.arange(ids.shape[0]), eos_at]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return TextEncoderOutput(last, hidden, pooled)
