"""2-D convolution, NHWC. A Conv2dPlan holds the weights prepared once at load; conv2d runs it.

Paths, chosen per call from the plan and the input size (`choose_variant`):
  "f63", "f43", "f23"  Winograd F(6x6,3x3) / F(4x4,3x3) / F(2x2,3x3) for 3x3 stride 1 (winograd.py),
  "gemm1x1"     1x1 stride 1 without padding: one GEMM on (N*H*W, Cin),
  "kn2row"      stride 1 with few output channels (the models' last convolutions): one GEMM by all the taps'
                weights, then shifted sums (gemm.conv_kn2row),
  "im2col"      anything else (3x3 stride 2, odd kernels, and 3x3 stride 1 where Winograd does not pay).
Filter transforms and weight re-layouts are made once per plan and path, the first time that path is used (or by
`Conv2dPlan.prepare`), and kept in the plan -- or, for a plan made with ``cache=False`` (the models' convolutions),
never kept: such a plan holds only the weights as stored (float32, float16 or bfloat16 bits) and makes what a path
needs at each call into shared scratch buffers (sdgen.kernels.weights), so that a model holds one copy of each
weight. The numbers are the same either way.
"""

from __future__ import annotations

import numpy as np

from . import upconv, winograd
from . import weights as _weights
from .gemm import conv_im2col, conv_kn2row, gemm_bias
from .norm import normalize
from .resize import upsample2x

VARIANTS = ("f63", "f43", "f23", "im2col", "gemm1x1", "kn2row")
WINOGRAD = {"f63": 6, "f43": 4, "f23": 2}  # the Winograd paths and their output tiles' side m


# F(4,3) stores its filters 4x larger than the 3x3 weights (36 / 9 values), F(2,3) 1.8x (16 / 9). Above this size
# of transformed filters F(2,3) is taken instead: in SD's UNet the 1280-channel convolutions alone would hold ~7 GB
# as F(4,3) filters, and on their 16x16 and 8x8 maps F(2,3) is fast enough (scripts/bench_kernels.py).
F43_MAX_FILTER_BYTES = 64 << 20
# Plans without cache make the Winograd filters at each call; with this few F(2,3) tiles or fewer the products
# are too small to repay that, and im2col (which multiplies by the stored weights directly) is faster (1280
# channels, 2 threads: 8x8 maps, batch 2 (32 tiles): im2col 23 ms, F(2,3) 27; 16x16, batch 1 (64 tiles): im2col
# 44, F(2,3) 37). With fewer F(4,3) tiles than STREAM_F43_TILES they take F(2,3) (weights in blocks, 1280
# channels: 8x8 maps, batch 2 (8 tiles): F(2,3) 16 ms, F(4,3) 22; 16x16, batch 1 (16 tiles): 27 and 25).
STREAM_IM2COL_TILES = 32
STREAM_F43_TILES = 16
# With fewer input or output channels than this the Winograd transforms cost more than the products they save.
MIN_WINOGRAD_CHANNELS = 16
# F(6,3) needs 21% fewer multiplications than F(4,3) (64 per 36 outputs against 36 per 16) and moves 21% less
# transformed data, but its filters, made at each call, are 1.8x larger, and its 6x6 tiles waste more of a small
# map (27% of a 32x32 one, 6% of 64x64). Taken on maps of at least F63_MIN_PIXELS whose filters fit the shared
# buffer whole (winograd.whole_filter_bytes(6), 72 MB; else they are made and used in groups, the input transform
# repeated) and are no larger than the transformed tiles. Ratios to F(4,3), filters made at each call, 2 threads,
# Zen 4, medians of alternating calls: 320 channels 64x64 batch 2 0.91, 256 at 256x256 0.85, 128 at 512x512 0.93,
# 512 at 128x128 0.89; where the rule keeps F(4,3): 320 at 64x64 batch 1 1.23 (filters 1.3x the tiles), 512 at
# 64x64 1.09 (filters 2.1x the tiles), 640 at 32x32 1.10.
F63_MIN_PIXELS = 64 * 64


def f63_pays(cin: int, cout: int, h: int, w: int, n: int) -> bool:
    """Whether a convolution whose Winograd filters are made at each call takes F(6,3) (see F63_MIN_PIXELS)."""
    if h * w < F63_MIN_PIXELS:
        return False
    cinp, coutp = winograd.padded_channels(cin), winograd.padded_channels(cout)
    filters = 64 * cinp * coutp * 4
    tiles = n * (-(-h // 6)) * (-(-w // 6)) * 64 * (cinp + coutp) * 4
    return filters <= min(winograd.whole_filter_bytes(6), tiles)


def choose_variant(cin: int, cout: int, h: int, w: int, n: int, cache: bool = True) -> str:
    """Path for a 3x3 stride-1 convolution of this size; a coarse table from scripts/bench_kernels.py on a 2-core
    AVX2 EPYC with OpenBLAS (ratios to torch's conv2d, preliminary: im2col 0.4-1.1, F(2,3) 0.26-0.6, F(4,3)
    0.26-0.36). F(4,3) needs 4x fewer multiplications than direct convolution, F(2,3) 2.25x fewer; both lose to
    im2col when channels are very few (the transforms then cost more than the GEMMs) or the map is tiny.
    cache: whether the plan keeps its filters (F43_MAX_FILTER_BYTES then bounds them; kept filters stay F(4,3) or
    F(2,3)); filters made at each call never take more than a bounded buffer, so F(4,3) is chosen whatever their
    size (1.3-2x faster than F(2,3) on the UNet's 1280-channel layers, measured) where there are enough tiles
    (STREAM_F43_TILES), and F(6,3) on large maps where it pays (f63_pays)."""
    if min(cin, cout) < MIN_WINOGRAD_CHANNELS:
        return "im2col"
    tiles2 = n * (-(-h // 2)) * (-(-w // 2))
    if tiles2 < 8:
        return "im2col"
    if not cache:
        if f63_pays(cin, cout, h, w, n):
            return "f63"
        return "f43" if n * (-(-h // 4)) * (-(-w // 4)) >= STREAM_F43_TILES else "f23"
    if 36 * cin * cout * 4 <= F43_MAX_FILTER_BYTES and h * w >= 64:
        return "f43"
    return "f23"


def few_outputs(cin: int, cout: int, stride: int) -> bool:
    """Whether a (non-1x1) convolution takes the kn2row path: stride 1, fewer output channels than
    MIN_WINOGRAD_CHANNELS and at least that many inputs. The VAE's last convolution (128 -> 3, 512x512, 2 threads):
    im2col 121 ms, kn2row 41; the UNet's (320 -> 4, 64x64, batch 2): 8.0 and 3.1 ms; 128 -> 8: 27 and 21."""
    return stride == 1 and cout < MIN_WINOGRAD_CHANNELS <= cin


def _taps_matrix(hwio: np.ndarray) -> np.ndarray:
    """(kh, kw, Cin, Cout) weights as kn2row's (Cin, kh*kw*Cout) float32 matrix, columns ordered (r, s, o)."""
    kh, kw, cin, cout = hwio.shape
    return np.ascontiguousarray(np.asarray(hwio, dtype=np.float32).transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout))


# A plan made with keep_filters (--conv-filters keep) keeps the F(4,3) filters of its blocked weights (the 640-2560
# channel layers of SD's UNets) for maps of 8x8 up to KEEP_MAX_PIXELS, made once at the first call, where making
# them a block at a time at each call costs 20-40% of their products: those convolutions (2 threads, Zen 4, medians
# of 9 alternating calls, kept / made at each call) 1280 channels at 16x16 0.68 (batch 1) and 0.78 (batch 2),
# 2560 -> 1280 0.62, at 8x8 (batch 2, where make takes F(2,3)) 0.61, 640 at 32x32 0.83-0.87 (`python
# scripts/bench_kernels.py --only conv --variants model,model-keep`: batch 2, 0.80, 0.67, 0.89). Larger maps and
# the other layers make theirs at each call, as without: there the filters are a small part of the work.
KEEP_MAX_PIXELS = 32 * 32


def blocked_weights(cin: int, cout: int) -> bool:
    """Whether a plan without cache stores these 3x3 weights in blocks of output channels: where their F(4,3)
    filters would not fit the shared buffer whole (winograd.STREAM_FILTER_BYTES: 640 x 640 channels and up), so
    that they are made a block at a time (winograd.winograd_conv_blocks) on the small maps such layers run on."""
    return 36 * winograd.padded_channels(cin) * winograd.padded_channels(cout) * 4 > winograd.STREAM_FILTER_BYTES


class Conv2dPlan:
    """Weights (OIHW, as PyTorch stores them), bias, stride and padding of one convolution, prepared for conv2d.

    variant: force a path (one of VARIANTS) instead of choosing per input size; for tests and benchmarks.
    cache: keep each path's transformed weights (beside the float32 weights) once made. False: keep only the weights
    as given -- float32, float16, or bfloat16 bits as uint16 -- re-laid out, and make the transformed ones at each
    call. relaid: a function (layout name, make) -> make(), the weights re-laid out, or the same numbers from
    elsewhere (sdgen.relaid_cache); None: make(). keep_filters (with cache False): the Winograd filters of blocked
    weights are made once, as F(4,3), and kept for the maps of `keeps` (see KEEP_MAX_PIXELS); the rest as without.
    """

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None,
        stride: int = 1,
        padding: int = 0,
        variant: str | None = None,
        cache: bool = True,
        relaid=None,
        keep_filters: bool = False,
    ):
        self.cache = bool(cache)
        relaid = relaid or (lambda layout, make: make())
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.stride = int(stride)
        self.winograd_ok = (self.kh, self.kw) == (3, 3) and self.stride == 1
        self.hwio = self.blocks = None
        if self.cache:
            self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        else:  # the only copy: (kh, kw, Cin, Cout) as stored (float32, float16 or bfloat16 bits)
            if weight.dtype not in (np.float16, np.uint16):
                weight = np.asarray(weight, dtype=np.float32)
            self.weight = None
            if self.winograd_ok and blocked_weights(self.in_channels, self.out_channels):
                # in blocks of output channels instead (winograd.winograd_conv_blocks)
                ob = winograd.channel_block(self.out_channels)
                self.blocks = relaid(f"blocks{ob}", lambda: _weights.oihw_blocks(weight, ob))
            else:
                self.hwio = relaid("hwio", lambda: _weights.hwio(weight))
        self.keep_filters = bool(keep_filters) and self.blocks is not None
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(self.out_channels)
        self.padding = int(padding)
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown conv variant {variant!r}")
        self.variant = variant
        self.is_1x1 = (self.kh, self.kw) == (1, 1) and self.stride == 1 and self.padding == 0
        self._prepared: dict[str, np.ndarray] = {}
        self._zero_bias = None
        if self.cache and (self.is_1x1 or not self.winograd_ok):
            self.prepare()

    def keeps(self, h: int, w: int) -> bool:
        """Whether the Winograd filters used on h x w maps are kept (made once) rather than made at each call."""
        return self.keep_filters and self.variant is None and 64 <= h * w <= KEEP_MAX_PIXELS

    def variant_for(self, h: int, w: int, n: int = 1) -> str:
        """The path conv2d takes for an (n, h, w, Cin) input."""
        if self.is_1x1:
            v = "gemm1x1"
        elif self.variant == "kn2row" or (self.variant is None
                                          and few_outputs(self.in_channels, self.out_channels, self.stride)):
            v = "kn2row"
        elif not self.winograd_ok:
            v = "im2col"
        else:
            v = self.variant or choose_variant(self.in_channels, self.out_channels, h, w, n, self.cache)
            if self.keeps(h, w):
                v = "f43"  # kept, F(4,3)'s filters beat F(2,3)'s even with few tiles (8x8, batch 2: 0.78)
            elif self.variant is None and self.blocks is not None and v == "im2col":
                v = "f23"  # the blocked weights' filters beat im2col even on tiny maps (no (9 Cin, Cout) matrix)
            elif (self.variant is None and not self.cache and self.blocks is None and v in ("f43", "f23")
                    and n * (-(-h // 2)) * (-(-w // 2)) <= STREAM_IM2COL_TILES):
                v = "im2col"
        if v in WINOGRAD and not self.winograd_ok:
            raise ValueError("Winograd needs a 3x3 stride-1 convolution")
        if v == "gemm1x1" and not self.is_1x1:
            v = "im2col"
        if v == "kn2row" and self.stride != 1:
            raise ValueError("kn2row needs a stride-1 convolution")
        return v

    def prepare(self, h: int | None = None, w: int | None = None, n: int = 1) -> str:
        """Make (once) the transformed weights of the path used for (n, h, w) inputs; returns that path. A plan
        without cache keeps nothing: the path is only chosen."""
        v = self.variant_for(h or 64, w or 64, n)
        if self.cache and v not in self._prepared:
            wt = self.weight
            if v in WINOGRAD:
                self._prepared[v] = winograd.in_panels(winograd.filter_transform(wt, WINOGRAD[v]))
            elif v == "gemm1x1":
                self._prepared[v] = np.ascontiguousarray(wt.reshape(self.out_channels, self.in_channels).T)
            elif v == "kn2row":
                self._prepared[v] = _taps_matrix(wt.transpose(2, 3, 1, 0))
            else:
                self._prepared[v] = np.ascontiguousarray(wt.transpose(2, 3, 1, 0).reshape(-1, self.out_channels))
        return v

    def prepared_bytes(self) -> int:
        """Memory held by the transformed weights (besides the OIHW weight itself)."""
        return sum(a.nbytes for a in self._prepared.values())

    def weights_for(self, v: str, keep: bool = False):
        """What conv2d's path v multiplies by: the kept transform, or (no cache) one made now from the stored
        weights -- a winograd.FilterSource for the Winograd paths, a float32 matrix in scratch otherwise. keep
        (a plan with keep_filters, on maps it `keeps`): the Winograd filters made at the first such call, kept."""
        if self.cache:
            return self._prepared[v]
        if v in WINOGRAD:
            src = winograd.FilterSource(self.hwio, WINOGRAD[v], self.blocks, self.out_channels)
            if not (keep and self.keep_filters):
                return src
            if v not in self._prepared:
                self._prepared[v] = winograd.kept_filters(src)
            return self._prepared[v]
        hwio = self.hwio if self.blocks is None else _weights.unblock_outputs(self.blocks, self.out_channels)
        if v == "kn2row":  # (Cin, kh*kw*Cout): small, as this path is for few output channels
            return _taps_matrix(hwio if hwio.dtype == np.float32 else _weights.widen(hwio, parallel=False))
        # the 1x1 and im2col matrices are the HWIO weights seen as (kh*kw*Cin, Cout): float32 ones as they are
        # (blocked weights, on a forced im2col, are re-laid out into scratch first)
        return _weights.as_float32(hwio.reshape(-1, self.out_channels), "conv")

    def output_blocks(self, o_lo: int, o_hi: int, ob: int) -> np.ndarray:
        """The weights of output channels [o_lo, o_hi) (o_lo a multiple of ob) as float32 blocks of ob output
        channels, (ceil((o_hi - o_lo) / ob), kh, kw, Cin, ob), zeros past o_hi; widened exactly if half precision.
        Weights stored in such blocks are sliced, not re-laid out."""
        b = self.blocks
        if b is not None and b.shape[-1] == ob and o_lo % ob == 0 and (o_hi % ob == 0 or o_hi == self.out_channels):
            w = b[o_lo // ob: -(-o_hi // ob)]
        else:
            if self.cache:
                hwio = self.weight[o_lo:o_hi].transpose(2, 3, 1, 0)
            elif b is not None:
                hwio = _weights.unblock_outputs(b, self.out_channels)[..., o_lo:o_hi]
            else:
                hwio = self.hwio[..., o_lo:o_hi]
            w = _weights.block_outputs(hwio, ob)
        return w if w.dtype == np.float32 else _weights.widen(w, parallel=False)

    def stored_bytes(self) -> int:
        """Memory held by this plan's weights: the stored ones plus any kept transforms."""
        held = self.weight if self.cache else (self.hwio if self.blocks is None else self.blocks)
        return held.nbytes + self.prepared_bytes() + (0 if self.bias is None else self.bias.nbytes)

    def zero_bias(self) -> np.ndarray:
        if self._zero_bias is None:
            self._zero_bias = np.zeros(self.out_channels, dtype=np.float32)
        return self._zero_bias


def conv2d(x: np.ndarray, plan: Conv2dPlan, residual: np.ndarray | None = None, pre=None) -> np.ndarray:
    """Convolve NHWC x with the planned weights; adds residual (same shape as the output) if given.

    pre: a norm.Normalization (GroupNorm's statistics of x, + SiLU) to convolve norm.normalize(x, pre) instead of
    x, the same numbers: the Winograd paths apply it as their input transform reads x, so that the normalized map
    is never made (GroupNorm + SiLU + convolution, as ResNet blocks run them); the others make it first.
    For asymmetric padding pad x first and plan with padding=0.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, h, w, cin = x.shape
    if cin != plan.in_channels:
        raise ValueError(f"conv2d: input has {cin} channels, the weights expect {plan.in_channels}")
    ho = (h + 2 * plan.padding - plan.kh) // plan.stride + 1
    wo = (w + 2 * plan.padding - plan.kw) // plan.stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: input {h}x{w} is smaller than the {plan.kh}x{plan.kw} kernel")
    if residual is not None:
        residual = np.ascontiguousarray(residual, dtype=np.float32)
        if residual.shape != (n, ho, wo, plan.out_channels):
            raise ValueError(f"conv2d: residual shape {residual.shape} != output shape {(n, ho, wo, plan.out_channels)}")
    if pre is not None and any(np.shape(t) != (n, cin) for t in (pre.mu, pre.a, pre.b)):
        raise ValueError(f"conv2d: a normalization of {np.shape(pre.mu)} for an input of {n} x {cin} channels")
    v = plan.prepare(h, w, n)
    prep = plan.weights_for(v, keep=plan.keeps(h, w))
    if pre is not None and v not in WINOGRAD:
        x = normalize(x, pre)
    if v in WINOGRAD:
        bias = plan.bias if plan.bias is not None else plan.zero_bias()
        y = winograd.winograd_conv(x, prep, WINOGRAD[v], plan.padding, bias, plan.out_channels, residual, pre=pre)
    elif v == "gemm1x1":
        y = gemm_bias(x.reshape(-1, cin), prep, plan.bias, residual).reshape(n, h, w, plan.out_channels)
    elif v == "kn2row":
        y = conv_kn2row(x, prep, plan.kh, plan.kw, plan.padding, plan.bias, residual)
    else:
        y = conv_im2col(x, prep, plan.kh, plan.kw, plan.stride, plan.padding, plan.bias, residual)
    return y


def upsample_conv2d(x: np.ndarray, plan: Conv2dPlan) -> np.ndarray:
    """conv2d(nearest 2x upsampling of NHWC x, plan): the upsamplers of the UNet and the VAE. For a 3x3 stride-1
    padding-1 plan on a map with enough tiles, computed on x itself as four 2x2 convolutions, one per output phase
    (upconv.py: Winograd F(4x4, 2x2), 31% fewer multiplications than F(4,3) on the upsampled map, which is never
    made); else upsampled, then convolved."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, h, w, cin = x.shape
    if cin != plan.in_channels:
        raise ValueError(f"conv2d: input has {cin} channels, the weights expect {plan.in_channels}")
    if not (plan.winograd_ok and plan.padding == 1 and plan.variant is None and upconv.worth_it(n, h, w)
            and min(cin, plan.out_channels) >= MIN_WINOGRAD_CHANNELS):
        return conv2d(upsample2x(x), plan)
    bias = plan.bias if plan.bias is not None else plan.zero_bias()
    return upconv.upsample_conv3x3(x, plan.output_blocks, plan.out_channels, bias)
