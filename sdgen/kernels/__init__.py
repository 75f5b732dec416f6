"""Compute kernels: arrays in, arrays out; they know nothing of models.

Layouts: feature maps NHWC float32, token sequences (batch, tokens, channels), weights as PyTorch stores them.
"""

from .conv import Conv2dPlan, conv2d
from .reference import attention, gelu, group_norm, layer_norm, linear, quick_gelu, silu, softmax

__all__ = [
    "Conv2dPlan", "conv2d", "attention", "gelu", "group_norm", "layer_norm", "linear", "quick_gelu", "silu", "softmax",
]
