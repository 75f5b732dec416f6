"""The arithmetic the schedulers share: beta schedules, alphas_cumprod, timestep spacing, sigma conversions,
Karras / exponential sigmas, scalar float32 helpers and the noise draw.

Everything here mirrors what diffusers (0.42.1) computes with torch 2.13 on the CPU, in the same dtypes:

* ``torch.linspace(a, b, n, dtype=float32)`` is reproduced exactly (``torch_linspace_f32``): torch's CPU kernel
  computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the second, in float32,
  and GCC contracts each into one fused multiply-add.
* ``torch.cumprod`` of a float32 tensor accumulates in double and rounds each partial product to float32.
* Where diffusers works in float64 numpy (``np.interp``, Karras sigmas, ``_sigma_to_t``) so do we; where it works
  on float32 tensors (0-dim scalars like ``alphas_cumprod[t]`` or ``sigmas[i]``, and the sample updates), we use
  float32 numpy in the same order of operations.

torch's float32 ``sqrt`` / ``exp`` / ``log`` on this CPU go through MKL's vector math, which is not always
correctly rounded; we use correctly rounded ones, so 0-dim scalar coefficients can differ from diffusers' by one
unit in the last place (about 6e-8 relative). The sample arithmetic itself (+, -, *, /) is exact IEEE float32 on
both sides.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError

F32 = np.float32
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# ---------------------------------------------------------------------------------------------- float32 scalars

def f32(x) -> np.float32:
    return np.float32(x)


def sqrt32(x) -> np.float32:
    return np.sqrt(np.float32(x))


def log32(x) -> np.float32:
    """float32 log, rounded from the float64 result (log(0) = -inf without a warning)."""
    with np.errstate(divide="ignore"):
        return np.float32(np.log(np.float64(np.float32(x))))


def exp32(x) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(np.exp(np.float64(np.float32(x))))


# ---------------------------------------------------------------------------------------------- torch emulation

def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, bit for bit.

    The fused multiply-add is emulated in float64: the float32 x integer product is exact there, and the single
    rounding of the sum to float32 differs from a true fma only in astronomically rare double-rounding ties.
    """
    if steps <= 0:
        return np.zeros(0, F32)
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], F32)
    step = (end32 - start32) / F32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    s64 = np.float64(step)
    first = s64 * i + np.float64(start32)
    second = np.float64(end32) - s64 * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 tensor on the CPU: double accumulator, float32 results."""
    return np.cumprod(np.asarray(x, np.float64)).astype(F32)


# ---------------------------------------------------------------------------------------------- betas / alphas

def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> np.ndarray:
    """Betas whose cumulative product follows alpha_bar(t) (diffusers' ``betas_for_alpha_bar``), float32."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise UsageError(f"unsupported alpha_transform_type {alpha_transform_type!r}")
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=F32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> np.ndarray:
    """The float32 betas of a diffusers scheduler config."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=F32).copy()
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        root = torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise UsageError(f"beta_schedule {beta_schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (https://arxiv.org/abs/2305.08891, Algorithm 1), float32."""
    alphas = F32(1.0) - betas
    root = np.sqrt(cumprod_f32(alphas))
    root0, root_last = root[0], root[-1]
    root = root - root_last
    root = root * (root0 / (root0 - root_last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return F32(1) - alphas


def alphas_cumprod_of(betas: np.ndarray) -> np.ndarray:
    return cumprod_f32(F32(1.0) - betas)


def sigmas_of(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar), float32, in training-timestep order (ascending)."""
    return np.sqrt((F32(1) - alphas_cumprod) / alphas_cumprod)


# ---------------------------------------------------------------------------------------------- timesteps

def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int = 0) -> np.ndarray:
    """The inference timesteps of diffusers' DDIM / Euler family, descending, float64.

    leading and trailing give integral values; linspace is left unrounded (Euler keeps the fractions, DDIM and
    PNDM round them).
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio)[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise UsageError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")


def check_steps(num_inference_steps, num_train_timesteps: int) -> int:
    n = int(num_inference_steps)
    if n < 1:
        raise UsageError(f"the number of steps must be at least 1, not {n}")
    if n > num_train_timesteps:
        raise UsageError(f"{n} steps is more than the {num_train_timesteps} timesteps the model was trained with")
    return n


# ---------------------------------------------------------------------------------------------- sigmas

def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps by linear interpolation of the training sigmas (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma, by linear interpolation in log-sigma (diffusers'
    ``_sigma_to_t``; log_sigmas float32, the rest float64)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma.reshape(-1), 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending, float64."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log-sigma, descending, float64."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def sigma_range(config: dict, in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max): the config's if set, else the last / first of in_sigmas."""
    smin = config.get("sigma_min")
    smax = config.get("sigma_max")
    smin = smin if smin is not None else in_sigmas[-1].item()
    smax = smax if smax is not None else in_sigmas[0].item()
    return smin, smax


# ---------------------------------------------------------------------------------------------- misc

def draw_noise(shape, generator=None, dtype=F32) -> np.ndarray:
    """Gaussian noise as diffusers' ``randn_tensor`` draws it.

    generator: an object with ``randn(shape)`` (sdgen.rng.TorchGenerator, bit-identical to a torch CPU generator),
    or a list of them, one per batch item, each drawing a (1, ...) slice in batch order; None draws from numpy.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            one = (1,) + shape[1:]
            return np.concatenate([np.asarray(g.randn(one), dtype=dtype) for g in generator[:shape[0]]])
    if generator is None:
        return np.random.default_rng().standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    return np.asarray(generator.randn(shape), dtype=dtype)


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, https://arxiv.org/abs/2205.11487): per batch item, clamp to the ratio-quantile
    of |x| (at least 1, at most max_value) and divide by it."""
    b, c = sample.shape[:2]
    flat = sample.reshape(b, -1).astype(F32, copy=False)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(F32)
    s = np.clip(s, 1, max_value).astype(F32)[:, None]
    flat = np.clip(flat, -s, s) / s
    return flat.reshape(sample.shape).astype(sample.dtype, copy=False)


def as_timestep_array(timesteps) -> np.ndarray:
    return np.atleast_1d(np.asarray(timesteps)).reshape(-1)


def per_batch(values: np.ndarray, ndim: int) -> np.ndarray:
    """(B,) -> (B, 1, 1, ...) with ndim dimensions, for broadcasting over samples."""
    return values.reshape((-1,) + (1,) * (ndim - 1))
