"""2-D convolution, NHWC. A Conv2dPlan holds the weights prepared once at load; conv2d runs it.

First version: every convolution goes through the reference im2col + GEMM. The fast paths (Winograd F(2x2,3x3) and
F(4x4,3x3) for stride-1 3x3, GEMM for 1x1) replace it behind the same two names.
"""

from __future__ import annotations

import numpy as np

from . import reference


class Conv2dPlan:
    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, stride: int = 1, padding: int = 0):
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        self.stride = stride
        self.padding = padding
        self.out_channels, self.in_channels, self.kh, self.kw = self.weight.shape


def conv2d(x: np.ndarray, plan: Conv2dPlan, residual: np.ndarray | None = None) -> np.ndarray:
    """Convolve NHWC x with the planned weights; adds residual (same shape as the output) if given."""
    y = reference.conv2d(x, plan.weight, plan.bias, plan.stride, plan.padding)
    if residual is not None:
        y += residual
    return y
