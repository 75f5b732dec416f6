"""Compute kernels: arrays in, arrays out; they know nothing of models.

Layouts: feature maps NHWC float32, token sequences (batch, tokens, channels), weights as PyTorch stores them.
Fast versions (Numba + BLAS) here; plain numpy twins of each in reference.py, which the tests compare against.
"""

from .activations import geglu, gelu, quick_gelu, silu
from .mha import attention, softmax
from .conv import Conv2dPlan, conv2d, upsample_conv2d
from .gemm import linear
from .norm import Normalization, group_norm, group_norm_stats, layer_norm, normalize
from .resize import upsample2x

__all__ = [
    "Conv2dPlan", "Normalization", "conv2d", "attention", "gelu", "geglu", "group_norm", "group_norm_stats",
    "layer_norm", "linear", "normalize", "quick_gelu", "silu", "softmax", "upsample2x", "upsample_conv2d",
]
