"""The arithmetic the schedulers share: beta schedules, alphas_cumprod, timestep spacing, sigma conversions,
Karras / exponential / beta sigmas, scalar float32 helpers and the noise draw.

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


def nplog32(x) -> np.float32:
    """numpy's own float32 log (not always correctly rounded): diffusers calls ``np.log`` on 0-dim float32 tensors
    in DEIS, so this reproduces it bit for bit."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, dtype=F32).reshape(()))[()]


def log32_array(x: np.ndarray) -> np.ndarray:
    """Elementwise float32 log, rounded from float64 (log(0) = -inf, no warnings)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(x, F32).astype(np.float64)).astype(F32)


def exp32_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(np.asarray(x, F32).astype(np.float64)).astype(F32)


def log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(torch.lerp(log a, log b, 0.5)): the geometric mean, evaluated as torch does for weight 0.5
    (``end - (end - start) * 0.5``, so that log a = -inf gives nan, as in diffusers), float32."""
    la, lb = log32_array(a), log32_array(b)
    with np.errstate(invalid="ignore"):
        return exp32_array(lb - (lb - la) * F32(0.5))


def interleave_pairs(x: np.ndarray) -> np.ndarray:
    """[x0, x1, x1, x2, x2, ..., x_last, x_last, x_last]: diffusers' ``cat([x[:1], x[1:].repeat_interleave(2),
    x[-1:]])`` for the two-stage KDPM2 schedulers."""
    return np.concatenate([x[:1], np.repeat(x[1:], 2), x[-1:]])


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


def solver_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0,
                     last: int | None = None) -> np.ndarray:
    """The inference timesteps of the DPM-Solver family (DPM-Solver multi/singlestep, DEIS, UniPC), descending int64:
    n + 1 points with the one at the timestep-0 end dropped. last (default num_train_timesteps) is where the
    schedule tops out when ``lambda_min_clipped`` cuts off the noisiest timesteps."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
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


def discrete_sigma_schedule(config: dict, alphas_cumprod: np.ndarray, num_inference_steps: int,
                            round_karras: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, sigmas, log_sigmas) of the k-diffusion style schedulers (LMS, Heun, KDPM2): the spaced timesteps
    (float32), the training sigmas interpolated there (float64), or Karras / exponential / beta sigmas with the
    fractional timesteps they fall on (float64; rounded for Karras when round_karras). log_sigmas: the float32
    training log-sigmas."""
    c, n = config, num_inference_steps
    timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n, c["steps_offset"]).astype(F32)
    train_sigmas = sigmas_of(alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    sigmas = interp_sigmas(timesteps, train_sigmas)
    spread = spread_sigmas(c, sigmas, n)
    if spread is not None:
        sigmas = spread
        timesteps = sigma_to_t(sigmas, log_sigmas)
        if round_karras and c.get("use_karras_sigmas"):
            timesteps = timesteps.round()
    return timesteps, sigmas, log_sigmas


def solver_sigma_schedule(config: dict, alphas_cumprod: np.ndarray, timesteps: np.ndarray, num_inference_steps: int,
                          round_karras: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the DPM-Solver family: the training sigmas interpolated at the given timesteps, or
    Karras / exponential / beta sigmas spanning the training range (or the config's sigma_min / sigma_max) with the
    timesteps they fall on (Karras ones rounded when round_karras). sigmas: float64, without the final one."""
    train_sigmas = sigmas_of(alphas_cumprod)
    log_sigmas = np.log(train_sigmas)
    n = num_inference_steps
    sigmas = spread_sigmas(config, train_sigmas[::-1], n)
    if sigmas is None:
        return timesteps, interp_sigmas(timesteps, train_sigmas)
    timesteps = sigma_to_t(sigmas, log_sigmas)
    if round_karras and config.get("use_karras_sigmas"):
        timesteps = timesteps.round()
    return timesteps, sigmas


def min_train_sigma(alphas_cumprod: np.ndarray) -> float:
    """sqrt((1 - alpha_bar_0) / alpha_bar_0), in float32 (``final_sigmas_type="sigma_min"``)."""
    a0 = alphas_cumprod[0]
    return float(sqrt32((F32(1) - a0) / a0))


def sigma_to_t_f32(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """``sigma_to_t`` as diffusers' KDPM2 schedulers evaluate it for their interpolated sigmas: the sigmas are 0-dim
    float32 torch tensors there, so the whole interpolation runs in float32 (numpy's float32 log included)."""
    sigmas = np.asarray(sigmas, F32).reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_sigma = np.log(np.maximum(sigmas, F32(1e-10)))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), F32(0), F32(1)).astype(F32)
    return ((F32(1) - w) * low_idx.astype(F32) + w * high_idx.astype(F32)).astype(F32)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) in float64 (continued fraction, modified Lentz; about
    1e-15 relative)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        # even step
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        # odd step
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """The inverse of the Beta(a, b) distribution function (``scipy.stats.beta.ppf``): Newton steps on I_x(a, b),
    kept inside a shrinking bisection bracket; agrees with scipy to ~1e-15."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi = 0.0, 1.0
    x = 0.5
    for _ in range(200):
        f = _betainc(a, b, x) - q
        if f == 0.0:
            return x
        if f < 0:
            lo = x
        else:
            hi = x
        pdf = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_norm)
        step = f / pdf if pdf > 0 else 0.0
        x_new = x - step
        if not lo < x_new < hi:
            x_new = 0.5 * (lo + hi)
        if x_new == x or hi - lo <= 4e-16 * max(lo, 1e-300):
            return x_new
        if abs(x_new - x) <= 1e-16 * x:
            return x_new
        x = x_new
    return x


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Noise levels at the quantiles of a Beta(alpha, beta) distribution ("Beta Sampling is All You Need",
    https://arxiv.org/abs/2407.12173), descending, float64: diffusers' ``_convert_to_beta`` without scipy."""
    qs = 1 - np.linspace(0, 1, num_inference_steps)
    return np.array([sigma_min + beta_ppf(float(q), alpha, beta) * (sigma_max - sigma_min) for q in qs])


def check_sigma_options(config: dict, name: str, *keys: str) -> None:
    """Refuse conflicting sigma options, as diffusers does."""
    keys = keys or ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    set_keys = [k for k in keys if config.get(k)]
    if len(set_keys) > 1:
        raise UsageError(f"{name}: only one of {', '.join(keys)} can be set")


def spread_sigmas(config: dict, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray | None:
    """The Karras, exponential or beta sigmas the config asks for (descending, float64), spanning
    ``sigma_range(config, in_sigmas)``; None when it asks for none of them."""
    if config.get("use_karras_sigmas"):
        return karras_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    if config.get("use_exponential_sigmas"):
        return exponential_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    if config.get("use_beta_sigmas"):
        return beta_sigmas(*sigma_range(config, in_sigmas), num_inference_steps)
    return None


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
